"""`hyperrouter bench serve`: open-loop load on a real server, per policy and arrival rate.

For each policy the server is started on a free loopback port (uvicorn in this process, the
model in its worker thread), then for each rate requests are sent at Poisson (or bursty: 1 s at
1.75 x rate, 1 s at 0.25 x) arrival times for a bounded time, whether or not earlier ones have
been answered (open loop), to 127.0.0.1 only. Each request is a completion of `max_tokens`
tokens after a prompt of `prompt_tokens` symbols. Reported per (policy, rate): goodput (requests
answered within the deadline per second), the share of misses (late, refused or failed), p50 and
p99 latency, the mean k that served, the mean quality of the answers (exp(-loss) at their k, from
the run's results.json) and the mean utility per request (its quality if in time, else 0).
"""

from __future__ import annotations

import asyncio
import random
import socket
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hyperrouter.errors import HyperRouterError
from hyperrouter.serve.policies import arrivals


@dataclass
class LoadRecord:
    policy: str
    pattern: str
    rate: float
    requests: int
    in_time: int
    refused: int
    failed: int
    goodput: float
    miss_rate: float
    p50_ms: float
    p99_ms: float
    mean_k: float
    mean_quality: float
    mean_utility: float
    utility_se: float = 0.0  # standard error of the mean utility (over the requests)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """uvicorn serving `app` in a thread on a free loopback port."""

    def __init__(self, app) -> None:
        import uvicorn

        self.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise HyperRouterError("the server did not start")
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=120)


async def _drive(
    url: str,
    rate: float,
    duration_s: float,
    deadline_ms: float,
    pattern: str,
    prompts: list[str],
    max_tokens: int,
    seed: int,
) -> list[dict[str, Any]]:
    import httpx

    rng = random.Random(seed)
    times = arrivals(rate, duration_s, rng, pattern)
    results: list[dict[str, Any]] = []
    limit = httpx.Limits(max_connections=512, max_keepalive_connections=64)
    timeout = httpx.Timeout(max(10.0, 20 * deadline_ms / 1000))
    async with httpx.AsyncClient(base_url=url, limits=limit, timeout=timeout) as client:
        start = time.perf_counter()

        async def one(i: int, at_ms: float) -> None:
            await asyncio.sleep(max(0.0, start + at_ms / 1000 - time.perf_counter()))
            body = {"prompt": prompts[i % len(prompts)], "max_tokens": max_tokens, "seed": i}
            sent = time.perf_counter()
            try:
                r = await client.post("/v1/completions", json=body)
                latency = (time.perf_counter() - sent) * 1e3
                k = r.json().get("k") if r.status_code == 200 else None
                results.append({"status": r.status_code, "latency_ms": latency, "k": k})
            except httpx.HTTPError:
                results.append({"status": 0, "latency_ms": float("inf"), "k": None})

        await asyncio.gather(*(one(i, t) for i, t in enumerate(times)))
    return results


def _drive_sync(*args, **kwargs) -> list[dict[str, Any]]:
    return asyncio.run(_drive(*args, **kwargs))


