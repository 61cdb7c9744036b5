"""benchmarks/train_throughput.py and scripts/sbase_balance.py run end to end on tiny runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from hyperrouter.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "train.batch_size=2",
    "train.tgt_len=16",
    "train.mem_len=16",
    "eval.tgt_len=16",
    "model.d_model=32",
    "model.d_inner=64",
    "model.d_head=8",
    "moe.d_expert=32",
]


def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "text.txt"
    path.write_bytes(b"the quick brown fox jumps over the lazy dog. " * 200)
    return path


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600
    )


def test_train_throughput_reports_the_median_of_the_intervals_after_the_first(
    tmp_path: Path,
) -> None:
    out = tmp_path / "speed.json"
    args = ["benchmarks/train_throughput.py", "--config", "quick", "--data", str(corpus(tmp_path))]
    args += ["--methods", "switch,rlr", "--steps", "6", "--log-interval", "2", "--json", str(out)]
    for setting in TINY:
        args += ["--set", setting]
    done = run_script(*args)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert list(result["methods"]) == ["switch", "rlr"]
    for row in result["methods"].values():
        assert len(row["intervals"]) == 3 and row["median"] > 0
        kept = sorted(row["intervals"][1:])
        assert row["median"] == (kept[0] + kept[1]) / 2
    assert 'moe.router="rlr"' in result["methods"]["rlr"]["overrides"]
    bad = run_script("benchmarks/train_throughput.py", "--methods", "nope")
    assert bad.returncode != 0 and "unknown method" in bad.stderr


def test_sbase_balance_measures_the_sinkhorn_choice_of_a_trained_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = ["train", "--config", "quick", "--data", str(corpus(tmp_path)), "--out", str(run)]
    for setting in [
        "moe.router=sbase",
        "train.steps=2",
        "train.eval_interval=2",
        "eval.max_valid_batches=1",
        "eval.top_ks=[1]",
        *TINY,
    ]:
        args += ["--set", setting]
    assert main([*args, "--no-progress"]) == 0
    out = tmp_path / "balance.json"
    done = run_script(
        "scripts/sbase_balance.py",
        str(run),
        "--temperatures",
        "1,0.05",
        "--batches",
        "2",
        "--json",
        str(out),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert {r["temperature"] for r in rows} == {1.0, 0.05} and len(rows) == 2 * 2  # 2 layers
    for row in rows:
        assert row["max_error"] <= 1e-4 and row["train_cv"] >= 0
    cold = [r["train_cv"] for r in rows if r["temperature"] == 0.05]
    plain = [r["eval_cv"] for r in rows if r["temperature"] == 0.05]
    assert max(cold) <= max(plain) + 1e-9  # the balanced choice is no less even than plain top 1
