"""scripts/table2.py: the Table 2 grid (jobs, commands, resume) and its table."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "table2.py"
LOCK = ".lock"  # a run folder's lock file: the pid of the process training it


@pytest.fixture(scope="module")
def table2():
    spec = importlib.util.spec_from_file_location("table2_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_run(out: Path, name: str, by_k: dict[str, float], valid: float, wall_s: float) -> None:
    folder = out / "runs" / name
    folder.mkdir(parents=True)
    results = {"by_top_k": by_k, "valid_accuracy": valid}
    (folder / "results.json").write_text(json.dumps(results))
    (folder / "wall.json").write_text(json.dumps({"s": wall_s}))


def test_jobs_and_commands(table2, tmp_path) -> None:
    jobs = table2.jobs(["sst2", "imdb"], {"hr": "pre/hr", "scratch": None}, [1, 2])
    assert [j["name"] for j in jobs][:3] == ["sst2-hr-s1", "sst2-hr-s2", "sst2-scratch-s1"]
    assert len(jobs) == 8
    cmd = table2.command(jobs[0], tmp_path, tmp_path / "out", ["steps=3"])
    assert cmd[:5] == [sys.executable, "-m", "hyperrouter", "finetune", "--config"]
    assert cmd[5] == "sst2-cpu" and str(tmp_path / "sst_sentences") in cmd
    assert cmd[cmd.index("--init") + 1] == "pre/hr" and "steps=3" in cmd and "seed=1" in cmd
    assert "--init" not in table2.command(jobs[2], tmp_path, tmp_path / "out", [])
    assert not table2.ready(jobs[0]) and table2.ready(jobs[2])  # pre/hr has no results.json


def test_summary_mean_and_sample_std(table2, tmp_path) -> None:
    ks = {"1": 0.5, "2": 0.6, "4": 0.7, "8": 0.8, "16": 0.9}
    fake_run(tmp_path, "sst2-hr-s1", ks, 0.70, 60.0)
    fake_run(tmp_path, "sst2-hr-s2", {k: v + 0.02 for k, v in ks.items()}, 0.72, 180.0)
    fake_run(tmp_path, "sst2-dense-s1", {"1": 0.8}, 0.81, 120.0)  # dense: one value for every k
    (tmp_path / "runs" / "sst2-dense-s2").mkdir()  # stopped part way: not counted
    rows = table2.summarize(tmp_path, ["sst2", "imdb"], ["hr", "dense", "scratch"])
    assert [(r["task"], r["init"], r["seeds"]) for r in rows] == [
        ("sst2", "hr", [1, 2]),
        ("sst2", "dense", [1]),
    ]
    hr, dense = rows
    assert hr["k1"][0] == pytest.approx(51.0) and hr["k1"][1] == pytest.approx(2**0.5)
    assert hr["valid"][0] == pytest.approx(71.0) and hr["wall_min"] == pytest.approx(2.0)
    assert dense["k16"] == (pytest.approx(80.0), None)
    md = table2.table_md(rows)
    assert "| sst2 (50%) | hr | 1,2 | 51.0 ± 1.4 | 61.0 ± 1.4 |" in md
    assert "| sst2 (50%) | dense | 1 | 80.0 | 80.0 |" in md


def test_bad_arguments(table2, tmp_path, capsys) -> None:
    for argv, message in (
        (["--tasks", "sst3"], "unknown task(s) sst3"),
        (["--init", "nopath"], "--init wants NAME=RUN_DIR"),
    ):
        with pytest.raises(SystemExit) as exc:
            table2.main(["--data-root", str(tmp_path), "--out", str(tmp_path / "o"), *argv])
        assert exc.value.code == 2 and message in capsys.readouterr().err


def test_grid_runs_resumes_and_writes_the_table(table2, tmp_path, capsys) -> None:
    from tests.test_data_tasks import sst_sentence_dir

    sst_sentence_dir(tmp_path / "data" / "sst_sentences")
    argv = ["--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "t2"), "--tasks", "sst2"]
    argv += ["--seeds", "1,2", "--jobs", "2", "--set", "steps=2", "--set", "eval_interval=2"]
    assert table2.main(argv) == 0
    first = capsys.readouterr().out
    assert "2 runs to do" in first and "sst2-scratch-s1: done" in first
    rows = json.loads((tmp_path / "t2" / "summary.json").read_text())
    assert len(rows) == 1 and rows[0]["seeds"] == [1, 2] and rows[0]["init"] == "scratch"
    assert "| sst2 (50%) | scratch | 1,2 |" in (tmp_path / "t2" / "table.md").read_text()
    assert table2.main(argv) == 0  # resumes: nothing left to run
    assert "0 runs to do" in capsys.readouterr().out


# --------------------------------------------------------------------------- bad input, failures

FAKE_OK = (
    "import json, pathlib, sys; d = pathlib.Path(sys.argv[1]); d.mkdir(parents=True); "
    "(d / 'results.json').write_text(json.dumps({'by_top_k': {'1': 0.5}, 'valid_accuracy': 0.5}))"
)
FAKE_FAIL = (
    "print('Traceback (most recent call last):'); print('hyperrouter: error: boom'); exit(3)"
)


def fake_command(job: dict, data_root: Path, out: Path, extra: list[str]) -> list[str]:
    """A stand-in for `hyperrouter finetune`: sst5 jobs fail, the others write results.json."""
    code = FAKE_FAIL if job["task"] == "sst5" else FAKE_OK
    return [sys.executable, "-c", code, str(out / "runs" / job["name"])]


def no_command(job: dict, data_root: Path, out: Path, extra: list[str]) -> list[str]:
    raise AssertionError(f"{job['name']} must not start")


def run_script(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """The script in a subprocess; a run past `timeout` (the old endless wait) fails the test."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        return subprocess.run(
            [sys.executable, str(SCRIPT), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"table2.py {' '.join(args)} still running after {timeout} s")


