"""Paper Table 2 at CPU scale: fine-tune pretrained runs on SST-2, SST-5, IMDB and BANKING77.

Runs `hyperrouter finetune --config <task>-cpu` for every task x init x seed (the from-scratch
control is the init `scratch`), `--jobs` at a time with one thread each, then writes the table
(test accuracy at every k, mean ± sample std over seeds) to OUT/table.md and OUT/summary.json.

It resumes: a run whose results.json exists is kept; a run folder without one (stopped part way)
is removed and run again. A job whose init run has no results.json yet (still pretraining) waits
for it, so this can start while the pretraining runs are still going.

    python scripts/table2.py --data-root ../shared/data --out table2 \\
        --init hyperrouter=sweeps/t2/runs/hyperrouter-seed1111 \\
        --init smoe_dropout=sweeps/t2/runs/smoe_dropout-seed1111 \\
        --init dense=sweeps/t2/runs/dense_ffn-seed1111 --jobs 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

TASK_DATA = {
    "sst2": "sst_sentences",
    "sst5": "sst_sentences",
    "imdb": "imdb",
    "banking77": "banking77",
}
# majority class of the test split (BANKING77: 40 queries per intent)
CHANCE = {"sst2": "50%", "sst5": "29%", "imdb": "50%", "banking77": "1.3%"}
KS = ["1", "2", "4", "8", "16"]


def jobs(tasks: list[str], inits: dict[str, str | None], seeds: list[int]) -> list[dict]:
    return [
        {"task": t, "init": name, "path": path, "seed": s, "name": f"{t}-{name}-s{s}"}
        for t in tasks
        for name, path in inits.items()
        for s in seeds
    ]


def command(job: dict, data_root: Path, out: Path, extra: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "hyperrouter", "finetune", "--config", f"{job['task']}-cpu"]
    cmd += ["--data", str(data_root / TASK_DATA[job["task"]]), "--set", f"seed={job['seed']}"]
    if job["path"]:
        cmd += ["--init", job["path"]]
    for item in extra:
        cmd += ["--set", item]
    return [*cmd, "--no-progress", "--out", str(out / "runs" / job["name"])]


def ready(job: dict) -> bool:
    return job["path"] is None or (Path(job["path"]) / "results.json").exists()


def run_all(todo: list[dict], data_root: Path, out: Path, n_jobs: int, extra: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    running: list[tuple[dict, subprocess.Popen, float]] = []
    pending = list(todo)
    while pending or running:
        for item in list(running):
            job, proc, start = item
            if proc.poll() is not None:
                running.remove(item)
                wall = time.time() - start
                status = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
                print(f"{job['name']}: {status} in {wall / 60:.1f} min", flush=True)
                if proc.returncode == 0:
                    (out / "runs" / job["name"] / "wall.json").write_text(json.dumps({"s": wall}))
        while len(running) < n_jobs:
            job = next((j for j in pending if ready(j)), None)
            if job is None:
                break
            pending.remove(job)
            folder = out / "runs" / job["name"]
            if folder.exists():
                shutil.rmtree(folder)  # stopped part way: start again
            log = (out / "logs" / f"{job['name']}.log").open("w")
            proc = subprocess.Popen(
                command(job, data_root, out, extra), stdout=log, stderr=subprocess.STDOUT, env=env
            )
            print(f"{job['name']}: started", flush=True)
            running.append((job, proc, time.time()))
        time.sleep(2)


def summarize(out: Path, tasks: list[str], inits: list[str]) -> list[dict]:
    """One row per (task, init) with every finished seed: mean ± sample std at every k."""
    rows = []
    for task in tasks:
        for init in inits:
            results = []
            for folder in sorted((out / "runs").glob(f"{task}-{init}-s*")):
                if (folder / "results.json").exists():
                    r = json.loads((folder / "results.json").read_text())
                    wall = folder / "wall.json"
                    r["wall_s"] = json.loads(wall.read_text())["s"] if wall.exists() else None
                    r["seed"] = int(folder.name.rsplit("-s", 1)[1])
                    results.append(r)
            if not results:
                continue
            row = {"task": task, "init": init, "seeds": [r["seed"] for r in results]}
            for k in KS:
                values = [100 * r["by_top_k"].get(k, r["by_top_k"].get("1")) for r in results]
                row[f"k{k}"] = (statistics.mean(values), _std(values))
            valid = [100 * r["valid_accuracy"] for r in results]
            row["valid"] = (statistics.mean(valid), _std(valid))
            walls = [r["wall_s"] / 60 for r in results if r["wall_s"] is not None]
            row["wall_min"] = statistics.mean(walls) if walls else None
            rows.append(row)
    return rows


def _std(values: list[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else None


def _cell(mean_std: tuple[float, float | None]) -> str:
    mean, std = mean_std
    return f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"


def table_md(rows: list[dict]) -> str:
    head = "| task (chance) | init | seeds | " + " | ".join(f"acc k={k}" for k in KS)
    lines = [head + " | valid acc | wall (min) |", "|---" * (len(KS) + 5) + "|"]
    for row in rows:
        wall = f"{row['wall_min']:.1f}" if row["wall_min"] is not None else "-"
        cells = " | ".join(_cell(row[f"k{k}"]) for k in KS)
        seeds = ",".join(str(s) for s in row["seeds"])
        task = f"{row['task']} ({CHANCE[row['task']]})"
        valid = _cell(row["valid"])
        lines.append(f"| {task} | {row['init']} | {seeds} | {cells} | {valid} | {wall} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", type=Path, required=True, help="folder holding the task folders")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--init", action="append", default=[], metavar="NAME=RUN_DIR")
    p.add_argument("--tasks", default="sst2,sst5,imdb,banking77")
    p.add_argument("--seeds", default="1111,1112")
    p.add_argument("--no-scratch", action="store_true", help="skip the from-scratch control")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="passed to every run (changes the presets: say so with the results)",
    )
    p.add_argument("--table-only", action="store_true", help="only (re)write the table")
    args = p.parse_args(argv)
    tasks = args.tasks.split(",")
    unknown = [t for t in tasks if t not in TASK_DATA]
    if unknown:
        p.error(f"unknown task(s) {', '.join(unknown)}; valid: {', '.join(TASK_DATA)}")
    inits: dict[str, str | None] = {}
    for item in args.init:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            p.error(f"--init wants NAME=RUN_DIR, got {item!r}")
        inits[name] = path
    if not args.no_scratch:
        inits["scratch"] = None
    seeds = [int(s) for s in args.seeds.split(",")]
    (args.out / "logs").mkdir(parents=True, exist_ok=True)
    (args.out / "runs").mkdir(exist_ok=True)
    if not args.table_only:
        todo = [
            j
            for j in jobs(tasks, inits, seeds)
            if not (args.out / "runs" / j["name"] / "results.json").exists()
        ]
        print(f"{len(todo)} runs to do", flush=True)
        run_all(todo, args.data_root, args.out, args.jobs, args.set)
    rows = summarize(args.out, tasks, list(inits))
    (args.out / "summary.json").write_text(json.dumps(rows, indent=1))
    (args.out / "table.md").write_text(table_md(rows))
    print(table_md(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
