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