def base_args(tmp_path: Path, *tasks: str) -> list[str]:
    """--data-root with (empty) task folders for `tasks`, --out tmp/out, one seed."""
    for task in tasks:
        (
            tmp_path / "data" / {"sst2": "sst_sentences", "sst5": "sst_sentences"}.get(task, task)
        ).mkdir(parents=True, exist_ok=True)
    return ["--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--seeds", "1"]


def one_line_error(err: str, *parts: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for part in parts:
        assert part in lines[0], (part, lines[0])


def dead_pid() -> int:
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    return int(proc.stdout)


def test_bad_init_run_is_refused_instead_of_waited_for(tmp_path) -> None:
    args = [*base_args(tmp_path, "sst2"), "--tasks", "sst2", "--no-scratch"]
    not_a_run = tmp_path / "not_a_run"
    not_a_run.mkdir()
    stopped = tmp_path / "pre" / "runs" / "hr-seed1"  # config.json, stale metrics, dead .lock
    stopped.mkdir(parents=True)
    (stopped / "config.json").write_text("{}")
    (stopped / "metrics.jsonl").write_text("")
    (stopped / LOCK).write_text(f"{dead_pid()}\n")
    for f in stopped.iterdir():
        os.utime(f, (time.time() - 3600, time.time() - 3600))
    for path, why in (
        (tmp_path / "nowhere" / "run", "does not exist"),
        (not_a_run, "is not a hyperrouter run"),
        (stopped, "stopped before finishing"),
        (stopped.parent / "dense-seed1", "does not exist"),  # nothing beside it being trained
    ):
        proc = run_script(*args, "--init", f"hr={path}")
        assert proc.returncode == 2, proc.stderr
        one_line_error(proc.stderr, f"--init hr={path} {why}", "must be a finished run")
        assert not (tmp_path / "out").exists()


def test_jobs_zero_is_refused_instead_of_looping(tmp_path) -> None:
    for jobs in ("0", "-1"):
        proc = run_script(*base_args(tmp_path, "sst2"), "--tasks", "sst2", "--jobs", jobs)
        assert proc.returncode == 2
        one_line_error(proc.stderr, f"--jobs must be at least 1, got {jobs}")
        assert not (tmp_path / "out").exists()


def test_missing_task_data_is_refused_up_front(table2, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(table2, "command", no_command)
    out = ["--out", str(tmp_path / "out"), "--seeds", "1"]
    for root, tasks, message in (
        (tmp_path / "nonexistent", "sst2", "is not a folder; it must hold the task folders"),
        (tmp_path / "data", "sst2,imdb", "has no folder imdb/ for imdb"),
    ):
        (tmp_path / "data" / "sst_sentences").mkdir(parents=True, exist_ok=True)
        with pytest.raises(SystemExit) as exc:
            table2.main(["--data-root", str(root), *out, "--tasks", tasks])
        assert exc.value.code == 2
        one_line_error(capsys.readouterr().err, f"--data-root {root}", message, "sst_sentences/")
        assert not (tmp_path / "out").exists()


def test_bad_set_is_refused_up_front(table2, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(table2, "command", no_command)
    args = [*base_args(tmp_path, "sst2", "imdb"), "--tasks", "sst2,imdb", "--set", "steps=2"]
    for item, message in (
        ("stepz=3", "unknown config key 'stepz'; did you mean 'steps'?"),
        ("steps=many", "steps must be an integer"),
        ("pooling=middle", "pooling must be one of"),
        ("nothing", "--set expects key=value"),
        ("seed=5", "seed is set by --seeds"),
    ):
        with pytest.raises(SystemExit) as exc:
            table2.main([*args, "--set", item])
        assert exc.value.code == 2
        one_line_error(capsys.readouterr().err, message)
        assert not (tmp_path / "out").exists()


def test_bad_seeds_is_one_line_not_a_traceback(table2, tmp_path, capsys) -> None:
    for seeds, message in (
        ("abc", "--seeds wants comma-separated integers such as 1111,1112, got 'abc'"),
        ("1,,2", "got ''"),
        ("1,1", "--seeds lists 1 twice"),
    ):
        with pytest.raises(SystemExit) as exc:
            table2.main([*base_args(tmp_path, "sst2"), "--tasks", "sst2", "--seeds", seeds])
        assert exc.value.code == 2
        one_line_error(capsys.readouterr().err, message)
        assert not (tmp_path / "out").exists()


def test_wait_for_an_init_run_in_progress_is_bounded(table2, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(table2, "command", no_command)
    monkeypatch.setattr(table2, "POLL_S", 0.05, raising=False)  # old: 2 s
    run = tmp_path / "pre" / "hr"  # metrics.jsonl written just now, no results.json
    run.mkdir(parents=True)
    (run / "config.json").write_text("{}")
    (run / "metrics.jsonl").write_text('{"step": 50}\n')
    args = [*base_args(tmp_path, "sst2"), "--tasks", "sst2", "--no-scratch", "--init", f"hr={run}"]
    start = time.time()
    assert table2.main([*args, "--wait-minutes", "0.01"]) == 1
    assert time.time() - start < 30
    err = capsys.readouterr().err
    assert f"sst2-hr-s1 failed: --init hr={run} is being trained" in err
    assert "still not finished after --wait-minutes 0.01" in err.splitlines()[0]
    assert (tmp_path / "out" / "table.md").exists()


def test_waits_for_init_runs_being_trained_then_runs(table2, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(table2, "command", fake_command)
    monkeypatch.setattr(table2, "POLL_S", 0.05, raising=False)  # old: 2 s
    runs = tmp_path / "pre" / "runs"
    hr, dense = runs / "hr-seed1", runs / "dense-seed1"  # a compare grid: dense not started yet
    hr.mkdir(parents=True)
    (hr / LOCK).write_text(json.dumps({"pid": os.getpid()}))  # alive: this process
    assert table2.lock_owner(hr) == (os.getpid(), None) and table2.lock_owner(runs) == (None, None)
    (runs / LOCK).write_text(json.dumps({"pid": os.getpid(), "host": "elsewhere"}))
    assert table2.training(runs, 60) is None  # another machine's process: unknown
    (runs / LOCK).unlink()

    def pretrain() -> None:
        time.sleep(0.5)
        (hr / "results.json").write_text("{}")
        dense.mkdir()
        (dense / LOCK).write_text(f"{os.getpid()}\n")
        time.sleep(0.5)
        (dense / "results.json").write_text("{}")

    thread = threading.Thread(target=pretrain)
    args = [*base_args(tmp_path, "sst2"), "--tasks", "sst2", "--no-scratch"]
    args += ["--init", f"hr={hr}", "--init", f"dense={dense}", "--wait-minutes", "1"]
    thread.start()
    try:
        assert table2.main(args) == 0
    finally:
        thread.join()
    out = capsys.readouterr().out
    assert "sst2-hr-s1: done" in out and "sst2-dense-s1: done" in out
    assert "| sst2 (50%) | dense | 1 |" in (tmp_path / "out" / "table.md").read_text()


def test_failed_job_exits_nonzero_and_keeps_the_table(
    table2, tmp_path, capsys, monkeypatch
) -> None:
    monkeypatch.setattr(table2, "command", fake_command)
    monkeypatch.setattr(table2, "POLL_S", 0.05, raising=False)  # old: 2 s
    args = [*base_args(tmp_path, "sst2", "sst5"), "--tasks", "sst2,sst5"]
    assert table2.main(args) == 1
    err = capsys.readouterr().err
    log = tmp_path / "out" / "logs" / "sst5-scratch-s1.log"
    line = f"sst5-scratch-s1 failed: exit 3: hyperrouter: error: boom (log: {log})"
    assert line in err and "1 of 2 runs failed" in err
    rows = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [(r["task"], r["seeds"]) for r in rows] == [("sst2", [1])]
    assert "| sst2 (50%) | scratch | 1 |" in (tmp_path / "out" / "table.md").read_text()
