"""Paper Table 2 at CPU scale: fine-tune pretrained runs on SST-2, SST-5, IMDB and BANKING77.

Runs `hyperrouter finetune --config <task>-cpu` for every task x init x seed (the from-scratch
control is the init `scratch`), `--jobs` at a time with one thread each, then writes the table
(test accuracy at every k, mean ± sample std over seeds) to OUT/table.md and OUT/summary.json.

Every argument is checked before anything is written: the seeds, the task folders under
--data-root, the --init runs and the --set overrides (with the finetune config parser); a bad one
is a one-line error. A job that fails is reported with the last line of its log (OUT/logs/) and
makes the exit status non-zero; the table still holds the jobs that finished.

It resumes: a run whose results.json exists is kept; a run folder without one (stopped part way)
is removed and run again. A job whose init run is still being trained (a `.lock` naming a live
process, or metrics.jsonl written within --stale-minutes; a run folder that does not exist yet
counts when a run beside it is being trained, as under `hyperrouter compare`) waits for it, at
most --wait-minutes, so this can start while the pretraining runs are still going. An init run
that is neither finished nor being trained is an error.

    python scripts/table2.py --data-root ../shared/data --out table2 \\
        --init hyperrouter=sweeps/t2/runs/hyperrouter-seed1111 \\
        --init smoe_dropout=sweeps/t2/runs/smoe_dropout-seed1111 \\
        --init dense=sweeps/t2/runs/dense_ffn-seed1111 --jobs 2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import NoReturn

TASK_DATA = {
    "sst2": "sst_sentences",
    "sst5": "sst_sentences",
    "imdb": "imdb",
    "banking77": "banking77",
}
# majority class of the test split (BANKING77: 40 queries per intent)
CHANCE = {"sst2": "50%", "sst5": "29%", "imdb": "50%", "banking77": "1.3%"}
KS = ["1", "2", "4", "8", "16"]
SCRIPT_KEYS = {"seed": "--seeds", "data": "--data-root", "task": "--tasks"}  # not for --set
LOCK_FILE = ".lock"  # a run folder's lock: the pid of the process training it
ACTIVITY_FILES = ("metrics.jsonl", "config.json", "checkpoints/index.json", "results.json")
POLL_S = 2.0  # seconds between looks at the running jobs and the init runs


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


# --------------------------------------------------------------------------- init runs


def finished(run: Path) -> bool:
    """A finished run (results.json) or a checkpoint folder (model.safetensors)."""
    return (run / "results.json").is_file() or (run / "model.safetensors").is_file()


def ready(job: dict) -> bool:
    return job["path"] is None or finished(Path(job["path"]))


def lock_owner(run: Path) -> tuple[int | None, str | None]:
    """(pid, host) from RUN/.lock (JSON {"pid", "host"} or a bare pid); None where unknown."""
    try:
        text = (run / LOCK_FILE).read_text()
    except (OSError, UnicodeDecodeError):
        return None, None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    if isinstance(data, dict):
        pid, host = data.get("pid"), data.get("host")
        return (pid if isinstance(pid, int) else None), (host if isinstance(host, str) else None)
    match = re.fullmatch(r"\s*(\d+)\s*", text)
    return (int(match.group(1)) if match else None), None


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    except OSError:
        return False
    return True


def training(folder: Path, stale_s: float) -> str | None:
    """Why FOLDER looks like a run being trained right now (a .lock naming a live process of
    this machine, or run files written within `stale_s`), or None."""
    pid, host = lock_owner(folder)
    if pid is not None and host in (None, socket.gethostname()) and pid_alive(pid):
        return f"{folder.name}/{LOCK_FILE} names the live process {pid}"
    times = [(folder / f).stat().st_mtime for f in ACTIVITY_FILES if (folder / f).is_file()]
    if times and time.time() - max(times) < stale_s:
        return f"{folder.name} wrote files {(time.time() - max(times)) / 60:.1f} min ago"
    return None


def init_state(run: Path, stale_s: float) -> tuple[str, str]:
    """("finished" | "training" | "bad", why) of an --init run folder. A folder that does not
    exist yet counts as training while its parent or grandparent holds a live lock or a run
    beside it is being trained (a `hyperrouter compare` sweep: SWEEP/runs/METHOD-seedS)."""
    if run.is_dir() and finished(run):
        return "finished", ""
    if not run.exists():
        parent = run.parent
        siblings = sorted(p for p in parent.iterdir() if p.is_dir()) if parent.is_dir() else []
        for folder in (parent, parent.parent, *siblings):
            why = training(folder, stale_s)
            if why is not None:
                return "training", f"does not exist yet ({why})"
        return "bad", "does not exist"
    if not run.is_dir():
        return "bad", "is not a folder"
    why = training(run, stale_s)
    if why is not None:
        return "training", f"is being trained ({why})"
    if (run / "config.json").is_file():
        return "bad", (
            f"stopped before finishing (no results.json, no live {LOCK_FILE}, nothing written "
            f"for {stale_s / 60:g} min); resume it with `hyperrouter train --resume --out {run}`"
        )
    return "bad", "is not a hyperrouter run (no results.json, config.json or model.safetensors)"


# --------------------------------------------------------------------------- the grid


def last_line(path: Path) -> str:
    """The last non-empty line of a log file ("" without one)."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return next((line.strip() for line in reversed(lines) if line.strip()), "")


