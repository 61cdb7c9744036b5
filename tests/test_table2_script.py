"""scripts/table2.py: the Table 2 grid (jobs, commands, resume) and its table."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "table2.py"


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
