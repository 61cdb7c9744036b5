"""Bad paths for every subcommand: missing, a file where a folder is expected (or the reverse),
unwritable, empty, truncated. Each must end with exit 2, exactly one line on stderr, no traceback,
and no output folder or file left behind.

We run as root, so "unwritable" is a path under a regular file (`afile/sub`) or under /proc,
where even root cannot create files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from hyperrouter.cli import main
from hyperrouter.train.config import config_from_dict
from hyperrouter.train.trainer import train_run

TINY = {
    "model": {"n_layer": 1, "n_head": 2, "d_head": 8, "d_model": 16, "d_inner": 32},
    "moe": {
        "layers": [0],
        "num_experts": 4,
        "d_expert": 8,
        "router": "hyperrouter",
        "router_options": {"hyper_hidden": 16},
    },
    "train": {
        "steps": 2,
        "batch_size": 4,
        "tgt_len": 16,
        "mem_len": 16,
        "top_k_min": 1,
        "top_k_max": 4,
        "log_interval": 1,
        "eval_interval": 2,
        "device": "cpu",
    },
    "eval": {"tgt_len": 16, "batch_size": 2, "top_ks": [1, 4], "max_valid_batches": 2},
}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A folder with a corpus, a tiny config, a trained run, task data and odd files."""
    root = tmp_path_factory.mktemp("bad")
    corpus = root / "text.txt"
    corpus.write_bytes(b"the quick brown fox jumps over the lazy dog. " * 200)
    cfg = json.loads(json.dumps(TINY)) | {"data": {"path": str(corpus)}}
    (root / "tiny.yaml").write_text(json.dumps(cfg))
    train_run(config_from_dict(cfg), root / "run", progress=False, log=lambda _: None)
    (root / "afile").write_text("not a folder\n")
    (root / "empty.txt").write_bytes(b"")
    (root / "empty.yaml").write_text("")
    (root / "truncated.yaml").write_text("model: {n_layer: 2, d_model")
    (root / "emptydir").mkdir()
    (root / "dir.yaml").mkdir()
    task = root / "task"
    task.mkdir()
    for split in ("train", "dev", "test"):
        lines = [f"{i % 2} " + ("yes " if i % 2 else "no ") for i in range(12)]
        (task / f"stsa.binary.{split}").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HYPERROUTER_CACHE", str(tmp_path / "cache"))