def run_all(
    todo: list[dict],
    data_root: Path,
    out: Path,
    n_jobs: int,
    extra: list[str],
    wait_s: float = 12 * 3600,
    stale_s: float = 1800,
) -> list[tuple[str, str]]:
    """Run the jobs, `n_jobs` at a time; returns (job name, reason) for every job that failed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    running: list[tuple[dict, subprocess.Popen, float]] = []
    pending = list(todo)
    failed: list[tuple[str, str]] = []
    start_all = time.time()
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
                else:
                    log = out / "logs" / f"{job['name']}.log"
                    line = last_line(log) or "(empty log)"
                    failed.append((job["name"], f"exit {proc.returncode}: {line} (log: {log})"))
        states = {j["path"]: init_state(Path(j["path"]), stale_s) for j in pending if not ready(j)}
        out_of_time = time.time() - start_all > wait_s
        for job in [j for j in pending if j["path"] in states]:
            state, why = states[job["path"]]
            if state == "finished" or (state == "training" and not out_of_time):
                continue  # starts below, or later
            if state == "training":
                why = f"{why}, still not finished after --wait-minutes {wait_s / 60:g}"
            pending.remove(job)
            print(f"{job['name']}: FAILED (init run not ready)", flush=True)
            failed.append((job["name"], f"--init {job['init']}={job['path']} {why}"))
        while len(running) < n_jobs:
            job = next((j for j in pending if ready(j)), None)
            if job is None:
                break
            pending.remove(job)
            folder = out / "runs" / job["name"]
            if folder.exists():
                shutil.rmtree(folder)  # stopped part way: start again
            with (out / "logs" / f"{job['name']}.log").open("w") as log:
                proc = subprocess.Popen(
                    command(job, data_root, out, extra),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
            print(f"{job['name']}: started", flush=True)
            running.append((job, proc, time.time()))
        if pending or running:
            time.sleep(POLL_S)
    return failed


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


# --------------------------------------------------------------------------- arguments


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr (exit status 2), without the usage."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def parse_seeds(text: str) -> list[int]:
    """'1111,1112' -> [1111, 1112]; ValueError naming the bad item."""
    seeds = []
    for item in text.split(","):
        try:
            seed = int(item.strip())
        except ValueError:
            raise ValueError(
                f"--seeds wants comma-separated integers such as 1111,1112, got {item.strip()!r}"
            ) from None
        if seed in seeds:
            raise ValueError(f"--seeds lists {seed} twice")
        seeds.append(seed)
    return seeds


def parse_inits(items: list[str], scratch: bool) -> dict[str, str | None]:
    """NAME=RUN_DIR items (and the from-scratch control) -> {name: path}; ValueError if bad."""
    inits: dict[str, str | None] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--init wants NAME=RUN_DIR, got {item!r}")
        if not re.fullmatch(r"[\w.+-]+", name):
            raise ValueError(
                f"--init name {name!r} may hold only letters, digits and _ . + - (it names folders)"
            )
        if scratch and name == "scratch":
            raise ValueError("--init name 'scratch' is the from-scratch control's; rename it")
        if name in inits:
            raise ValueError(f"--init name {name!r} is given twice")
        inits[name] = path
    if scratch:
        inits["scratch"] = None
    return inits


def check_data(data_root: Path, tasks: list[str]) -> str | None:
    """Why --data-root lacks the folder of a task (as `hyperrouter finetune --data` reads it)."""
    needed = ", ".join(f"{folder}/ ({task})" for task, folder in TASK_DATA.items())
    if not data_root.is_dir():
        return f"--data-root {data_root} is not a folder; it must hold the task folders {needed}"
    for task in tasks:
        folder = data_root / TASK_DATA[task]
        if not folder.is_dir():
            return (
                f"--data-root {data_root} has no folder {TASK_DATA[task]}/ for {task} "
                f"(expected {folder}); the task folders are {needed}"
            )
    return None


def check_overrides(tasks: list[str], extra: list[str], data_root: Path) -> str | None:
    """Why a --set item is not a valid finetune override of a task's preset, or None."""
    from hyperrouter.errors import HyperRouterError
    from hyperrouter.train.config import parse_override
    from hyperrouter.train.finetune import load_finetune_config

    for item in extra:
        try:
            keys, _ = parse_override(item)
        except HyperRouterError as err:
            return str(err)
        if keys[0] in SCRIPT_KEYS:
            return f"--set {item!r}: {keys[0]} is set by {SCRIPT_KEYS[keys[0]]}, not by --set"
    for task in sorted(set(tasks)):
        data = f"data={data_root / TASK_DATA[task]}"
        for i, item in enumerate(extra):  # the first item that breaks the preset
            try:
                load_finetune_config(f"{task}-cpu", ["seed=1", *extra[: i + 1], data])
            except HyperRouterError as err:
                return f"--set {item!r} does not fit the {task}-cpu preset: {err}"
    return None


