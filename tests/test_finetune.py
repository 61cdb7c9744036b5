"""Fine-tuning: frozen routers stay frozen, checkpoint selection on valid, a separable task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hyperrouter.cli import main
from hyperrouter.errors import HyperRouterError
from hyperrouter.train import finetune as ft
from hyperrouter.train.config import config_from_dict
from hyperrouter.train.finetune import FinetuneConfig, accuracy, finetune_run, prepare
from hyperrouter.train.trainer import train_run
from tests.test_train import tiny_config


@pytest.fixture
def pretrained(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("HYPERROUTER_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "text.txt"
    corpus.write_bytes(b"a lovely film. a dreadful film. zzz yyy. " * 150)
    run = tmp_path / "pre"
    train_run(
        config_from_dict(tiny_config(corpus, train={"steps": 4, "eval_interval": 4})),
        run,
        progress=False,
        log=lambda _: None,
    )
    return run


def separable_task(root: Path) -> Path:
    """Label 1 texts are made of 'y', label 0 of 'n': trivially separable."""
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 40), ("dev", 10), ("test", 10)):
        lines = [f"{i % 2} " + ("yes " if i % 2 else "no ") * (1 + i % 3) for i in range(n)]
        (root / f"stsa.binary.{split}").write_text("\n".join(lines) + "\n")
    return root


def tiny_ft(data: Path, **kw) -> FinetuneConfig:
    base = dict(
        task="sst2",
        data=str(data),
        steps=60,
        batch_size=8,
        lr=3e-3,
        eval_interval=20,
        log_interval=10,
        top_k_min=4,
        top_k_max=4,
        test_top_ks=[1, 2, 4],
        clip=1.0,
        device="cpu",
        head_dropout=0.0,
    )
    return FinetuneConfig(**{**base, **kw}).validate()


def test_finetune_learns_a_separable_task_and_keeps_frozen_routers(tmp_path, pretrained) -> None:
    data = separable_task(tmp_path / "task")
    config = tiny_ft(data)
    prep = prepare(config, str(pretrained), torch.device("cpu"))
    folder = next(p for p in (pretrained / "checkpoints").iterdir() if p.is_dir())
    weights = load_file(str(folder / "model.safetensors"))
    loaded = prep.model.body.moe_layers()[0].router
    # the learned router is really loaded (the reference's plain-gate reload loses it)
    assert torch.equal(loaded.embedding, weights["layers.0.ff.moe.router.embedding"])
    assert not prep.new_vocab  # char model: the pretrained byte vocabulary is reused

    out = tmp_path / "ft"
    results = finetune_run(config, out, init=str(pretrained), progress=False)
    assert results["metric"] == "accuracy" and results["split"] == "test"
    assert set(results["by_top_k"]) == {"1", "2", "4"}
    assert results["by_top_k"]["4"] == 1.0 and results["valid_accuracy"] == 1.0
    tuned = load_file(str(out / "checkpoints" / results["checkpoint"] / "model.safetensors"))
    frozen = [k for k in weights if "hypernet" in k]
    assert frozen
    for key in frozen:
        assert torch.equal(tuned[f"body.{key}"], weights[key]), key
    assert not torch.equal(
        tuned["body.layers.0.ff.moe.router.embedding"], weights["layers.0.ff.moe.router.embedding"]
    )
    run = json.loads((out / "run.json").read_text())
    assert run["valid_source"] == "dev file" and run["parameters"]["frozen"] > 0


def test_checkpoint_is_chosen_on_validation(tmp_path, pretrained, monkeypatch) -> None:
    """Validation scores 0.5, 0.9, 0.7 at steps 20, 40, 60: the test uses step 40's weights."""
    data = separable_task(tmp_path / "task")
    valid_scores = iter([0.5, 0.9, 0.7])
    real = ft.evaluate_accuracy
    calls = {"n": 0}

    def scripted(model, encoded, batch_size, device, top_k):
        calls["n"] += 1
        if calls["n"] <= 3:  # the three validation evaluations during training
            return next(valid_scores), 1.0
        return real(model, encoded, batch_size, device, top_k)

    monkeypatch.setattr(ft, "evaluate_accuracy", scripted)
    results = finetune_run(tiny_ft(data), tmp_path / "ft", init=str(pretrained), progress=False)
    assert results["checkpoint"] == "step-0000040" and results["valid_accuracy"] == 0.9
    index = json.loads((tmp_path / "ft" / "checkpoints" / "index.json").read_text())
    assert index["best_valid"] == "step-0000040"


def test_accuracy_counts() -> None:
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    assert accuracy(logits, torch.tensor([0, 1, 1])) == (2, 3)


