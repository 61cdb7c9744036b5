"""`hyperrouter serve`: the real server (uvicorn on a free loopback port, no mocks), every
endpoint, streaming, bad input, batching, the openai client, policies and their simulator."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from hyperrouter.cli import main  # noqa: E402
from hyperrouter.serve.engine import Engine, generate  # noqa: E402
from hyperrouter.serve.loadtest import LocalServer  # noqa: E402
from hyperrouter.serve.policies import (  # noqa: E402
    LearnedPolicy,
    Profile,
    QueueState,
    RulePolicy,
    StaticPolicy,
    simulate,
    train_learned,
)
from hyperrouter.train.evaluate import load_trained  # noqa: E402
from tests.conftest import train_tiny_run  # noqa: E402

PROMPT = "ROMEO: the king"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return train_tiny_run(tmp_path_factory.mktemp("serve") / "run", steps=3)


class Running(LocalServer):
    """The real server (`bench serve`'s LocalServer: uvicorn in a thread on a free loopback
    port) around a fresh engine on the run."""

    def __init__(self, run_dir: Path, policy=None, **options) -> None:
        from hyperrouter.serve.app import Server, create_app

        engine = Engine(load_trained(run_dir), max_prompt=200, max_tokens_limit=64)
        self.app_server = Server(engine, policy or StaticPolicy(4), **options)
        super().__init__(create_app(self.app_server))

    def stop(self) -> None:
        super().stop()
        assert not self.thread.is_alive()


@pytest.fixture(scope="module")
def served(run_dir):
    running = Running(run_dir, max_batch=8, max_wait_ms=150.0)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def reference(run_dir) -> Engine:
    """A second engine on the same run (the server's own runs in its worker thread)."""
    return Engine(load_trained(run_dir), max_prompt=200, max_tokens_limit=64)


def post(url: str, path: str, body, **kw) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(url + path, content=content, timeout=60, **kw)


def test_health_and_metrics(served) -> None:
    health = httpx.get(served.url + "/health").json()
    assert health["status"] == "ok" and health["experts"] == 4 and health["policy"] == "static"
    r = post(served.url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2, "seed": 1})
    assert r.status_code == 200, r.text
    text = httpx.get(served.url + "/metrics").text
    for name in (
        "hyperrouter_requests_total",
        "hyperrouter_request_latency_seconds_bucket",
        "hyperrouter_queue_length",
        "hyperrouter_requests_by_k_total",
        "hyperrouter_deadline_misses_total",
    ):
        assert name in text, name


@pytest.mark.parametrize("k", [1, 2, 4])
def test_pinned_k_equals_the_models_own_sampling(served, reference, k) -> None:
    body = {"prompt": PROMPT, "max_tokens": 12, "seed": 7, "temperature": 0.8, "k": k}
    answer = post(served.url, "/v1/completions", body).json()
    assert answer["object"] == "text_completion" and answer["k"] == k
    choice = answer["choices"][0]
    want = generate(reference, PROMPT, k=k, max_tokens=12, temperature=0.8, seed=7)
    assert choice["text"] == want and choice["finish_reason"] == "length"
    assert answer["usage"]["completion_tokens"] == 12
    assert answer["usage"]["prompt_tokens"] == len(PROMPT)


def test_score_equals_the_engine_and_eval_loss(served, reference) -> None:
    """/v1/score at a pinned k is `hyperrouter eval`'s loss on the same ids (evaluate(): its
    segments, its memory) and the engine's own score."""
    import torch

    from hyperrouter.train.evaluate import eval_mem_len, evaluate

    text = "ROMEO: what light through yonder window breaks, it is the east " * 2
    got = post(served.url, "/v1/score", {"text": text, "k": 2}).json()
    want = reference.score(text, 2)
    assert got["k"] == 2 and got["tokens"] == len(text) - 1
    assert got["bpc"] == pytest.approx(want["bpc"], rel=1e-6)
    assert len(got["token_losses"]) == got["tokens"]
    config = reference.run.config
    assert len(text) > 2 * config.eval.tgt_len  # several segments, carried memory
    ids = torch.tensor(reference.vocab.encode(text))
    result = evaluate(
        reference.model,
        ids,
        batch_size=1,
        tgt_len=config.eval.tgt_len,
        mem_len=eval_mem_len(config),
        top_k=2,
        device=torch.device("cpu"),
    )
    assert result.tokens == got["tokens"]
    assert got["loss"] == pytest.approx(result.loss, rel=1e-6)  # fp32 sums in another order
    reference.model.mem_len = reference.mem_len  # evaluate() restored it; as the engine uses it