def check_inits(todo: list[dict], stale_s: float) -> str | None:
    """Why an --init run can never be ready (missing, not a run, stopped), or None."""
    seen: dict[str, str] = {j["path"]: j["init"] for j in todo if j["path"] is not None}
    for path, name in seen.items():
        state, why = init_state(Path(path), stale_s)
        if state == "bad":
            return f"--init {name}={path} {why}; it must be a finished run or one being trained"
        if state == "finished":
            from hyperrouter.errors import HyperRouterError
            from hyperrouter.train.checkpoint import resolve_checkpoint

            try:
                resolve_checkpoint(path)
            except HyperRouterError as err:
                return f"--init {name}={path} is not a usable run: {err}"
    return None


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="table2.py", description=__doc__.split("\n\n")[0])
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
    p.add_argument(
        "--wait-minutes",
        type=float,
        default=720.0,
        help="longest wait for --init runs still being trained (default 720)",
    )
    p.add_argument(
        "--stale-minutes",
        type=float,
        default=30.0,
        help="an --init run without a live .lock that wrote nothing for this long has stopped "
        "(default 30)",
    )
    p.add_argument("--table-only", action="store_true", help="only (re)write the table")
    args = p.parse_args(argv)
    tasks = args.tasks.split(",")
    unknown = [t for t in tasks if t not in TASK_DATA]
    if unknown:
        p.error(f"unknown task(s) {', '.join(unknown)}; valid: {', '.join(TASK_DATA)}")
    if len(set(tasks)) < len(tasks):
        p.error(f"--tasks lists a task twice: {args.tasks}")
    if args.jobs < 1:
        p.error(f"--jobs must be at least 1, got {args.jobs}")
    if not args.wait_minutes >= 0:
        p.error(f"--wait-minutes must be >= 0, got {args.wait_minutes:g}")
    if not args.stale_minutes > 0:
        p.error(f"--stale-minutes must be > 0, got {args.stale_minutes:g}")
    try:
        seeds = parse_seeds(args.seeds)
        inits = parse_inits(args.init, scratch=not args.no_scratch)
    except ValueError as err:
        p.error(str(err))
    wait_s, stale_s = args.wait_minutes * 60, args.stale_minutes * 60
    todo = [
        j
        for j in jobs(tasks, inits, seeds)
        if not (args.out / "runs" / j["name"] / "results.json").exists()
    ]
    if not args.table_only and todo:
        todo_tasks = sorted({j["task"] for j in todo}, key=tasks.index)
        problem = (
            check_data(args.data_root, todo_tasks)
            or check_inits(todo, stale_s)
            or check_overrides(todo_tasks, args.set, args.data_root)
        )
        if problem:
            p.error(problem)
    (args.out / "logs").mkdir(parents=True, exist_ok=True)
    (args.out / "runs").mkdir(exist_ok=True)
    failed: list[tuple[str, str]] = []
    if not args.table_only:
        print(f"{len(todo)} runs to do", flush=True)
        failed = run_all(todo, args.data_root, args.out, args.jobs, args.set, wait_s, stale_s)
    rows = summarize(args.out, tasks, list(inits))
    (args.out / "summary.json").write_text(json.dumps(rows, indent=1))
    (args.out / "table.md").write_text(table_md(rows))
    print(table_md(rows))
    for name, reason in failed:
        print(f"{p.prog}: {name} failed: {reason}", file=sys.stderr)
    if failed:
        print(f"{p.prog}: {len(failed)} of {len(todo)} runs failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
