"""A newcomer's second hour: run folders two processes cannot share, numbers as people type them,
keys that would be silently ignored, runs that diverge without a NaN, output that says what it did,
and `| head` that ends quietly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hyperrouter.cli import main
from hyperrouter.train.config import config_from_dict, load_config
from hyperrouter.train.runlock import LOCK_FILE, RunLock
from hyperrouter.train.trainer import train_run
from tests.test_train import tiny_config

pytestmark = pytest.mark.usefixtures("isolated_cache")  # corpus: tests/conftest.py


def _yaml(tmp_path: Path, corpus: Path, **train) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(json.dumps(tiny_config(corpus, train=train)))
    return path


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


# --------------------------------------------------------------------------- run folder lock


def _wait_for(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_second_run_into_the_same_folder_is_refused_while_the_first_runs(
    tmp_path, corpus, capsys
) -> None:
    config = _yaml(tmp_path, corpus, steps=100_000, eval_interval=100_000)
    out = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", "hyperrouter", "train", "--config", str(config), "--out", str(out)]
        + ["--no-progress"],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(lambda: (out / "metrics.jsonl").is_file() or first.poll() is not None)
        assert first.poll() is None, first.stderr.read()
        before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
        for args in (
            ["train", "--config", str(config), "--out", str(out), "--no-progress"],
            ["train", "--out", str(out), "--resume", "--no-progress"],
        ):
            assert main(args) == 2
            err = _one_line_error(capsys)
            assert f"{out} is in use by another hyperrouter run (pid {first.pid}" in err
        assert (out / "config.json").read_bytes() == before["config.json"]  # nothing written
        # the owner is killed: its lock is left behind and taken over by the next run
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == first.pid
        lock = RunLock(out)
        lock.acquire()
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
        lock.release()
        assert not (out / LOCK_FILE).exists()
    finally:
        if first.poll() is None:
            first.kill()
        first.stderr.close()


def test_a_lock_left_by_a_dead_process_does_not_stop_a_new_run(tmp_path, corpus) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text(json.dumps({"pid": 2**22 + 12345, "host": "x"}))
    cfg = config_from_dict(tiny_config(corpus))
    results = train_run(cfg, out, progress=False, log=lambda _: None)
    assert results["by_top_k"]
    assert not (out / LOCK_FILE).exists()


def test_finetune_and_compare_hold_the_lock(tmp_path, corpus, capsys) -> None:
    busy = tmp_path / "busy"
    lock = RunLock(busy)
    lock.acquire()
    try:
        args = ["finetune", "--task", "sst2", "--data", str(tmp_path), "--out", str(busy)]
        assert main([*args, "--no-progress"]) == 2
        assert "is in use by another hyperrouter run" in _one_line_error(capsys)
        args = ["compare", "--methods", "smoe", "--seeds", "1", "--data", str(corpus)]
        assert main([*args, "--out", str(busy), "--no-progress"]) == 2
        assert "is in use by another hyperrouter run" in _one_line_error(capsys)
        assert [p.name for p in busy.iterdir()] == [LOCK_FILE]
    finally:
        lock.release()
    assert not busy.exists()  # the lock made the folder and took it away again


def test_a_run_that_fails_on_bad_input_leaves_no_folder(tmp_path, capsys) -> None:
    out = tmp_path / "never"
    args = ["train", "--config", "quick", "--data", str(tmp_path / "missing.txt")]
    assert main([*args, "--out", str(out), "--no-progress"]) == 2
    _one_line_error(capsys)
    assert not out.exists()


# --------------------------------------------------------------------------- numbers and keys


@pytest.mark.parametrize(
    ("setting", "key", "value"),
    [
        ("train.lr=1e-3", "lr", 1e-3),
        ("train.lr=2.5E-4", "lr", 2.5e-4),
        ("train.steps=5E4", "steps", 50_000),
        ("train.steps=1_000", "steps", 1000),
        ("train.warmup_steps=1e2", "warmup_steps", 100),
        ("train.clip=-0.0e0", "clip", 0.0),
    ],
)
def test_numbers_as_people_type_them(setting: str, key: str, value) -> None:
    config = load_config("quick", [setting])
    got = getattr(config.train, key)
    assert got == value and type(got) is type(value)


def test_numbers_in_yaml_files_and_router_options(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("base: quick\ntrain: {lr: 3e-4}\nmoe: {router: switch}\n")
    assert load_config(str(path)).train.lr == 3e-4
    options = ["moe.router=switch", "moe.router_options.capacity_factor=1.25e0"]
    assert load_config("quick", options).moe.router_options["capacity_factor"] == 1.25


@pytest.mark.parametrize(
    ("setting", "needle"),
    [
        ("train.lr=.nan", "train.lr must be a finite number, got nan"),
        ("train.lr=.inf", "train.lr must be a finite number, got inf"),
        ("train.lr=abc", "train.lr must be a number (e.g. 0.001, 1e-3), got 'abc'"),
        ("train.steps=1.5e0", "train.steps must be an integer, got 1.5"),
        ("moe.top_k=0", "moe.top_k is not a setting"),
        ("moe.top_k=2", "train.top_k_min and train.top_k_max"),
    ],
)
def test_bad_numbers_and_ignored_keys_are_one_line(
    setting: str, needle: str, tmp_path, capsys
) -> None:
    out = tmp_path / "o"
    assert main(["train", "--config", "quick", "--set", setting, "--out", str(out)]) == 2
    assert needle in _one_line_error(capsys)
    assert not out.exists()


def test_old_run_folders_with_moe_top_k_still_load(corpus) -> None:
    raw = tiny_config(corpus)
    raw["moe"]["top_k"] = 2  # what runs made before k lived in the schedule wrote
    assert config_from_dict(raw).moe.num_experts == 4


def test_a_yaml_file_with_moe_top_k_is_refused(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("base: quick\nmoe: {top_k: 2}\n")
    with pytest.raises(Exception, match="moe.top_k is not a setting"):
        load_config(str(path))


# --------------------------------------------------------------------------- divergence guard


def test_a_run_whose_loss_stays_far_above_its_start_is_stopped(tmp_path, corpus, capsys) -> None:
    """lr 1000: the loss stays finite (no NaN) but far above ln(V); the guard stops the run with
    one line, and the checkpoints kept are the good ones (none written while diverging)."""
    config = _yaml(tmp_path, corpus, steps=400, eval_interval=1, log_interval=1, warmup_steps=60)
    out = tmp_path / "run"
    args = ["train", "--config", str(config), "--out", str(out), "--no-progress"]
    assert main([*args, "--set", "train.lr=1000"]) == 2
    err = _one_line_error(capsys)
    assert "training stopped at step" in err and "train.divergence_factor 2" in err
    stopped = int(err.split("training stopped at step ")[1].split(":")[0])
    assert stopped < 400
    index = json.loads((out / "checkpoints" / "index.json").read_text())
    assert f"the last good checkpoint, {index['latest']}, is kept" in err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in rows if r["split"] == "train"}
    kept = int(index["latest"].removeprefix("step-"))
    assert kept <= stopped - 20 + 1 and losses[kept] < 2 * 3.2  # before the run of bad steps
    assert not (out / "results.json").exists()
    # the guard can be turned off
    off = tmp_path / "off"
    args = ["train", "--config", str(config), "--out", str(off), "--no-progress"]
    args += ["--set", "train.lr=1000", "--set", "train.steps=30", "--set", "train.eval_interval=30"]
    assert main([*args, "--set", "train.divergence_factor=0"]) == 0


def test_divergence_guard_settings_are_checked(capsys, tmp_path) -> None:
    for setting in ("train.divergence_factor=0.5", "train.divergence_steps=0"):
        assert main(["train", "--set", setting, "--out", str(tmp_path / "o")]) == 2
        assert setting.split("=")[0] in _one_line_error(capsys)


# --------------------------------------------------------------------------- output


@pytest.fixture
def trained(tmp_path, corpus) -> Path:
    run = tmp_path / "run"
    cfg = tiny_config(corpus, train={"top_k_min": 4, "top_k_max": 4})
    train_run(config_from_dict(cfg), run, progress=False, log=lambda _: None)
    return run


def test_analyze_says_what_it_analysed_and_where_it_wrote(trained, capsys) -> None:
    assert main(["analyze", str(trained), "--tokens", "64"]) == 0
    out = capsys.readouterr().out
    assert "at k = 4 of 4 experts" in out
    assert "the load CV is 0 by construction" in out  # k = E
    assert str(trained / "analysis" / "analysis.json") in out
    assert main(["analyze", str(trained), "--tokens", "64", "--top-k", "1"]) == 0
    out = capsys.readouterr().out
    assert "at k = 1 of 4 experts" in out and "by construction" not in out


def test_eval_says_which_split_and_checkpoint(trained, capsys) -> None:
    assert main(["eval", str(trained), "--top-k", "1", "--split", "valid", "--no-progress"]) == 0
    out = capsys.readouterr().out
    index = json.loads((trained / "checkpoints" / "index.json").read_text())
    assert f"valid split, checkpoint {trained / 'checkpoints' / index['best_all_experts']}" in out
    assert "MACs/token" in out and "AIQ of -bpc" in out  # cost per k and RouterBench's AIQ


def test_compare_with_one_seed_prints_no_spread() -> None:
    from hyperrouter.analysis.compare import table_markdown

    def summary(seeds: list[int]) -> dict:
        cell = {"mean": 2.5, "std": 0.0, "values": [2.5]}
        method = {
            "dense": False,
            "parameters": {"trainable": 10, "total": 20},
            "by_top_k": {"1": cell},
            "analysis": None,
            "tokens_per_second": {"1": {"mean": 100.0}},
            "train_tokens_per_second": {"mean": 50.0},
            "seeds": seeds,
        }
        return {"ks": [1], "metric": "bpc", "methods": {"smoe": method}, "best": {"1": "smoe"}}

    one = table_markdown(summary([1111]))
    assert "±" not in one and "2.5000" in one and "(seed 1111)" in one
    assert "2.5000 ± 0.0000" in table_markdown(summary([1111, 1112]))


def test_bench_explains_its_columns_and_missing_peers(capsys) -> None:
    args = ["bench", "layer", "--top-k", "1", "--tokens", "32", "--repeats", "1"]
    assert main([*args, "--modes", "infer", "--experts", "swiglu"]) == 0
    out = capsys.readouterr().out
    assert "x dense: the median time over the median time of the dense floor" in out
    try:
        import transformers  # noqa: F401
    except ImportError:
        assert "transformers is not installed, so its Mixtral peers were left out" in out
    else:
        assert "peer:hf-mixtral" in out


def test_a_closed_pipe_ends_the_run_quietly_with_its_checkpoint(tmp_path, corpus) -> None:
    config = _yaml(tmp_path, corpus, steps=100_000, eval_interval=5)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "hyperrouter", "train", "--config", str(config)]
    proc = subprocess.Popen(
        [*cmd, "--out", str(out), "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    first = proc.stdout.readline()  # `| head -1`
    assert first.startswith(b"step 5: valid"), first
    proc.stdout.close()
    try:
        err = proc.stderr.read().decode()
        code = proc.wait(timeout=120)
    finally:
        proc.kill()
    assert code == 141 and err == "", (code, err)
    index = json.loads((out / "checkpoints" / "index.json").read_text())
    assert (out / "checkpoints" / index["latest"] / "model.safetensors").is_file()
    assert not (out / LOCK_FILE).exists()
    assert main(["eval", str(out), "--top-k", "1", "--no-progress"]) == 0
