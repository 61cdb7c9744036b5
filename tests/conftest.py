"""Fixtures shared by test files: a small corpus, and a download cache of the test's own."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A 9 KB text file of one repeated sentence."""
    path = tmp_path / "text.txt"
    path.write_bytes(b"the quick brown fox jumps over the lazy dog. " * 200)
    return path


@pytest.fixture
def isolated_cache(tmp_path: Path, monkeypatch) -> None:
    """HYPERROUTER_CACHE in the test's own folder (nothing shared with other tests or users)."""
    monkeypatch.setenv("HYPERROUTER_CACHE", str(tmp_path / "cache"))


def train_killed_after_checkpoints(config, out: Path, monkeypatch, checkpoints: int = 2) -> None:
    """Train `config` into `out` and die (KeyboardInterrupt) right after its `checkpoints`-th
    validation and checkpoint, as a killed process would; `monkeypatch` is undone afterwards."""
    from hyperrouter.train import trainer
    from hyperrouter.train.trainer import train_run

    calls = {"n": 0}
    real = trainer.Run._validate

    def killed(self, *args, **kwargs):
        real(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == checkpoints:
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer.Run, "_validate", killed)
    with pytest.raises(KeyboardInterrupt):
        train_run(config, out, progress=False, log=lambda _: None)
    monkeypatch.undo()


# The smallest useful MoE model of the `quick` preset (2 layers, d_model 16, 4 experts), as
# --set overrides; TINY_RUN adds segments of 8 tokens, k 1..4 evaluated at 1, 2, 4.
TINY_MOE = [
    "model.n_layer=2",
    "model.d_model=16",
    "model.n_head=2",
    "model.d_head=8",
    "model.d_inner=32",
    "moe.num_experts=4",
    "moe.d_expert=8",
    "train.top_k_min=1",
    "train.top_k_max=4",
]
TINY_RUN = [
    *TINY_MOE,
    *("eval.top_ks=[1,2,4]", "eval.batch_size=2", "eval.tgt_len=8", "eval.max_valid_batches=2"),
    *("train.tgt_len=8", "train.mem_len=8", "train.batch_size=2"),
]


def train_tiny_run(out: Path, steps: int) -> Path:
    """A tiny trained run (TINY_RUN, `steps` steps, evaluated at the end) in `out`."""
    from hyperrouter.cli import main

    args = ["train", "--config", "quick", "--out", str(out), "--no-progress"]
    for setting in [*TINY_RUN, f"train.steps={steps}", f"train.eval_interval={steps}"]:
        args += ["--set", setting]
    assert main(args) == 0
    return out
