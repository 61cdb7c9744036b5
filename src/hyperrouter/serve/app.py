"""The HTTP server of `hyperrouter serve` (FastAPI on uvicorn; the optional `serve` extra).

Endpoints: OpenAI-compatible `POST /v1/completions` (prompt, max_tokens, temperature, top_p,
stop, seed, stream as server-sent events; extension field `k` pins the number of experts, and
every response says which k served it), `POST /v1/score` (per-token loss, BPC or perplexity),
`GET /health`, `GET /metrics` (Prometheus text format).

Requests wait in a bounded queue (a full queue answers 429 with Retry-After). One worker thread
runs the model off the event loop with continuous batching: between two generation steps it
admits queued requests into the running set (up to `max_batch`; when idle it waits up to
`max_wait_ms` for more), gives each its k (pinned by the request, else the policy's choice for
the queue at that moment), prefills its prompt, and then runs every running request of one k as
one forward per step, so a new request never waits for a running one to end. Bad input gets a
4xx with OpenAI's error shape naming the field; the server keeps answering. On shutdown the
queue and the running requests are finished before the worker stops.
The model's torch threads should leave a core to the event loop (`hyperrouter serve` takes the
cores less one by default): on 2 cores, 2 torch threads beside the HTTP server and a load
generator served 2.5x fewer requests than 1 (OpenMP threads spinning on shared cores).
(No `from __future__ import annotations` here: FastAPI reads the handlers' annotations.)
"""

import asyncio
import json
import queue
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from hyperrouter.serve.engine import BadRequest, Engine, Sampling, Sequence
from hyperrouter.serve.policies import RATE_WINDOW_S, Policy, QueueState, arrival_rate


@dataclass
class Job:
    """One request in the queue."""

    kind: str  # "completion" or "score"
    arrived: float
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    k: int | None = None  # pinned by the request
    seq: Sequence | None = None
    k_used: int | None = None  # the k that serves it (pinned or the policy's)
    text: str = ""
    stream: asyncio.Queue | None = None
    cancelled: bool = False
    meta: dict[str, Any] = field(default_factory=dict)


class Metrics:
    """The server's Prometheus metrics (their own registry, so several apps can live in one
    process, e.g. in the tests)."""

    def __init__(self, deadline_ms: float) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter(
            "hyperrouter_requests",
            "requests by endpoint and status",
            ["endpoint", "status"],
            registry=self.registry,
        )
        buckets = [b * deadline_ms / 1000 for b in (0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 4, 8)]
        self.latency = Histogram(
            "hyperrouter_request_latency_seconds",
            "arrival to answer",
            ["endpoint"],
            buckets=buckets,
            registry=self.registry,
        )
        self.queue = Gauge("hyperrouter_queue_length", "requests waiting", registry=self.registry)
        self.k = Counter(
            "hyperrouter_requests_by_k", "requests served at each k", ["k"], registry=self.registry
        )
        self.misses = Counter(
            "hyperrouter_deadline_misses",
            "answers later than the deadline",
            registry=self.registry,
        )
        self.batches = Counter(
            "hyperrouter_steps", "generation steps run (one forward each)", registry=self.registry
        )
        self.step_rows = Histogram(
            "hyperrouter_step_requests",
            "requests sharing one generation step",
            buckets=[1, 2, 4, 8, 16, 32, 64],
            registry=self.registry,
        )