def test_streaming_gives_the_same_text(served, reference) -> None:
    body = {"prompt": PROMPT, "max_tokens": 10, "seed": 3, "k": 2, "stream": True}
    chunks, done = [], False
    with httpx.stream("POST", served.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                done = True
                break
            chunks.append(json.loads(data))
    assert done and chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["k"] == 2
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert text == generate(reference, PROMPT, k=2, max_tokens=10, seed=3)


def _step_rows(served) -> tuple[float, float]:
    """(generation steps run, requests summed over them) from the server's histogram."""
    hist = served.app_server.metrics.step_rows
    samples = {s.name: s.value for s in hist.collect()[0].samples}
    return samples["hyperrouter_step_requests_count"], samples["hyperrouter_step_requests_sum"]


def test_concurrent_requests_are_batched_and_equal_unbatched(served, reference) -> None:
    """Prompts of different lengths (memories of different lengths, padded) share steps; each
    answer equals the request alone at the same k and seed."""
    steps0, rows0 = _step_rows(served)
    bodies = [{"prompt": PROMPT[: 5 + i], "max_tokens": 8, "seed": i, "k": 2} for i in range(6)]
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda b: post(served.url, "/v1/completions", b).json(), bodies))
    steps1, rows1 = _step_rows(served)
    assert rows1 - rows0 == 6 * 7  # 7 steps per request after the prefill's token
    assert steps1 - steps0 < 6 * 7, "the six requests should share steps"
    for body, answer in zip(bodies, answers):
        want = generate(reference, body["prompt"], k=2, max_tokens=8, seed=body["seed"])
        assert answer["choices"][0]["text"] == want


def test_steps_over_memories_of_different_lengths_equal_each_alone(reference) -> None:
    """The engine pads shorter memories (masked), and the next steps of the same requests reuse
    the batch: each request's next-token logits at every shared step equal its own steps alone
    (greedy, so the tokens fed back are the same; fp32 rounding of batched products)."""
    import torch

    from hyperrouter.serve.engine import Sampling

    prompts = ["ROMEO: the", "a", "JULIET: what light through yonder window breaks " * 2]
    alone = []
    for i, prompt in enumerate(prompts):
        seq = reference.new_sequence(prompt, Sampling(5, 0.0, 1.0, [], i))
        reference.prefill(seq, 2)
        reference.sample(seq)
        logits = []
        for _ in range(3):
            reference.step([seq], 2)
            logits.append(seq.logits)
            reference.sample(seq)
        alone.append(logits)
    together = [
        reference.new_sequence(p, Sampling(5, 0.0, 1.0, [], i)) for i, p in enumerate(prompts)
    ]
    for seq in together:
        reference.prefill(seq, 2)
        reference.sample(seq)
    assert len({seq.mem_rows for seq in together}) == 3  # three memory lengths
    for step in range(3):
        reference.step(together, 2)
        for want, seq in zip(alone, together):
            torch.testing.assert_close(seq.logits, want[step], rtol=1e-5, atol=1e-5)
            reference.sample(seq)


