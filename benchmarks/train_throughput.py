"""Training tokens/s of every method at a preset, each run alone on the machine.

For each method (the presets of configs/compare/methods.yaml or any registered router name), run
`hyperrouter train` with the method's settings (exactly those `hyperrouter compare` uses) for a
short budget, one method after the other, and read the training tokens/s the trainer logs per
log interval (metrics.jsonl). The first interval (start-up, first allocations, warm-up of the
allocator) is dropped; the median of the others is the method's number. Nothing else should run
on the machine meanwhile.

    python benchmarks/train_throughput.py --data ../shared/data/enwik8/enwik6 \\
        --methods switch,xmoe,smear --steps 120 --log-interval 20 --json train-alone.json

The learning-rate schedule, the top-k schedule and the router's own stages follow the short
budget (e.g. StableMoE stays in stage 1 unless its switch_step is reached), so a router whose
cost changes over training is timed in its early phase; say so when reporting.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from hyperrouter.analysis.compare import method_overrides, parse_methods
from hyperrouter.errors import HyperRouterError
from hyperrouter.train.config import load_config


def interval_speeds(metrics: Path) -> list[float]:
    """Training tokens/s of every logged interval, in step order."""
    speeds = []
    for line in metrics.read_text().splitlines():
        row = json.loads(line)
        if row.get("split") == "train" and row.get("tokens_per_second"):
            speeds.append(float(row["tokens_per_second"]))
    return speeds


def time_method(method: str, args: argparse.Namespace, workdir: Path) -> dict:
    base = load_config(args.config)
    overrides = method_overrides(method, base)
    out = workdir / method
    command = [sys.executable, "-m", "hyperrouter", "train", "--config", args.config]
    if args.data:
        command += ["--data", args.data]
    for item in [
        *overrides,
        f"train.steps={args.steps}",
        f"train.log_interval={args.log_interval}",
        f"train.eval_interval={args.steps + 1}",
        "eval.top_ks=[1]",
        "eval.max_valid_batches=1",
        *args.set,
    ]:
        command += ["--set", item]
    command += ["--no-progress", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{method}: hyperrouter train failed:\n{done.stderr[-2000:]}")
    speeds = interval_speeds(out / "metrics.jsonl")
    if len(speeds) < 2:
        raise SystemExit(f"{method}: fewer than two logged intervals; lower --log-interval")
    kept = speeds[1:]
    return {"median": statistics.median(kept), "intervals": speeds, "overrides": overrides}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", required=True, help="comma-separated methods")
    parser.add_argument("--config", default="enwik8-hyperrouter-cpu")
    parser.add_argument("--data", default=None)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--log-interval", type=int, default=20)
    parser.add_argument("--set", action="append", default=[], help="extra KEY=VALUE overrides")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    if args.steps < 2 * args.log_interval:
        parser.error("--steps must be at least twice --log-interval")
    try:
        methods = parse_methods(args.methods)
    except HyperRouterError as err:
        parser.error(str(err))
    results = {
        "config": args.config,
        "data": args.data,
        "steps": args.steps,
        "log_interval": args.log_interval,
        "threads": os.environ.get("OMP_NUM_THREADS", "torch default"),
        "methods": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            result = time_method(method, args, Path(tmp))
            results["methods"][method] = result
            print(f"{method:>16}: {result['median']:9,.0f} training tokens/s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
