"""`hyperrouter compare --experts/--sizes`: methods multiplied into a grid of expert counts and
model widths, with unique resumable run folders and a summary keyed by cell."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from hyperrouter.analysis import compare as compare_mod
from hyperrouter.analysis.compare import axis_overrides, grid_cells
from hyperrouter.cli import main
from hyperrouter.train.config import config_from_dict
from tests.test_train import tiny_config


@pytest.fixture
def corpus(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("HYPERROUTER_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "text.txt"
    path.write_bytes(b"pack my box with five dozen liquor jugs. " * 200)
    return path


def test_grid_labels_and_overrides(tmp_path, monkeypatch) -> None:
    base = config_from_dict(tiny_config(tmp_path / "x.txt"))
    presets = compare_mod.method_presets() | {
        "dense_plain": {"set": {"moe.layers": []}},  # a dense model that ignores E
    }
    monkeypatch.setattr(compare_mod, "method_presets", lambda: presets)
    cells = grid_cells(base, ["smoe", "dense_ffn", "dense_plain"], [2, 8], [16, 32])
    assert set(cells) == {
        *(f"{m}-E{e}-d{d}" for m in ("smoe", "dense_ffn") for e in (2, 8) for d in (16, 32)),
        "dense_plain-d16",
        "dense_plain-d32",
    }
    assert grid_cells(base, ["smoe"], None, None) == {"smoe": ("smoe", None, None)}
    assert grid_cells(base, ["smoe"], [8], None) == {"smoe-E8": ("smoe", 8, None)}
    sets = dict(o.split("=", 1) for o in axis_overrides(base, 2, 32))
    assert sets["moe.num_experts"] == "2" and json.loads(sets["eval.top_ks"]) == [1, 2]
    assert sets["train.top_k_max"] == "2" and sets["model.d_inner"] == "64"
    assert sets["moe.d_expert"] == "16" and sets["model.d_head"] == "16"


def test_compare_grid_end_to_end(tmp_path, corpus, capsys) -> None:
    cfg = tiny_config(corpus, train={"steps": 2, "eval_interval": 2, "log_interval": 2})
    cfg["moe"] |= {"router": "smoe", "router_options": {}}
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "sweep"
    args = ["compare", "--methods", "smoe", "--seeds", "1", "--config", str(base)]
    args += ["--experts", "2,4", "--sizes", "16,32", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    labels = {f"smoe-E{e}-d{d}" for e in (2, 4) for d in (16, 32)}
    assert set(summary["methods"]) == labels and summary["ks"] == [1, 2, 4]
    for label in labels:
        assert (out / "runs" / f"{label}-seed1111" / "results.json").is_file()
    cell = summary["methods"]["smoe-E2-d32"]
    assert (cell["method"], cell["num_experts"], cell["d_model"]) == ("smoe", 2, 32)
    assert cell["by_top_k"]["4"]["mean"] != cell["by_top_k"]["4"]["mean"]  # NaN: k > E
    assert "| smoe-E2-d32 |" in (out / "table.md").read_text()
    capsys.readouterr()
    # a second call reuses every run
    assert main(args) == 0
    assert capsys.readouterr().out.count("| smoe-E") == 4


def test_compare_rejects_bad_axes(tmp_path, corpus, capsys) -> None:
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(tiny_config(corpus)))
    args = ["compare", "--methods", "smoe", "--config", str(base), "--out", str(tmp_path / "o")]
    assert main([*args, "--experts", "4,4"]) == 2
    err = capsys.readouterr().err
    assert "--experts lists a value twice" in err and len(err.strip().splitlines()) == 1