def test_key_value_memory_equals_the_models_hidden_state_memory(reference) -> None:
    """The engine keeps memory as projected keys and values; the slow, obvious path (the model's
    own forward over the same tokens with hidden-state memory, one token per call after the
    prompt) gives the same next-token log-probabilities at every step."""
    import torch

    from hyperrouter.serve.engine import Sampling

    engine = reference
    prompt = "JULIET: what light through yonder window breaks " * 2
    seq = engine.new_sequence(prompt, Sampling(6, 0.0, 1.0, [], 0))
    engine.prefill(seq, 2)
    fast = [seq.logits]
    engine.sample(seq)
    while not seq.done:
        engine.step([seq], 2)
        fast.append(seq.logits)
        engine.sample(seq)
    model = engine.model
    ids = torch.tensor(seq.prompt_ids + seq.out_ids)
    mems: list = []
    slow = []
    with torch.no_grad():
        n = len(seq.prompt_ids)
        for start in range(0, n, engine.segment):
            hidden, mems, _, _ = model.body(ids[start : min(start + engine.segment, n), None], mems)
        slow.append(model.crit.log_prob(hidden[-1]).float()[0])
        for t in range(n, len(ids) - 1):
            hidden, mems, _, _ = model.body(ids[t : t + 1, None], mems)
            slow.append(model.crit.log_prob(hidden[-1]).float()[0])
    assert len(fast) == len(slow) == 6
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # fp32: projections split


def test_a_request_joins_a_running_generation(served, reference) -> None:
    """Continuous batching: a short request sent while a long one streams is answered before the
    long one ends (it does not wait for it), and its text is what it is alone."""
    long = {"prompt": PROMPT, "max_tokens": 64, "seed": 1, "k": 2, "stream": True}
    short = {"prompt": "JULIET: ", "max_tokens": 2, "seed": 2, "k": 2}
    pending = None
    with ThreadPoolExecutor(1) as pool:
        with httpx.stream("POST", served.url + "/v1/completions", json=long, timeout=60) as r:
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    short_done_first = pending is not None and pending.done()
                    break
                if line.startswith("data: ") and pending is None:
                    pending = pool.submit(post, served.url, "/v1/completions", short)
        answer = pending.result().json()
    assert short_done_first, "the short request waited for the long one to end"
    want = generate(reference, short["prompt"], k=2, max_tokens=2, seed=2)
    assert answer["choices"][0]["text"] == want and answer["k"] == 2


BAD = [
    (b"{not json", None, "not valid JSON"),
    (b"[1, 2]", None, "JSON object"),
    ({"max_tokens": 3}, "prompt", "prompt is required"),
    ({"prompt": 5}, "prompt", "prompt must be a string"),
    ({"prompt": ""}, "prompt", "prompt is empty"),
    ({"prompt": "x" * 201}, "prompt", "more than the limit of 200"),
    ({"prompt": "caf\u00e9 \u2603"}, "prompt", "outside the model's vocabulary"),
    ({"prompt": PROMPT, "k": 5}, "k", "k must be in [1, 4]"),
    ({"prompt": PROMPT, "k": "two"}, "k", "k must be an integer"),
    ({"prompt": PROMPT, "max_tokens": 0}, "max_tokens", "max_tokens must be an integer in"),
    ({"prompt": PROMPT, "max_tokens": 65}, "max_tokens", "max_tokens must be an integer in"),
    ({"prompt": PROMPT, "max_tokens": "3"}, "max_tokens", "max_tokens must be an integer in"),
    ({"prompt": PROMPT, "temperature": -1}, "temperature", "temperature must be"),
    ({"prompt": PROMPT, "top_p": 0}, "top_p", "top_p must be"),
    ({"prompt": PROMPT, "stop": 3}, "stop", "stop must be"),
    ({"prompt": PROMPT, "seed": -2}, "seed", "seed must be"),
    ({"prompt": PROMPT, "seed": 2**64}, "seed", "seed must be"),
    ({"prompt": PROMPT, "stream": "yes"}, "stream", "stream must be"),
    ({"prompt": PROMPT, "n": 2}, "n", "only n = 1"),
]


