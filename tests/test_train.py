"""Training end to end on tiny generated corpora: metrics, schedules, checkpoints, resume, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from hyperrouter.cli import main
from hyperrouter.train.config import config_from_dict, list_presets, load_config
from hyperrouter.train.evaluate import lr_at, metric_value
from hyperrouter.train.trainer import train_run
from tests.conftest import train_killed_after_checkpoints

TINY = {
    "model": {"n_layer": 2, "n_head": 2, "d_head": 8, "d_model": 16, "d_inner": 32, "dropout": 0.1},
    "moe": {
        "layers": [0, 1],
        "num_experts": 4,
        "d_expert": 8,
        "router": "hyperrouter",
        "router_options": {"hyper_hidden": 16},
    },
    "train": {
        "steps": 8,
        "batch_size": 4,
        "tgt_len": 16,
        "mem_len": 16,
        "lr": 0.003,
        "top_k_schedule": "linear_increase",
        "top_k_min": 1,
        "top_k_max": 4,
        "log_interval": 2,
        "eval_interval": 4,
        "device": "cpu",
    },
    "eval": {"tgt_len": 16, "batch_size": 2, "top_ks": [1, 2, 4]},
}


def tiny_config(corpus: Path, **sections) -> dict:
    cfg = json.loads(json.dumps(TINY))
    cfg["data"] = {"path": str(corpus)}
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "text.txt"
    path.write_bytes(b"the quick brown fox jumps over the lazy dog. " * 200)
    return path


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HYPERROUTER_CACHE", str(tmp_path / "cache"))


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_metric_formulas() -> None:
    assert metric_value(math.log(2), "char") == pytest.approx(1.0)
    assert metric_value(math.log(50.0), "word") == pytest.approx(50.0)


def test_lr_schedule_cosine_with_warmup() -> None:
    cfg = config_from_dict({"train": {"steps": 100, "lr": 1.0, "lr_min": 0.0, "warmup_steps": 10}})
    assert lr_at(0, cfg) == 0.0 and lr_at(5, cfg) == pytest.approx(0.5)
    assert lr_at(50, cfg) == pytest.approx(0.5) and lr_at(100, cfg) == pytest.approx(0.0)


def test_training_writes_results_checkpoints_and_follows_the_schedule(tmp_path, corpus) -> None:
    cfg = config_from_dict(tiny_config(corpus))
    results = train_run(cfg, tmp_path / "run", progress=False, log=lambda _: None)
    assert results["metric"] == "bpc" and results["split"] == "test"
    assert set(results["by_top_k"]) == {"1", "2", "4"}
    assert set(results["tokens_per_second"]) == {"1", "2", "4", "train"}
    assert results["parameters"]["frozen"] > 0
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk == results
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    train_ks = {r["step"]: r["top_k"] for r in records if r["split"] == "train"}
    # the k used for the step that ended at `step` is the schedule at step - 1
    assert train_ks == {s: cfg.train_top_k(s - 1) for s in (2, 4, 6, 8)}
    assert [cfg.train_top_k(s) for s in range(8)] == [1, 1, 2, 2, 3, 3, 3, 4]
    valid = [r for r in records if r["split"] == "valid"]
    assert {r["checkpoint"] for r in valid} == {"best_train_k", "best_all_experts"}
    index = json.loads((tmp_path / "run" / "checkpoints" / "index.json").read_text())
    assert set(index) == {"latest", "best_train_k", "best_all_experts"}
    folders = {p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.is_dir()}
    assert folders == set(index.values())  # nothing unreferenced is kept


def test_tiny_model_overfits_a_tiny_corpus(tmp_path, corpus) -> None:
    cfg = config_from_dict(
        tiny_config(
            corpus,
            model={**TINY["model"], "dropout": 0.0, "d_model": 32, "d_head": 16, "d_inner": 64},
            train={
                "steps": 150,
                "eval_interval": 150,
                "log_interval": 50,
                "lr": 0.01,
                "warmup_steps": 10,
            },
            eval={"top_ks": [4]},
        )
    )
    results = train_run(cfg, tmp_path / "run", progress=False, log=lambda _: None)
    assert results["by_top_k"]["4"] < 0.5  # a 45-byte cycle: almost no uncertainty left


def test_resume_after_a_kill_gives_the_same_results(tmp_path, corpus, monkeypatch) -> None:
    cfg = config_from_dict(tiny_config(corpus, train={"steps": 12, "eval_interval": 4}))
    straight = train_run(cfg, tmp_path / "a", progress=False, log=lambda _: None)

    # the process dies at step 8, right after its second checkpoint
    train_killed_after_checkpoints(cfg, tmp_path / "b", monkeypatch)
    # a stray partial line and an unfinished checkpoint folder, as a kill could leave
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "split": "tra')
    (tmp_path / "b" / "checkpoints" / ".step-0000012.junk.tmp").mkdir()
    resumed = train_run(None, tmp_path / "b", resume=True, progress=False, log=lambda _: None)
    for key in ("by_top_k", "metric", "checkpoint", "steps", "parameters"):
        assert resumed[key] == straight[key], key
    lines_a = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").open()]
    lines_b = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").open()]
    strip = lambda rs: [{k: v for k, v in r.items() if k != "tokens_per_second"} for r in rs]  # noqa: E731
    assert strip(lines_a) == strip(lines_b)
    assert not (tmp_path / "b" / "checkpoints" / ".step-0000012.junk.tmp").exists()


def test_training_is_deterministic_for_a_seed(tmp_path, corpus) -> None:
    cfg = config_from_dict(tiny_config(corpus, train={"steps": 4, "eval_interval": 4}))
    a = train_run(cfg, tmp_path / "a", progress=False, log=lambda _: None)
    b = train_run(cfg, tmp_path / "b", progress=False, log=lambda _: None)
    assert a["by_top_k"] == b["by_top_k"]


def test_dense_model_trains_and_reports_one_value(tmp_path, corpus) -> None:
    cfg = config_from_dict(tiny_config(corpus, moe={"layers": []}, train={"steps": 4}))
    results = train_run(cfg, tmp_path / "run", progress=False, log=lambda _: None)
    assert list(results["by_top_k"]) == ["1"] and results["parameters"]["frozen"] == 0


def test_word_corpus_reports_perplexity(tmp_path) -> None:
    root = tmp_path / "words"
    root.mkdir()
    line = "a b c d e f g h a b c\n"
    for split, n in (("train", 300), ("valid", 40), ("test", 40)):
        (root / f"wiki.{split}.tokens").write_text(line * n)
    cfg = config_from_dict(
        tiny_config(
            root,
            model={**TINY["model"], "adaptive": True, "cutoffs": [4], "div_val": 2},
            train={"steps": 4},
        )
    )
    results = train_run(cfg, tmp_path / "run", progress=False, log=lambda _: None)
    assert results["metric"] == "ppl" and all(v > 1 for v in results["by_top_k"].values())


# ----------------------------------------------------------------------------- config


def test_every_preset_loads_and_validates() -> None:
    presets = list_presets()
    for name in (
        "quick",
        "enwik8-hyperrouter-cpu",
        "enwik8-smoe_dropout-cpu",
        "enwik8-smoe-cpu",
        "enwik8-dense-cpu",
        "enwik8-dense_dropout-cpu",
        "table1-enwik8-hyperrouter",
        "table1-wt103-smoe_dropout",
        "largescale-large-enwik8-hyperrouter",
    ):
        assert name in presets and presets[name]
    for name in presets:
        cfg = load_config(name)
        assert cfg.name == name
    dense = load_config("table1-enwik8-dense")
    assert dense.moe.layers == [] and dense.model.d_inner == 8192 and dense.model.dropout == 0.0
    assert load_config("table1-enwik8-dense_dropout").model.dropout == 0.1
    smoe = load_config("enwik8-smoe-cpu")
    assert smoe.moe.router == "smoe" and smoe.train_top_k(0) == smoe.train_top_k(10**6) == 2
    hyper = load_config("table1-enwik8-hyperrouter")
    assert hyper.train_top_k(0) == 8 and hyper.train_top_k(400_000) == 16
    assert hyper.moe.router_options == {"hyper_hidden": 256}
    assert load_config("largescale-large-enwik8-smoe_dropout").model.n_layer == 18


def test_overrides_and_config_errors() -> None:
    cfg = load_config(
        "quick",
        [
            "train.steps=7",
            "moe.router_options={hyper_hidden: 8}",
            "eval.top_ks=[1,2]",
            "data.path=null",
        ],
    )
    assert cfg.train.steps == 7 and cfg.moe.router_options == {"hyper_hidden": 8}
    assert cfg.eval.top_ks == [1, 2] and cfg.data.path is None
    with pytest.raises(ValueError, match="unknown config key 'train.stpes'; did you mean 'steps'"):
        load_config("quick", ["train.stpes=3"])
    with pytest.raises(ValueError, match="unknown preset 'quik'; did you mean 'quick'"):
        load_config("quik")
    with pytest.raises(ValueError, match="train.steps must be an integer"):
        load_config("quick", ["train.steps=many"])
    with pytest.raises(ValueError, match=r"eval.top_ks must be in \[1, moe.num_experts=16\]"):
        load_config("quick", ["eval.top_ks=[1,32]"])
    with pytest.raises(ValueError, match="--set expects key=value"):
        load_config("quick", ["train.steps"])


# ----------------------------------------------------------------------------- CLI


def test_cli_train_then_eval(tmp_path, corpus, capsys) -> None:
    cfg_path = tmp_path / "tiny.yaml"
    import yaml

    cfg_path.write_text(yaml.safe_dump(tiny_config(corpus)))
    out = tmp_path / "run"
    code, stdout, _ = run_cli(
        ["train", "--config", str(cfg_path), "--out", str(out), "--no-progress"], capsys
    )
    assert code == 0 and "bpc" in stdout and (out / "results.json").is_file()
    code, stdout, _ = run_cli(
        [
            "eval",
            str(out),
            "--top-k",
            "1,4",
            "--split",
            "valid",
            "--json",
            str(tmp_path / "e.json"),
        ],
        capsys,
    )
    assert code == 0
    evaluated = json.loads((tmp_path / "e.json").read_text())
    assert set(evaluated["by_top_k"]) == {"1", "4"} and evaluated["split"] == "valid"
    # the eval command on the test split reproduces the trainer's final numbers
    code, _, _ = run_cli(["eval", str(out), "--json", str(tmp_path / "t.json")], capsys)
    results = json.loads((out / "results.json").read_text())
    again = json.loads((tmp_path / "t.json").read_text())
    assert again["by_top_k"] == results["by_top_k"]
    # bad inputs on a real run
    code, _, err = run_cli(["eval", str(out), "--top-k", "8"], capsys)
    assert code == 2 and "--top-k values must be in [1, 4]" in err
    folder = (
        out
        / "checkpoints"
        / json.loads((out / "checkpoints" / "index.json").read_text())["best_all_experts"]
    )
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    code, _, err = run_cli(["eval", str(folder)], capsys)
    assert code == 2 and "truncated or corrupt" in err and len(err.strip().splitlines()) == 1


def test_cli_rejects_a_checkpoint_of_another_model(tmp_path, corpus, capsys) -> None:
    import shutil

    a, b = tmp_path / "a", tmp_path / "b"
    train_run(
        config_from_dict(tiny_config(corpus, train={"steps": 2, "eval_interval": 2})),
        a,
        progress=False,
        log=lambda _: None,
    )
    bigger = tiny_config(corpus, train={"steps": 2, "eval_interval": 2})
    bigger["model"]["d_inner"] = 64
    bigger["moe"]["d_expert"] = 16
    train_run(config_from_dict(bigger), b, progress=False, log=lambda _: None)
    fa = next(p for p in (a / "checkpoints").iterdir() if p.is_dir())
    fb = next(p for p in (b / "checkpoints").iterdir() if p.is_dir())
    shutil.copyfile(fb / "model.safetensors", fa / "model.safetensors")
    code, _, err = run_cli(["eval", str(fa)], capsys)
    assert code == 2 and "does not match the model" in err


@pytest.mark.parametrize(
    "setup,args,message",
    [
        ("none", ["--data", "{tmp}/missing.txt"], "data path .*missing.txt does not exist"),
        ("empty", ["--data", "{tmp}/empty.txt"], "empty.txt is empty"),
        ("short", ["--data", "{tmp}/short.txt"], "fewer than one batch needs"),
        ("badword", ["--data", "{tmp}/words", "--set", "data.kind=word"], "not valid UTF-8"),
        ("none", ["--config", "nope"], "unknown preset 'nope'"),
        ("none", ["--set", "model.d_modle=3"], "did you mean 'd_model'"),
        (
            "none",
            ["--set", "eval.top_ks=[32]"],
            r"eval.top_ks must be in \[1, moe.num_experts=16\]",
        ),
        ("none", ["--set", "train.top_k_max=17"], "train.top_k_max <= moe.num_experts=16"),
    ],
)
def test_cli_train_bad_input(tmp_path, capsys, setup, args, message) -> None:
    if setup == "empty":
        (tmp_path / "empty.txt").write_bytes(b"")
    if setup == "short":
        (tmp_path / "short.txt").write_bytes(b"tiny corpus" * 10)
    if setup == "badword":
        (tmp_path / "words").mkdir()
        for split in ("train", "valid", "test"):
            (tmp_path / "words" / f"{split}.txt").write_bytes(b"fine words\n\xfe\xff bad\n")
    out = tmp_path / "run"
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    code, _, err = run_cli(["train", "--out", str(out), "--no-progress", *args], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    import re

    assert re.search(message, err), err
    assert not out.exists()  # nothing left behind


def test_cli_refuses_an_existing_run_without_resume(tmp_path, corpus, capsys) -> None:
    out = tmp_path / "run"
    train_run(
        config_from_dict(tiny_config(corpus, train={"steps": 2, "eval_interval": 2})),
        out,
        progress=False,
        log=lambda _: None,
    )
    before = sorted(p.name for p in out.rglob("*"))
    code, _, err = run_cli(["train", "--data", str(corpus), "--out", str(out)], capsys)
    assert code == 2 and "already holds files; use --resume" in err
    assert sorted(p.name for p in out.rglob("*")) == before
    code, _, err = run_cli(["train", "--out", str(tmp_path / "none"), "--resume"], capsys)
    assert code == 2 and "holds no run to resume" in err


def test_list_configs(capsys) -> None:
    code, out, _ = run_cli(["train", "--list-configs"], capsys)
    assert code == 0 and "table1-enwik8-hyperrouter" in out and "quick" in out


@pytest.mark.slow
@pytest.mark.parametrize(
    "preset", sorted(p for p in list_presets() if p.startswith(("table1", "largescale")))
)
def test_paper_presets_start_training(tmp_path, preset) -> None:
    """Every paper preset runs a couple of steps on CPU (tiny generated data, same model)."""
    words = "word level corpus with some words and more words for the vocabulary\n"
    if "wt103" in preset:
        data = tmp_path / "wt"
        data.mkdir()
        for split in ("train", "valid", "test"):
            (data / f"wiki.{split}.tokens").write_text(words * 3000)
    else:
        data = tmp_path / "enwik.txt"
        data.write_bytes(
            b"<page><title>Anarchism</title><text>some wiki text</text></page>\n" * 5000
        )
    overrides = [
        f"data.path={data}",
        "train.steps=2",
        "train.eval_interval=2",
        "eval.max_valid_batches=1",
        "eval.top_ks=[1]",
        # the preset's model, segment and memory lengths, but 2 sequences per batch instead of
        # 22-44 (44 x 512 tokens x 18 layers would need ~40 GB of activations)
        "train.batch_size=2",
    ]
    cfg = load_config(preset, overrides)
    torch.manual_seed(0)
    results = train_run(cfg, tmp_path / "run", progress=False, log=lambda _: None)
    assert all(math.isfinite(v) for v in results["by_top_k"].values())


def test_batch_chunks_give_the_same_training(tmp_path, corpus) -> None:
    """Gradient accumulation over column chunks (each with its memory) equals the whole batch."""
    no_dropout = {**TINY["model"], "dropout": 0.0}
    results = [
        train_run(
            config_from_dict(
                tiny_config(corpus, model=no_dropout, train={"steps": 4, "batch_chunk": chunks})
            ),
            tmp_path / f"c{chunks}",
            progress=False,
            log=lambda _: None,
        )
        for chunks in (1, 2)
    ]
    # other matmul shapes sum in another order: measured 1.3e-9 relative (2.2e-9 with AVX2
    # kernels) on 2026-12-06; 1e-4 leaves room for a near-tie routing flip at k = 1
    for k, value in results[0]["by_top_k"].items():
        assert results[1]["by_top_k"][k] == pytest.approx(value, rel=1e-4)
    with pytest.raises(ValueError, match="train.batch_chunk must divide"):
        config_from_dict(tiny_config(corpus, train={"batch_chunk": 3}))


def test_default_run_folder_never_overwrites(tmp_path, corpus, capsys, monkeypatch) -> None:
    import yaml

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.yaml").write_text(
        yaml.safe_dump(tiny_config(corpus, train={"steps": 2, "eval_interval": 2}))
    )
    for _ in range(2):
        code, out, _ = run_cli(["train", "--config", "tiny.yaml", "--no-progress"], capsys)
        assert code == 0
    assert (tmp_path / "runs" / "tiny" / "results.json").is_file()
    assert (tmp_path / "runs" / "tiny-2" / "results.json").is_file()
    assert "runs/tiny-2/results.json" in out