def damaged_run(world: Path, tmp_path: Path, damage: str) -> Path:
    """A copy of the trained run with one file emptied or cut short ("file:empty|truncated";
    "ckpt/NAME" is a file of the best checkpoint)."""
    run = tmp_path / "run"
    shutil.copytree(world / "run", run)
    name, how = damage.split(":")
    if name.startswith("ckpt/"):
        index = json.loads((run / "checkpoints" / "index.json").read_text())
        path = run / "checkpoints" / index["best_all_experts"] / name.removeprefix("ckpt/")
    else:
        path = run / name
    data = path.read_bytes()
    path.write_bytes(b"" if how == "empty" else data[: len(data) // 2])
    return run


def fail_cleanly(args: list[str], capsys, *, absent: Path | None = None) -> str:
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, (code, err)
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    if absent is not None:
        assert not absent.exists(), f"{absent} was left behind"
    return err


TRAIN = ["train", "--no-progress", "--config", "{w}/tiny.yaml"]

# (command line, path that must not exist afterwards, text the message must contain)
CASES = [
    # train: --data
    ([*TRAIN, "--data", "{w}/missing.txt", "--out", "{t}/o"], "{t}/o", "missing.txt"),
    ([*TRAIN, "--data", "{w}/empty.txt", "--out", "{t}/o"], "{t}/o", "empty.txt"),
    ([*TRAIN, "--data", "{w}/emptydir", "--out", "{t}/o"], "{t}/o", "emptydir"),
    # train: --config
    (["train", "--config", "{w}/missing.yaml", "--out", "{t}/o"], "{t}/o", "missing.yaml"),
    (["train", "--config", "{w}/empty.yaml", "--out", "{t}/o"], "{t}/o", "empty.yaml"),
    (["train", "--config", "{w}/truncated.yaml", "--out", "{t}/o"], "{t}/o", "truncated.yaml"),
    (["train", "--config", "{w}/dir.yaml", "--out", "{t}/o"], "{t}/o", "dir.yaml"),
    # train: --out
    ([*TRAIN, "--out", "{w}/afile"], None, "afile"),
    ([*TRAIN, "--out", "{w}/afile/sub"], None, "afile"),
    ([*TRAIN, "--out", "/proc/hyperrouter-run"], None, "/proc"),
    # train --resume
    (["train", "--resume", "--out", "{t}/missing"], "{t}/missing", "missing"),
    (["train", "--resume", "--out", "{w}/afile"], None, "afile"),
    (["train", "--resume", "--out", "{run:config.json:empty}"], None, "config.json"),
    (["train", "--resume", "--out", "{run:config.json:truncated}"], None, "config.json"),
    (["train", "--resume", "--out", "{run:checkpoints/index.json:truncated}"], None, "index.json"),
    (["train", "--resume", "--out", "{run:run.json:empty}"], None, "run.json"),
    (["train", "--resume", "--out", "{run:ckpt/model.safetensors:truncated}"], None, "model"),
    (["train", "--resume", "--out", "{run:ckpt/optimizer.safetensors:empty}"], None, "optimizer"),
    (["train", "--resume", "--out", "{run:ckpt/trainer.json:truncated}"], None, "trainer.json"),
    # eval
    (["eval", "{t}/missing"], None, "missing"),
    (["eval", "{w}/afile"], None, "afile"),
    (["eval", "{w}/emptydir"], None, "emptydir"),
    (["eval", "{run:ckpt/config.json:empty}"], None, "config.json"),
    (["eval", "{run:ckpt/vocab.json:truncated}"], None, "vocab.json"),
    (["eval", "{run:ckpt/model.safetensors:empty}"], None, "model.safetensors"),
    (["eval", "{run:checkpoints/index.json:empty}"], None, "index.json"),
    (["eval", "{w}/run", "--data", "{w}/missing.txt"], None, "missing.txt"),
    (["eval", "{w}/run", "--data", "{w}/empty.txt"], None, "empty.txt"),
    (["eval", "{w}/run", "--json", "{w}/afile/e.json"], "{w}/afile/e.json", "afile"),
    (["eval", "{w}/run", "--json", "{w}/emptydir"], None, "emptydir"),
    (["eval", "{w}/run", "--json", "/proc/e.json"], None, "/proc"),
    # analyze
    (["analyze", "{t}/missing"], None, "missing"),
    (["analyze", "{w}/afile"], None, "afile"),
    (["analyze", "{w}/run", "--out", "{w}/afile/sub"], None, "afile"),
    (["analyze", "{w}/run", "--out", "{w}/afile"], None, "afile"),
    (["analyze", "{w}/run", "--data", "{w}/missing.txt", "--out", "{t}/a"], "{t}/a", "missing"),
    (["analyze", "{run:ckpt/model.safetensors:truncated}", "--out", "{t}/a"], "{t}/a", "model"),
    # finetune
    (["finetune", "--data", "{t}/missing", "--out", "{t}/f"], "{t}/f", "missing"),
    (["finetune", "--data", "{w}/emptydir", "--out", "{t}/f"], "{t}/f", "emptydir"),
    (["finetune", "--data", "{w}/task", "--init", "{t}/nope", "--out", "{t}/f"], "{t}/f", "nope"),
    (["finetune", "--data", "{w}/task", "--init", "{w}/afile", "--out", "{t}/f"], "{t}/f", "afile"),
    (
        ["finetune", "--data", "{w}/task", "--init", "{run:ckpt/model.safetensors:truncated}"]
        + ["--out", "{t}/f"],
        "{t}/f",
        "model.safetensors",
    ),
    (["finetune", "--data", "{w}/task", "--out", "{w}/afile/f"], None, "afile"),
    (["finetune", "--data", "{w}/task", "--out", "/proc/f"], None, "/proc"),
    (["finetune", "--config", "{w}/empty.yaml", "--out", "{t}/f"], "{t}/f", "empty.yaml"),
    # compare
    (["compare", "--config", "{w}/tiny.yaml", "--out", "{w}/afile"], None, "afile"),
    (["compare", "--config", "{w}/tiny.yaml", "--out", "{w}/afile/s"], None, "afile"),
    (["compare", "--config", "{w}/empty.yaml", "--out", "{t}/s"], "{t}/s", "empty.yaml"),
    (
        ["compare", "--config", "{w}/tiny.yaml", "--data", "{w}/missing.txt", "--out", "{t}/s"],
        "{t}/s",
        "missing.txt",
    ),
    # data
    (["data", "get", "enwik8", "--dir", "{t}/d", "--from", "{t}/missing.zip"], "{t}/d", "missing"),
    (["data", "get", "enwik8", "--dir", "{t}/d", "--from", "{w}/empty.txt"], "{t}/d", "empty.txt"),
    (["data", "get", "enwik8", "--dir", "{w}/afile", "--from", "{w}/empty.txt"], None, "afile"),
    (["data", "get", "enwik8", "--dir", "{w}/afile/d", "--from", "{w}/empty.txt"], None, "afile"),
    # bench: the output is checked before any timing
    (["bench", "layer", "--json", "{w}/afile/b.json", "--top-k", "1"], None, "afile"),
    (["bench", "layer", "--json", "{w}/emptydir", "--top-k", "1"], None, "emptydir"),
    (["bench", "layer", "--json", "/proc/b.json", "--top-k", "1"], None, "/proc"),
]


def _expand(text: str, world: Path, tmp_path: Path) -> str:
    if text.startswith("{run:"):
        return str(damaged_run(world, tmp_path, text[5:-1]))
    return text.replace("{w}", str(world)).replace("{t}", str(tmp_path))


@pytest.mark.parametrize(
    "args,absent,needle", CASES, ids=[" ".join(c[0])[:60].replace("{", "") for c in CASES]
)
def test_bad_path(world, tmp_path, capsys, args, absent, needle) -> None:
    args = [_expand(a, world, tmp_path) for a in args]
    absent_path = Path(_expand(absent, world, tmp_path)) if absent else None
    err = fail_cleanly(args, capsys, absent=absent_path)
    assert needle in err, err


def test_resume_of_a_damaged_run_leaves_it_unchanged(world, tmp_path, capsys) -> None:
    run = damaged_run(world, tmp_path, "ckpt/model.safetensors:truncated")
    before = sorted((p.relative_to(run), p.stat().st_size) for p in run.rglob("*"))
    fail_cleanly(["train", "--resume", "--out", str(run)], capsys)
    assert sorted((p.relative_to(run), p.stat().st_size) for p in run.rglob("*")) == before