class Server:
    """The queue, the worker thread and the policy around an `Engine`."""

    def __init__(
        self,
        engine: Engine,
        policy: Policy,
        *,
        deadline_ms: float = 1000.0,
        max_batch: int = 8,
        max_wait_ms: float = 5.0,
        max_queue: int = 64,
    ) -> None:
        self.engine = engine
        self.policy = policy
        self.deadline_ms = deadline_ms
        self.max_batch = max_batch
        self.max_wait_ms = max_wait_ms
        self.jobs: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self.metrics = Metrics(deadline_ms)
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        self._arrivals: list[float] = []
        self._first_arrival = 0.0
        self.active: list[Job] = []  # requests being generated (the worker's own)
        self.model_name = str(engine.run.folder)

    # ------------------------------------------------------------------ worker
    def start(self) -> None:
        self.thread = threading.Thread(target=self._work, name="hyperrouter-serve", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Finish what is queued and running, then stop the worker."""
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(timeout=600)

    def submit(self, job: Job) -> None:
        now = time.perf_counter()
        self._arrivals = [t for t in self._arrivals if now - t < RATE_WINDOW_S]
        if not self._arrivals:  # the first arrival after a quiet spell starts the rate's span
            self._first_arrival = now
        self._arrivals.append(now)
        self.jobs.put_nowait(job)  # queue.Full -> 429
        self.metrics.queue.set(self.jobs.qsize())

    def _work(self) -> None:
        """Continuous batching: between two generation steps, queued requests join the running
        ones (up to max_batch), each with its own k; a step runs every running request of one k
        as one forward."""
        while not (self.stopping.is_set() and self.jobs.empty() and not self.active):
            for job in self._arrived():
                self._admit(job)
            self.metrics.queue.set(self.jobs.qsize())
            if self.active:
                self._step()

    def _arrived(self) -> list[Job]:
        """Requests to admit now: when idle, wait (up to 50 ms) for one, then up to max_wait_ms
        for more; while generating, whatever is queued, up to the free slots."""
        free = self.max_batch - len(self.active)
        out: list[Job] = []
        if not self.active:
            try:
                out.append(self.jobs.get(timeout=0.05))
            except queue.Empty:
                return out
            end = time.perf_counter() + self.max_wait_ms / 1000
            while len(out) < free and (left := end - time.perf_counter()) > 0:
                try:
                    out.append(self.jobs.get(timeout=left))
                except queue.Empty:
                    break
        while len(out) < free:
            try:
                out.append(self.jobs.get_nowait())
            except queue.Empty:
                break
        return out

    def _state(self, job: Job, waiting: int) -> QueueState:
        now = time.perf_counter()
        recent = [t for t in self._arrivals if now - t < RATE_WINDOW_S]
        rate = arrival_rate(recent, now, self._first_arrival)
        active = [
            (a.k_used, (now - a.arrived) * 1e3, a.seq.sampling.max_tokens - len(a.seq.out_ids))
            for a in self.active
        ]
        max_tokens = job.seq.sampling.max_tokens if job.seq is not None else 1
        return QueueState(waiting, (now - job.arrived) * 1e3, rate, active, max_tokens)

    def _admit(self, job: Job) -> None:
        """Choose k (pinned, or the policy's), then score the text or prefill the prompt and
        sample the first token; a completion that goes on joins the running requests."""
        if job.kind == "completion" and job.seq.done:  # its client went away while it waited
            return
        k = job.k
        if k is None:
            k = self.policy.choose(self._state(job, self.jobs.qsize() + 1))
        job.k_used = k
        if job.kind == "score":
            self._finish(job, lambda: self.engine.score(job.text, k), k)
            return
        try:
            self.engine.prefill(job.seq, k)
            self.engine.sample(job.seq)
        except Exception as err:  # noqa: BLE001 (one failed request must not stop the server)
            job.loop.call_soon_threadsafe(_set_exception, job.future, err)
            return
        if job.seq.done:
            self._finish(job, lambda: job.seq, k)
        else:
            self.active.append(job)

    def _step(self) -> None:
        """One generation step of every running request (one forward per k among them)."""
        self.active = [job for job in self.active if job.seq.finish_reason != "cancelled"]
        groups: dict[int, list[Job]] = {}
        for job in self.active:
            groups.setdefault(job.k_used, []).append(job)
        for k, jobs in groups.items():
            self.metrics.batches.inc()
            self.metrics.step_rows.observe(len(jobs))
            try:
                self.engine.step([job.seq for job in jobs], k)
                for job in jobs:
                    self.engine.sample(job.seq)
            except Exception as err:  # noqa: BLE001
                for job in jobs:
                    job.seq.finish_reason = job.seq.finish_reason or "error"
                    job.loop.call_soon_threadsafe(_set_exception, job.future, err)
                continue
            for job in jobs:
                if job.seq.done:
                    self._finish(job, lambda job=job: job.seq, k)
        self.active = [job for job in self.active if not job.seq.done]

    def _finish(self, job: Job, compute, k: int) -> None:
        try:
            result = compute()
        except Exception as err:  # noqa: BLE001
            job.loop.call_soon_threadsafe(_set_exception, job.future, err)
            return
        latency = time.perf_counter() - job.arrived
        endpoint = "completions" if job.kind == "completion" else "score"
        self.metrics.latency.labels(endpoint).observe(latency)
        self.metrics.k.labels(str(k)).inc()
        if latency * 1e3 > self.deadline_ms:
            self.metrics.misses.inc()
        job.loop.call_soon_threadsafe(_set_result, job.future, (result, k))


def _set_result(future: asyncio.Future, value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, err: BaseException) -> None:
    if not future.done():
        future.set_exception(err)


# ----------------------------------------------------------------------------- HTTP


def _error(status: int, message: str, param: str | None = None, kind: str | None = None):
    kind = kind or ("invalid_request_error" if status < 500 else "server_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    headers = {"Retry-After": "1"} if status == 429 else None
    return JSONResponse(body, status_code=status, headers=headers)


async def _json_body(request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("the body is not valid JSON", None) from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object", None)
    return body


def _sampling(body: dict[str, Any]) -> Sampling:
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not isinstance(stop, list):
        raise BadRequest("stop must be a string or a list of strings", "stop")
    seed = body.get("seed")
    if seed is not None and (
        isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63
    ):
        raise BadRequest("seed must be an integer in [0, 2^63)", "seed")
    return Sampling(
        max_tokens=body.get("max_tokens", 16),
        temperature=body.get("temperature", 1.0),
        top_p=body.get("top_p", 1.0),
        stop=stop,
        seed=seed,
    )


def _prompt(body: dict[str, Any]) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise BadRequest("prompt must be a string (or a list of exactly one)", "prompt")
        prompt = prompt[0]
    if prompt is None:
        raise BadRequest("prompt is required", "prompt")
    return prompt


def create_app(server: Server):
    """The FastAPI application around a `Server` (its worker starts and stops with the app)."""

    @asynccontextmanager
    async def lifespan(app):
        server.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, server.stop)

    app = FastAPI(title="hyperrouter", lifespan=lifespan)
    engine = server.engine

    def enqueue(job: Job, endpoint: str):
        try:
            server.submit(job)
        except queue.Full:
            server.metrics.requests.labels(endpoint, "429").inc()
            return _error(429, "the server is busy: too many queued requests", None, "rate_limit")
        return None

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, err: BadRequest):
        endpoint = request.url.path.rsplit("/", 1)[-1]
        server.metrics.requests.labels(endpoint, "400").inc()
        return _error(400, str(err), err.param)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _json_body(request)
        if body.get("n", 1) != 1:
            raise BadRequest("only n = 1 is supported", "n")
        k = body.get("k")
        if k is not None:
            engine.check_k(k)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise BadRequest("stream must be true or false", "stream")
        seq = engine.new_sequence(_prompt(body), _sampling(body))
        loop = asyncio.get_running_loop()
        job = Job("completion", time.perf_counter(), loop, loop.create_future(), k, seq)
        rid = f"cmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        if stream:
            job.stream = asyncio.Queue()
            seq.on_token = lambda text: loop.call_soon_threadsafe(job.stream.put_nowait, text)
        refused = enqueue(job, "completions")
        if refused is not None:
            return refused

        def payload(text: str, finish: str | None, k_used: int | None) -> dict[str, Any]:
            out = {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": server.model_name,
                "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
                "k": k_used,
            }
            return out

        if not stream:
            try:
                done, k_used = await job.future
            except asyncio.CancelledError:
                seq.finish_reason = "cancelled"
                raise
            server.metrics.requests.labels("completions", "200").inc()
            out = payload(done.text, done.finish_reason, k_used)
            n_out = len(done.out_ids)
            out["usage"] = {
                "prompt_tokens": len(done.prompt_ids),
                "completion_tokens": n_out,
                "total_tokens": len(done.prompt_ids) + n_out,
            }
            return JSONResponse(out)

        async def events():
            getter = None
            try:
                while True:
                    getter = asyncio.ensure_future(job.stream.get())
                    finished, _ = await asyncio.wait(
                        {getter, job.future}, return_when=asyncio.FIRST_COMPLETED
                    )
                    if getter in finished:
                        yield f"data: {json.dumps(payload(getter.result(), None, None))}\n\n"
                        continue
                    getter.cancel()
                    while not job.stream.empty():
                        text = job.stream.get_nowait()
                        yield f"data: {json.dumps(payload(text, None, None))}\n\n"
                    try:
                        done, k_used = job.future.result()
                    except Exception as err:  # noqa: BLE001 (the headers are sent: an event)
                        error = {"message": f"generation failed: {err}", "type": "server_error"}
                        yield f"data: {json.dumps({'error': error})}\n\n"
                        yield "data: [DONE]\n\n"
                        server.metrics.requests.labels("completions", "500").inc()
                        return
                    yield f"data: {json.dumps(payload('', done.finish_reason, k_used))}\n\n"
                    yield "data: [DONE]\n\n"
                    server.metrics.requests.labels("completions", "200").inc()
                    return
            except BaseException:  # the client went away: stop generating for it
                seq.finish_reason = seq.finish_reason or "cancelled"
                raise
            finally:
                if getter is not None and not getter.done():
                    getter.cancel()
                if job.future.done() and not job.future.cancelled():
                    job.future.exception()  # retrieved: no "never retrieved" warning

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/score")
    async def score(request: Request):
        body = await _json_body(request)
        k = body.get("k")
        if k is not None:
            engine.check_k(k)
        text = body.get("text")
        engine.encode(text, "text")  # bad input answers before it queues
        loop = asyncio.get_running_loop()
        job = Job("score", time.perf_counter(), loop, loop.create_future(), k, text=text)
        refused = enqueue(job, "score")
        if refused is not None:
            return refused
        result, _ = await job.future
        server.metrics.requests.labels("score", "200").inc()
        return JSONResponse(result)

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "model": server.model_name,
            "experts": engine.num_experts,
            "policy": server.policy.kind,
            "queue": server.jobs.qsize(),
        }

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        server.metrics.queue.set(server.jobs.qsize())
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(404)
    async def not_found(request: Request, err):
        return _error(404, f"no such endpoint: {request.method} {request.url.path}")

    @app.exception_handler(405)
    async def not_allowed(request: Request, err):
        return _error(405, f"{request.method} is not allowed on {request.url.path}")

    return app
