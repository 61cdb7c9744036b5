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


def test_variable_k_family_tabulates_runs_sweeps_groups_and_seeds(tmp_path: Path) -> None:
    """benchmarks/variable_k_family.py on tiny runs: a top_p run swept over p, two smoe seeds,
    a group of runs; every AIQ over the common range is finite and the p points differ."""
    data = str(corpus(tmp_path))
    runs = {}
    for name, settings in (
        ("top_p", ["moe.router=top_p", "train.top_k_schedule=constant", "train.top_k_min=16"]),
        ("smoe", ["moe.router=smoe"]),
        ("smoe2", ["moe.router=smoe", "train.seed=7"]),
    ):
        runs[name] = tmp_path / name
        args = ["train", "--config", "quick", "--data", data, "--out", str(runs[name])]
        for setting in [*settings, "train.steps=2", "train.eval_interval=2",
                        "eval.max_valid_batches=1", "eval.top_ks=[1,16]", *TINY]:  # fmt: skip
            args += ["--set", setting]
        assert main([*args, "--no-progress"]) == 0
    out = tmp_path / "family"
    done = run_script(
        "benchmarks/variable_k_family.py",
        "--run", f"top_p={runs['top_p']}",
        "--run", f"smoe={runs['smoe']},{runs['smoe2']}",
        "--run", f"other={runs['smoe2']}",
        "--group", "pooled=other",
        "--sweep-p", "top_p=0.2,1.0",
        "--range-from", "smoe",
        "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((out / "family.json").read_text())
    methods = summary["methods"]
    assert set(methods) == {"top_p", "smoe", "pooled"}
    assert all(isinstance(m["aiq_by_macs"], float) for m in methods.values())
    p_points = methods["top_p"]["sweep"]
    assert [p["p"] for p in p_points] == [0.2, 1.0]
    assert p_points[0]["mean_k"] < p_points[1]["mean_k"] == 16.0  # p = 1 keeps every slot
    assert len(methods["smoe"]["seeds"]["aiq_by_macs_over_k"]) == 2
    assert "| `top_p` | p |" in (out / "family.md").read_text()