def drive_in_own_process(*args, **kwargs) -> list[dict[str, Any]]:
    """The load generator in a process of its own (spawned): its event loop and HTTP parsing do
    not share the server's GIL or its threads."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_drive_sync, *args, **kwargs).result()


def closed_loop_capacity(url: str, clients: int, seconds: float, prompts, max_tokens: int) -> float:
    """Requests per second the server answers with `clients` requests always in flight (each
    client sends its next request when its last is answered)."""

    async def run() -> float:
        import httpx

        done = 0
        stop = time.perf_counter() + seconds

        async def client(c: int) -> None:
            nonlocal done
            async with httpx.AsyncClient(base_url=url, timeout=120) as http:
                i = 0
                while time.perf_counter() < stop:
                    body = {"prompt": prompts[(c + i) % len(prompts)], "max_tokens": max_tokens}
                    r = await http.post("/v1/completions", json={**body, "seed": i})
                    done += r.status_code == 200
                    i += 1

        start = time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(clients)))
        return done / (time.perf_counter() - start)

    return asyncio.run(run())


def run_load(
    app_factory,
    policies: dict[str, Any],
    *,
    rates: list[float],
    duration_s: float,
    deadline_ms: float,
    pattern: str,
    prompts: list[str],
    max_tokens: int,
    quality: dict[str, float],
    progress: bool = False,
) -> list[LoadRecord]:
    """Every policy (a fresh server each) at every rate; `app_factory(policy)` builds the app."""
    records = []
    for name, policy in policies.items():
        server = LocalServer(app_factory(policy))
        try:
            for rate in rates:
                if progress:
                    print(f"  {name} at {rate:g} requests/s ...", flush=True)
                results = drive_in_own_process(
                    server.url,
                    rate,
                    duration_s,
                    deadline_ms,
                    pattern,
                    prompts,
                    max_tokens,
                    seed=int(rate * 1000),
                )
                records.append(
                    _summarise(name, pattern, rate, duration_s, deadline_ms, results, quality)
                )
                time.sleep(0.5)  # let the queue drain between rates
        finally:
            server.stop()
    return records


def _summarise(name, pattern, rate, duration_s, deadline_ms, results, quality) -> LoadRecord:
    n = len(results)
    ok = [r for r in results if r["status"] == 200]
    in_time = [r for r in ok if r["latency_ms"] <= deadline_ms]
    latencies = sorted(r["latency_ms"] for r in ok) or [float("nan")]
    utilities = [
        quality[str(r["k"])] if r["status"] == 200 and r["latency_ms"] <= deadline_ms else 0.0
        for r in results
    ]
    utility = sum(utilities) / max(n, 1)
    se = statistics.stdev(utilities) / n**0.5 if n > 1 else 0.0
    return LoadRecord(
        policy=name,
        pattern=pattern,
        rate=rate,
        requests=n,
        in_time=len(in_time),
        refused=sum(1 for r in results if r["status"] == 429),
        failed=sum(1 for r in results if r["status"] not in (200, 429)),
        goodput=round(len(in_time) / duration_s, 3),
        miss_rate=round(1 - len(in_time) / max(n, 1), 4),
        p50_ms=round(statistics.median(latencies), 1),
        p99_ms=round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 1),
        mean_k=round(statistics.fmean(r["k"] for r in ok), 3) if ok else float("nan"),
        mean_quality=round(statistics.fmean(quality[str(r["k"])] for r in ok), 5) if ok else 0.0,
        mean_utility=round(utility, 5),
        utility_se=round(se, 5),
    )


def targets(records: list[LoadRecord], ks: list[int]) -> dict[str, Any]:
    """The issue's questions, answered from one load test (policies named as `bench serve`
    names them: static:K, rule, learned):

    - per policy, the highest tested rate answered with < 1 % misses (and every lower tested
      rate too), and that rate as a multiple of static k = E's;
    - the first rate where static k = E misses more than 5 %, and there each policy's misses,
      mean quality, and whether its quality is closer to k = E's than static k = 1's is;
    - per rate, the learned (and rule) policy's mean utility against the best static k's, with
      the two standard errors combined (a difference within 2 of them is within the spread)."""
    by_policy: dict[str, list[LoadRecord]] = {}
    for r in records:
        by_policy.setdefault(r.policy, []).append(r)
    for rows in by_policy.values():
        rows.sort(key=lambda r: r.rate)
    out: dict[str, Any] = {"sustained_rate": {}}
    for name, rows in by_policy.items():
        best = None
        for r in rows:
            if r.miss_rate >= 0.01:
                break
            best = r.rate
        out["sustained_rate"][name] = best
    top, low = f"static:{max(ks)}", f"static:{min(ks)}"
    base = out["sustained_rate"].get(top)
    out["sustained_multiple"] = {
        name: (rate / base if rate is not None and base else None)
        for name, rate in out["sustained_rate"].items()
    }
    first = next((r.rate for r in by_policy.get(top, []) if r.miss_rate > 0.05), None)
    out["first_rate_static_top_misses_5pct"] = first
    if first is not None:
        at = {
            name: next((r for r in rows if r.rate == first), None)
            for name, rows in by_policy.items()
        }
        q_top = at.get(top).mean_quality if at.get(top) else None
        q_low = at.get(low).mean_quality if at.get(low) else None
        out["at_that_rate"] = {
            name: {
                "miss_rate": r.miss_rate,
                "mean_quality": r.mean_quality,
                "closer_to_top_than_static_low": (
                    None
                    if q_top is None or q_low is None
                    else abs(r.mean_quality - q_top) < abs(q_low - q_top)
                ),
            }
            for name, r in at.items()
            if r is not None
        }
    rates = sorted({r.rate for r in records})
    versus = []
    for rate in rates:
        rows = {r.policy: r for r in records if r.rate == rate}
        statics = [r for name, r in rows.items() if name.startswith("static:")]
        if not statics:
            continue
        best = max(statics, key=lambda r: r.mean_utility)
        for name in ("rule", "learned"):
            if name in rows:
                r = rows[name]
                spread = 2 * (r.utility_se**2 + best.utility_se**2) ** 0.5
                versus.append(
                    {
                        "rate": rate,
                        "policy": name,
                        "utility": r.mean_utility,
                        "best_static": best.policy,
                        "best_static_utility": best.mean_utility,
                        "spread": round(spread, 5),
                        "at_least_best_static": r.mean_utility >= best.mean_utility - spread,
                    }
                )
    out["versus_best_static"] = versus
    return out


def format_targets(t: dict[str, Any]) -> str:
    lines = ["highest tested rate with < 1 % misses (x static k = E's):"]
    for name, rate in t["sustained_rate"].items():
        multiple = t["sustained_multiple"].get(name)
        shown = "none" if rate is None else f"{rate:g}/s"
        lines.append(f"  {name:<12} {shown}" + (f" ({multiple:.2f}x)" if multiple else ""))
    first = t["first_rate_static_top_misses_5pct"]
    if first is None:
        lines.append("static k = E missed <= 5 % at every tested rate")
    else:
        lines.append(f"at {first:g}/s (static k = E first misses > 5 %):")
        for name, row in t["at_that_rate"].items():
            closer = row["closer_to_top_than_static_low"]
            note = "" if closer is None else (", quality closer to k = E" if closer else "")
            quality = f"quality {row['mean_quality']:.4f}"
            lines.append(f"  {name:<12} misses {row['miss_rate']:.1%}, {quality}{note}")
    for row in t["versus_best_static"]:
        mark = ">=" if row["at_least_best_static"] else "<"
        lines.append(
            f"  {row['rate']:g}/s {row['policy']}: utility {row['utility']:.4f} {mark} best static "
            f"({row['best_static']}) {row['best_static_utility']:.4f} within +-{row['spread']:.4f}"
        )
    return "\n".join(lines)


def format_records(records: list[LoadRecord]) -> str:
    lines = [
        f"{'policy':<12} {'rate/s':>7} {'n':>5} {'goodput/s':>9} {'misses':>7} {'p50 ms':>8} "
        f"{'p99 ms':>8} {'mean k':>7} {'quality':>8} {'utility':>8}"
    ]
    for r in records:
        lines.append(
            f"{r.policy:<12} {r.rate:>7.2f} {r.requests:>5} {r.goodput:>9.2f} {r.miss_rate:>7.1%} "
            f"{r.p50_ms:>8.1f} {r.p99_ms:>8.1f} {r.mean_k:>7.2f} {r.mean_quality:>8.4f} "
            f"{r.mean_utility:>8.4f}"
        )
    return "\n".join(lines)


def write_outputs(records: list[LoadRecord], meta: dict[str, Any], json_path: Path) -> Path | None:
    from hyperrouter.train.checkpoint import write_json_atomic

    write_json_atomic(json_path, {**meta, "records": [asdict(r) for r in records]})
    from hyperrouter.analysis.plots import _pyplot

    plt = _pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for name in dict.fromkeys(r.policy for r in records):
        rows = [r for r in records if r.policy == name]
        rates = [r.rate for r in rows]
        for ax, values in zip(
            axes,
            (
                [r.goodput for r in rows],
                [r.mean_quality for r in rows],
                [r.mean_utility for r in rows],
            ),
        ):
            ax.plot(rates, values, "o-", label=name, ms=3)
    for ax, label in zip(axes, ("goodput (answers in time / s)", "mean quality", "utility")):
        ax.set_xlabel("request rate (/s)")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    png = json_path.with_suffix(".png")
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def parse_policies(specs: list[str]) -> list[tuple[str, str, int | None]]:
    """`static:16`, `static:1`, `rule`, `learned` -> (label, kind, k)."""
    out = []
    for spec in specs:
        kind, _, k = spec.partition(":")
        if kind not in ("static", "rule", "learned") or (kind == "static") != bool(k):
            raise HyperRouterError(f"bad --policies entry {spec!r}: use static:K, rule or learned")
        try:
            out.append((spec, kind, int(k) if k else None))
        except ValueError:
            raise HyperRouterError(f"bad --policies entry {spec!r}: K must be an integer") from None
    return out
