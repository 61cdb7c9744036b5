"""Soak test of `hyperrouter serve`: memory and latency of the server over a long steady load.

    python benchmarks/serve_soak.py RUN_DIR [--minutes 10] [--rate R] [--policy rule] [--json PATH]

Starts the server on a free loopback port in this process (its worker thread runs the model),
sends open-loop Poisson traffic at --rate requests/s from a separate process for --minutes, and
every 30 s records the server process's resident memory (VmRSS from /proc/self/status) and the
window's latency percentiles. Prints one line per window and the change from the first window to
the last. 127.0.0.1 only; it stops by itself.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=4.0, help="requests/s (sustainable)")
    parser.add_argument("--policy", default="rule")
    parser.add_argument("--deadline-ms", type=float, default=1000.0)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--window", type=float, default=30.0, help="seconds per window")
    parser.add_argument("--json")
    parser.add_argument("--threads", type=int, help="torch threads (default: the cores less one)")
    args = parser.parse_args()

    from hyperrouter.cli import set_serving_threads

    set_serving_threads(args.threads)

    from hyperrouter.serve import loadtest
    from hyperrouter.serve.app import Server, create_app
    from hyperrouter.serve.engine import Engine
    from hyperrouter.serve.policies import build_policy
    from hyperrouter.train.checkpoint import run_folder
    from hyperrouter.train.evaluate import load_trained

    run = load_trained(args.run)
    engine = Engine(run)
    policy = build_policy(
        args.policy,
        k=None,
        num_experts=engine.num_experts,
        deadline_ms=args.deadline_ms,
        max_batch=8,
        policy_file=run_folder(args.run) / "serve" / "policy.json",
    )
    server = loadtest.LocalServer(create_app(Server(engine, policy, deadline_ms=args.deadline_ms)))
    prompts = ["ROMEO: what light through yonder window breaks? " * 2]
    windows = []
    ctx = multiprocessing.get_context("spawn")
    try:
        with ProcessPoolExecutor(1, mp_context=ctx) as pool:
            end = time.time() + args.minutes * 60
            i = 0
            while time.time() < end:
                results = pool.submit(
                    loadtest._drive_sync,
                    server.url,
                    args.rate,
                    args.window,
                    args.deadline_ms,
                    "poisson",
                    prompts,
                    args.max_tokens,
                    seed=i,
                ).result()
                ok = sorted(r["latency_ms"] for r in results if r["status"] == 200)
                row = {
                    "window": i,
                    "requests": len(results),
                    "answered": len(ok),
                    "misses": sum(1 for r in results if r["latency_ms"] > args.deadline_ms),
                    "p50_ms": round(statistics.median(ok), 1) if ok else None,
                    "p99_ms": round(ok[min(len(ok) - 1, int(0.99 * len(ok)))], 1) if ok else None,
                    "rss_mb": round(rss_mb(), 1),
                }
                windows.append(row)
                print(json.dumps(row), flush=True)
                i += 1
    finally:
        server.stop()
    first, last = windows[0], windows[-1]
    print(
        f"rss {first['rss_mb']} -> {last['rss_mb']} MB, p50 {first['p50_ms']} -> {last['p50_ms']} "
        f"ms over {len(windows)} windows of {args.window:g} s"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "windows": windows}, indent=1))


if __name__ == "__main__":
    main()