def test_from_scratch_and_word_tokenizer(tmp_path, pretrained) -> None:
    data = separable_task(tmp_path / "task")
    scratch = tiny_ft(
        data,
        steps=10,
        eval_interval=10,
        model=config_from_dict(tiny_config(data)).model,
        moe=config_from_dict(tiny_config(data)).moe,
    )
    results = finetune_run(scratch, tmp_path / "scratch", init=None, progress=False)
    assert results["init"]["run"] is None and 0 <= results["by_top_k"]["4"] <= 1
    word = tiny_ft(data, steps=10, eval_interval=10, tokenizer="word")
    prep = prepare(word, str(pretrained), torch.device("cpu"))
    assert prep.new_vocab and prep.vocab.kind == "word" and "yes" in prep.vocab.stoi
    results = finetune_run(word, tmp_path / "word", init=str(pretrained), progress=False)
    assert results["init"]["new_vocabulary"]


def test_truncation_keeps_head_and_tail() -> None:
    from hyperrouter.data.vocab import Vocab

    vocab = Vocab.from_bytes([bytes(range(97, 123))])
    ids = ft.encode("abcdefghij", vocab, 4)
    assert vocab.decode(ids) == "abij"


@pytest.mark.parametrize(
    "args,message",
    [
        (["--task", "sst3"], "unknown task 'sst3'"),
        (["--task", "sst2", "--data", "{task}", "--init", "{tmp}"], "neither a hyperrouter run"),
        (["--task", "banking77", "--data", "{task}"], "no BANKING77 train.csv"),
        (["--task", "sst2", "--data", "{bad}"], r"stsa.binary.train:2: label 'oops'"),
    ],
)
def test_finetune_cli_bad_input(tmp_path, capsys, args, message) -> None:
    task = separable_task(tmp_path / "task")
    bad = separable_task(tmp_path / "bad")
    (bad / "stsa.binary.train").write_text("1 fine\noops not a label\n")
    args = [a.format(task=task, tmp=tmp_path, bad=bad) for a in args]
    out = tmp_path / "out"
    code = main(["finetune", *args, "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    import re

    assert re.search(message, err), err
    assert not out.exists()


def test_finetune_presets_load() -> None:
    from hyperrouter.train.config import list_presets
    from hyperrouter.train.finetune import load_finetune_config

    names = list_presets("finetune")
    for task in ("sst2", "sst5", "imdb", "banking77"):
        assert task in names and f"{task}-cpu" in names
        ref = load_finetune_config(task)
        assert ref.task == task and ref.lr == 1e-4 and ref.steps == 5000 and ref.top_k_max == 16
        assert ref.tokenizer == "word" and ref.pooling == "last"  # the reference's recipe
        assert load_finetune_config(f"{task}-cpu").task == task


@pytest.mark.parametrize("task", ["sst2", "sst5", "imdb", "banking77"])
def test_cpu_presets_train_a_few_steps(tmp_path, task) -> None:
    """Each CPU preset of Table 2, as committed (its model for the from-scratch control, word
    vocabulary, normalisation, head, k fixed at 16), trains three steps and tests at every k."""
    from hyperrouter.train.finetune import load_finetune_config
    from tests.test_data_tasks import banking_dir, imdb_jsonl_dir, sst_sentence_dir

    data = {
        "sst2": lambda: sst_sentence_dir(tmp_path / "sst"),
        "sst5": lambda: sst_sentence_dir(tmp_path / "sst", prefix="stsa.fine", classes=5),
        "imdb": lambda: imdb_jsonl_dir(tmp_path / "imdb", n=30),
        "banking77": lambda: banking_dir(tmp_path / "bank"),
    }[task]()
    config = load_finetune_config(
        f"{task}-cpu", [f"data={data}", "steps=3", "eval_interval=3", "device=cpu"]
    )
    assert config.tokenizer == "word" and config.normalize == "basic"
    assert (config.top_k_min, config.top_k_max) == (16, 16)
    assert config.test_top_ks == [1, 2, 4, 8, 16]
    results = finetune_run(config, tmp_path / "run", progress=False, log=lambda _: None)
    assert sorted(results["by_top_k"], key=int) == ["1", "2", "4", "8", "16"]
    assert all(0.0 <= acc <= 1.0 for acc in results["by_top_k"].values())
    assert results["init"]["tokenizer"] == "word" and results["init"]["new_vocabulary"]
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["task"] == task and run["sizes"]["train"] > 0


def test_basic_normalisation() -> None:
    assert ft.normalize_basic("Great movie!<br /><br />10/10, I don't  KNOW.") == (
        "great movie ! 10 / 10 , i don't know ."
    )
    assert ft.normalize_basic("it 's a film .") == "it 's a film ."  # SST is already so
    with pytest.raises(HyperRouterError, match="normalize must be one of none, basic"):
        tiny_ft(Path("x"), normalize="lower")
    with pytest.raises(HyperRouterError, match="min_word_freq must be >= 1"):
        tiny_ft(Path("x"), min_word_freq=0)


def test_word_vocabulary_min_freq(tmp_path) -> None:
    data = separable_task(tmp_path / "sep")
    (data / "stsa.binary.train").write_text("1 yes rare\n0 no no\n1 yes\n0 no\n")
    prep = prepare(tiny_ft(data, tokenizer="word", min_word_freq=2), None, torch.device("cpu"))
    assert prep.vocab.encode("rare") == [prep.vocab.unk_id]
    assert prep.vocab.encode("yes no") != [prep.vocab.unk_id] * 2
