"""Every registered router trains through `hyperrouter train --set moe.router=NAME` on the quick
preset (tiny steps and corpus), end to end: training, validation, checkpoints, test at every k."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hyperrouter.cli import main
from hyperrouter.routers import ROUTERS


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_every_router_trains_with_the_cli_on_the_quick_preset(name: str, tmp_path: Path) -> None:
    corpus = tmp_path / "text.txt"
    corpus.write_bytes(b"the quick brown fox jumps over the lazy dog. " * 120)
    out = tmp_path / "run"
    args = ["train", "--config", "quick", "--data", str(corpus), "--out", str(out)]
    for setting in (
        f"moe.router={name}",
        "train.steps=3",
        "train.eval_interval=3",
        "train.log_interval=1",
        "train.batch_size=2",
        "train.tgt_len=16",
        "train.mem_len=16",
        "eval.tgt_len=16",
        "eval.max_valid_batches=2",
        "eval.top_ks=[1,2,16]",
    ):
        args += ["--set", setting]
    assert main([*args, "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["by_top_k"]) == {"1", "2", "16"}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert len(train) == 3 and all("expert_load" in r for r in train)
