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