@pytest.mark.parametrize("body,param,needle", BAD)
def test_bad_input_is_a_400_naming_the_field(served, body, param, needle) -> None:
    r = post(served.url, "/v1/completions", body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert needle in error["message"] and error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert httpx.get(served.url + "/health").status_code == 200  # still answering


def test_bad_score_and_unknown_routes(served) -> None:
    r = post(served.url, "/v1/score", {"text": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "text"
    r = post(served.url, "/v1/score", {"text": PROMPT, "k": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "k"
    r = httpx.get(served.url + "/v1/nothing")
    assert r.status_code == 404 and "no such endpoint" in r.json()["error"]["message"]
    r = httpx.get(served.url + "/v1/completions")
    assert r.status_code == 405


def test_a_client_that_disconnects_mid_stream(served) -> None:
    body = {"prompt": PROMPT, "max_tokens": 60, "seed": 1, "stream": True}
    with httpx.stream("POST", served.url + "/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # leave after the first token
    answer = post(served.url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 3, "seed": 2})
    assert answer.status_code == 200


def test_the_official_openai_client(served, reference) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0)
    answer = client.completions.create(
        model="hyperrouter",
        prompt=PROMPT,
        max_tokens=6,
        seed=11,
        temperature=0.5,
        extra_body={"k": 1},
    )
    assert answer.choices[0].text == generate(
        reference, PROMPT, k=1, max_tokens=6, temperature=0.5, seed=11
    )
    stream = client.completions.create(
        model="hyperrouter",
        prompt=PROMPT,
        max_tokens=6,
        seed=11,
        temperature=0.5,
        extra_body={"k": 1},
        stream=True,
    )
    assert "".join(c.choices[0].text for c in stream) == answer.choices[0].text
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="m", prompt=PROMPT, max_tokens=0)
    assert "max_tokens" in str(err.value)


def test_a_burst_above_the_queue_limit_gets_429_and_shutdown_finishes_in_flight(run_dir) -> None:
    running = Running(run_dir, max_batch=1, max_wait_ms=0.0, max_queue=1)
    try:
        body = {"prompt": PROMPT, "max_tokens": 64, "seed": 0}
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: post(running.url, "/v1/completions", body), range(8)))
        codes = sorted(r.status_code for r in answers)
        assert 429 in codes and 200 in codes, codes
        busy = next(r for r in answers if r.status_code == 429)
        assert busy.headers["retry-after"] == "1"
        assert busy.json()["error"]["type"] == "rate_limit"
        # graceful shutdown: a request in flight when the server is told to stop still answers
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(post, running.url, "/v1/completions", body)
            time.sleep(0.3)
            running.server.should_exit = True
            assert pending.result().status_code == 200
    finally:
        running.stop()


# ----------------------------------------------------------------------------- policies


def profile() -> Profile:
    """A made-up server: k = 4 steps 5x slower than k = 1; 5 tokens per request."""
    return Profile(
        [1, 2, 4],
        [1, 4, 8],
        {"1": [2.0, 3.0, 4.0], "2": [4.0, 6.0, 8.0], "4": [10.0, 15.0, 20.0]},
        {"1": 2.0, "2": 4.0, "4": 10.0},
        {"1": 0.10, "2": 0.14, "4": 0.15},
        prompt_tokens=8,
        max_tokens=5,
    )


def test_profile_interpolates_and_sums_a_step_over_its_ks() -> None:
    p = profile()
    assert p.one_step_ms(4, 6) == pytest.approx(17.5)  # between n = 4 and 8
    assert p.one_step_ms(4, 12) == pytest.approx(25.0)  # beyond 8, by the last slope
    assert p.step_time_ms({4: 4, 1: 1}) == pytest.approx(15.0 + 2.0)  # one forward per k
    p.scale = 2.0
    assert p.prefill_time_ms(2) == 8.0 and p.one_step_ms(1, 1) == 4.0


def test_rule_policy_keeps_every_running_request_in_time() -> None:
    rule = RulePolicy(profile(), deadline_ms=200.0, max_batch=8)
    assert rule.choose(QueueState(1, 0.0, max_tokens=5)) == 4  # 10 + 4 x 10 = 50 ms
    # 7 running at k = 4 with 4 tokens left, 60 ms old: one more at 4 still fits
    running = [(4, 60.0, 4)] * 7
    assert rule.choose(QueueState(1, 0.0, active=running, max_tokens=5)) == 4
    # 95 ms old: a k = 4 prefill and step (95 + 10 + 4 x 20 = 185 > 180) would make them late;
    # k = 2 keeps them in time (95 + 4 + 4 x (18.75 + 4) = 190 > 180: no); k = 1 is the floor
    late = [(4, 95.0, 4)] * 7
    assert rule.choose(QueueState(1, 0.0, active=late, max_tokens=5)) == 1
    # a request that waited long gets a small k so that it still makes it
    assert rule.choose(QueueState(1, 140.0, max_tokens=5)) == 2  # 140 + 4 + 4 x 4 = 160
    for state in (QueueState(3, 30.0, active=[(2, 50.0, 3)] * 3, max_tokens=5),):
        k = rule.choose(state)
        assert rule.fits(k, state) and not any(rule.fits(j, state) for j in (1, 2, 4) if j > k)


def test_rule_policy_keeps_up_with_the_arrival_rate_and_the_queue() -> None:
    p = profile()
    p.sustained = {"1": 100.0, "2": 60.0, "4": 20.0}
    rule = RulePolicy(p, deadline_ms=200.0, max_batch=8)
    assert rule.choose(QueueState(1, 0.0, arrival_rate=15.0, max_tokens=5)) == 4
    # 30/s is more than 0.9 x k = 4's sustained 20/s: k = 2 (0.9 x 60) keeps up
    assert rule.choose(QueueState(1, 0.0, arrival_rate=30.0, max_tokens=5)) == 2
    # 9 requests behind this one: at k = 4 they drain in 450 ms, at k = 2 in 150 ms + 36 ms
    # for the last one's own request (> 180), at k = 1 in 90 + 18 ms
    assert rule.choose(QueueState(10, 0.0, max_tokens=5)) == 1


def test_simulator_matches_a_request_alone_and_queues_under_load() -> None:
    p = profile()
    p.overhead_ms = 3.0
    one = simulate(StaticPolicy(2), p, rate=0.01, duration_s=200, deadline_ms=200, max_batch=8)
    assert one.requests >= 1 and one.p50_ms == pytest.approx(3.0 + 4.0 + 4 * 4.0)
    light = simulate(StaticPolicy(4), p, rate=5, duration_s=60, deadline_ms=200, max_batch=8)
    assert light.miss_rate < 0.01 and light.mean_k == 4 and light.mean_utility > 0.14
    # k = 4 serves about 8 / (8 x 10 + 4 x 20 ms) = 50 requests/s; at 150/s it falls behind
    heavy = {
        k: simulate(StaticPolicy(k), p, rate=150, duration_s=20, deadline_ms=200, max_batch=8)
        for k in (1, 2, 4)
    }
    assert heavy[4].miss_rate > 0.5 and heavy[1].miss_rate < 0.05
    assert heavy[4].refused > 0  # the bounded queue refuses what it cannot hold


def test_learned_policy_starts_as_the_rule_and_search_only_improves_it() -> None:
    p = profile()
    rule = RulePolicy(p, 200.0, 8)
    blank = LearnedPolicy(rule)
    state = QueueState(2, 30.0, active=[(4, 50.0, 2)] * 5, max_tokens=5)
    assert blank.choose(state) == rule.choose(state)
    learned = train_learned(
        p, deadline_ms=200, max_batch=8, rates=[20, 60, 120, 200], duration_s=6, passes=1
    )
    assert isinstance(learned, LearnedPolicy)
    assert learned.trained["utility_learned"] >= learned.trained["utility_rule"]
    for rate in (20, 120):
        sim = {
            name: simulate(
                policy, p, rate=rate, duration_s=20, deadline_ms=200, max_batch=8, seed=7
            ).mean_utility
            for name, policy in {
                "1": StaticPolicy(1),
                "2": StaticPolicy(2),
                "4": StaticPolicy(4),
                "learned": learned,
            }.items()
        }
        best_static = max(sim[k] for k in ("1", "2", "4"))
        assert sim["learned"] >= 0.95 * best_static, (rate, sim)


def test_train_policy_command_and_serving_with_it(run_dir, capsys) -> None:
    """Profile, calibrate against the real server (1 s of load), search, save; then serve."""
    args = ["serve", "train-policy", str(run_dir), "--max-batch", "2", "--max-tokens", "3"]
    args += ["--prompt-tokens", "8", "--passes", "1", "--repeats", "1", "--deadline-ms", "500"]
    assert main([*args, "--calibrate", "1"]) == 0
    text = capsys.readouterr().out
    assert "learned" in text and "static k=4" in text and "calibration: overhead" in text
    data = json.loads((run_dir / "serve" / "policy.json").read_text())
    assert data["version"] == 2 and data["policy"]["kind"] == "learned"
    prof = data["profile"]
    assert sorted(prof["step_ms"]) == sorted(prof["prefill_ms"]) == ["1", "2", "4"]
    assert prof["batch_sizes"] == [1, 2] and prof["scale"] > 0 and prof["overhead_ms"] >= 0
    assert sorted(prof["sustained"]) == ["1", "2", "4"] and all(
        rate > 0 for rate in prof["sustained"].values()
    )
    assert {"server_p50_ms", "simulated_p50_ms", "rate"} <= set(prof["calibration"])
    # learning again on the same profile (no measuring, no calibration)
    assert main([*args, "--keep-profile"]) == 0
    assert "calibration" not in capsys.readouterr().out
    again = json.loads((run_dir / "serve" / "policy.json").read_text())
    assert again["profile"] == prof
    from hyperrouter.serve.policies import build_policy

    policy_file = run_dir / "serve" / "policy.json"
    for kind in ("rule", "learned"):
        policy = build_policy(
            kind, k=None, num_experts=4, deadline_ms=500, max_batch=2, policy_file=policy_file
        )
        assert policy.choose(QueueState(1, 0.0, max_tokens=3)) in (1, 2, 4)
    assert main(["serve", str(run_dir), "--policy", "learned", "--deadline-ms", "100"]) == 2
    assert "trained for --deadline-ms 500" in capsys.readouterr().err
    assert main(["serve", str(run_dir), "--policy", "learned", "--deadline-ms", "500"]) == 2
    assert "trained for --max-batch 2, not 8" in capsys.readouterr().err
    assert main(["serve", str(run_dir), "--policy", "magic"]) == 2
    assert "unknown --policy" in capsys.readouterr().err
    assert main([*args, "--calibrate", "-1"]) == 2
    assert "--calibrate must be in [0, 600]" in capsys.readouterr().err


def test_bench_serve_command(run_dir, capsys, tmp_path) -> None:
    if not (run_dir / "serve" / "policy.json").is_file():
        test_train_policy_command_and_serving_with_it(run_dir, capsys)
    out = tmp_path / "bench.json"
    args = ["bench", "serve", str(run_dir), "--policies", "static:4,rule", "--rates", "5,40"]
    args += ["--duration", "1", "--deadline-ms", "500", "--max-batch", "2", "--json", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "goodput" in text and "rule" in text
    data = json.loads(out.read_text())
    records = data["records"]
    assert {(r["policy"], r["rate"]) for r in records} == {
        (p, r) for p in ("static:4", "rule") for r in (5.0, 40.0)
    }
    for r in records:
        assert r["requests"] > 0 and r["failed"] == 0
        assert 0 <= r["miss_rate"] <= 1 and r["mean_utility"] <= r["mean_quality"] + 1e-12
    static = [r for r in records if r["policy"] == "static:4"]
    assert all(r["mean_k"] == 4 for r in static if r["in_time"])
    assert main([*args[:3], "--policies", "static"]) == 2
    assert "bad --policies entry" in capsys.readouterr().err
    # default rates: around the closed-loop capacity the real server sustains at k = E
    out2 = tmp_path / "bench2.json"
    args2 = ["bench", "serve", str(run_dir), "--policies", "static:4", "--duration", "0.5"]
    assert main([*args2, "--max-batch", "2", "--json", str(out2)]) == 0
    text = capsys.readouterr().out
    assert "closed-loop capacity at k = 4" in text
    rates = [r["rate"] for r in json.loads(out2.read_text())["records"]]
    assert len(rates) == 5 and rates == sorted(rates) and rates[0] > 0


def test_streams_send_whole_characters_and_never_part_of_a_stop(served, reference) -> None:
    from hyperrouter.serve.engine import Sampling, Sequence, _complete_utf8

    assert _complete_utf8(b"a\xc3") == 1 and _complete_utf8(b"a\xc3\xa9") == 3
    assert _complete_utf8(b"\xe2\x98") == 0 and _complete_utf8(b"\xe2\x98\x83") == 3
    assert _complete_utf8(b"ab") == 2 and _complete_utf8(b"") == 0
    seq = Sequence([0], Sampling(stop=["ab", "xyz"]), None)
    seq.out_ids = reference.vocab.encode("hello xy")
    seq.text = reference.vocab.decode(seq.out_ids)
    assert reference._settled(seq) == "hello "  # "xy" may still become "xyz"
    seq.out_ids = reference.vocab.encode("hello a")
    seq.text = reference.vocab.decode(seq.out_ids)
    assert reference._settled(seq) == "hello "
    for seed in range(3):  # whatever is sampled, the stream equals the answer
        body = {"prompt": PROMPT, "max_tokens": 24, "seed": seed, "stop": ["e ", "th"], "k": 2}
        whole = post(served.url, "/v1/completions", body).json()["choices"][0]["text"]
        chunks = []
        with httpx.stream(
            "POST", served.url + "/v1/completions", json={**body, "stream": True}, timeout=60
        ) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunks.append(json.loads(line[6:])["choices"][0]["text"])
        assert "".join(chunks) == whole


def test_a_policy_file_for_another_model_is_refused(run_dir, capsys) -> None:
    from hyperrouter.errors import HyperRouterError
    from hyperrouter.serve.policies import build_policy

    policy_file = run_dir / "serve" / "policy.json"
    if not policy_file.is_file():
        test_train_policy_command_and_serving_with_it(run_dir, capsys)
    with pytest.raises(HyperRouterError, match=r"outside \[1, 2\]"):
        build_policy(
            "rule", k=None, num_experts=2, deadline_ms=500, max_batch=2, policy_file=policy_file
        )


def test_load_test_targets_are_read_from_the_records() -> None:
    """`bench serve`'s summary: sustained rates (< 1 % misses at that and every lower rate),
    the first rate where static k = E misses > 5 %, and utility against the best static k."""
    from hyperrouter.serve.loadtest import LoadRecord, format_targets, targets

    def rec(policy, rate, miss, quality, utility, se=0.001):
        return LoadRecord(
            policy,
            "poisson",
            rate,
            100,
            int(100 * (1 - miss)),
            0,
            0,
            0.0,
            miss,
            0.0,
            0.0,
            0.0,
            quality,
            utility,
            se,
        )

    records = [
        rec("static:4", 5, 0.0, 0.15, 0.15),
        rec("static:4", 10, 0.2, 0.15, 0.12),
        rec("static:4", 20, 0.9, 0.15, 0.015),
        rec("static:1", 5, 0.0, 0.10, 0.10),
        rec("static:1", 10, 0.0, 0.10, 0.10),
        rec("static:1", 20, 0.005, 0.10, 0.0995),
        rec("learned", 5, 0.0, 0.15, 0.15),
        rec("learned", 10, 0.005, 0.14, 0.139),
        rec("learned", 20, 0.02, 0.11, 0.09),
    ]
    t = targets(records, [1, 2, 4])
    assert t["sustained_rate"] == {"static:4": 5, "static:1": 20, "learned": 10}
    assert t["sustained_multiple"]["learned"] == 2.0
    assert t["first_rate_static_top_misses_5pct"] == 10
    row = t["at_that_rate"]["learned"]
    assert row["miss_rate"] == 0.005 and row["closer_to_top_than_static_low"] is True
    versus = {(v["rate"], v["policy"]): v for v in t["versus_best_static"]}
    assert versus[(10, "learned")]["best_static"] == "static:4"
    assert versus[(10, "learned")]["at_least_best_static"]
    assert not versus[(20, "learned")]["at_least_best_static"]  # 0.09 < 0.0995 - 0.0028
    assert "at 10/s (static k = E first misses > 5 %)" in format_targets(t)
