"""Config merging and resuming as a user expects: router options do not leak into another router,
`--resume` accepts the run's own preset and flags and names exactly the keys that differ, every
list of k values is checked alike, validation prints one line, and evaluation shows progress."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from hyperrouter.cli import main
from hyperrouter.errors import HyperRouterError
from hyperrouter.train.config import apply_overrides, config_diff, load_config, load_raw
from hyperrouter.train.finetune import FinetuneConfig, load_finetune_config

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
        "top_k_max": 2,
        "log_interval": 1,
        "eval_interval": 2,
        "device": "cpu",
    },
    "eval": {"tgt_len": 16, "batch_size": 2, "top_ks": [1, 4], "max_valid_batches": 2},
}


@pytest.fixture
def world(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("HYPERROUTER_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    Path("text.txt").write_bytes(b"the quick brown fox jumps over the lazy dog. " * 200)
    Path("tiny.yaml").write_text(yaml.safe_dump(TINY))
    return tmp_path


def run(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


# --------------------------------------------------------------------------- router options


def test_switching_the_router_drops_the_inherited_router_options() -> None:
    # quick inherits hyper_hidden from enwik8-hyperrouter-cpu (the README's command)
    config = load_config("quick", ["train.steps=50", "moe.router=smoe_dropout"])
    assert config.moe.router == "smoe_dropout" and config.moe.router_options == {}
    # options given with the switch are kept, in either order
    for overrides in (
        ["moe.router=smoe", "moe.router_options={bias: false}"],
        ["moe.router_options={bias: false}", "moe.router=smoe"],
    ):
        assert load_config("quick", overrides).moe.router_options == {"bias": False}
    # the same router keeps its options
    assert load_config("quick", ["moe.router=hyperrouter"]).moe.router_options == {
        "hyper_hidden": 256
    }
    # fine-tuning presets merge the same way
    finetune = load_finetune_config("sst2-cpu", ["moe.router=smoe_dropout"])
    assert finetune.moe.router_options == {}


def test_a_preset_that_switches_the_router_starts_without_the_base_options(tmp_path) -> None:
    preset = tmp_path / "mine.yaml"
    preset.write_text("base: enwik8-hyperrouter-cpu\nmoe: {router: smoe}\n")
    assert load_raw(str(preset))["moe"]["router_options"] == {}
    assert load_config(str(preset)).moe.router == "smoe"


def test_apply_overrides_keeps_sections_it_does_not_touch() -> None:
    raw = {"moe": {"router": "hyperrouter", "router_options": {"hyper_hidden": 8}}}
    assert apply_overrides(raw, ["train.steps=3"])["moe"] == raw["moe"]


# --------------------------------------------------------------------------- resume


def test_resume_accepts_the_same_preset_without_the_data_flag(world, capsys) -> None:
    """README: `train --config P --data D --out R`, then `train --config P --out R --resume`."""
    code, _, err = run(
        ["train", "--config", "tiny.yaml", "--data", "text.txt", "--out", "r"], capsys
    )
    assert code == 0, err
    for extra in (
        [],
        ["--config", "tiny.yaml"],
        ["--config", "tiny.yaml", "--data", "text.txt"],
        ["--config", "tiny.yaml", "--data", os.path.abspath("text.txt")],  # same file
        ["--set", "train.steps=2"],  # --set alone is compared with the run's own value
    ):
        code, out, err = run(["train", "--out", "r", "--resume", "--no-progress", *extra], capsys)
        assert code == 0, (extra, err)
        assert "results: r/results.json" in out


def test_resume_names_exactly_the_keys_that_differ(world, capsys) -> None:
    code, _, _ = run(["train", "--config", "tiny.yaml", "--data", "text.txt", "--out", "r"], capsys)
    assert code == 0
    code, _, err = run(
        ["train", "--config", "tiny.yaml", "--out", "r", "--resume", "--set", "train.steps=50"],
        capsys,
    )
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "train.steps: 2 (run) vs 50 (given)" in err
    assert "data.path" not in err and "model." not in err
    shutil.copy("text.txt", "other.txt")
    code, _, err = run(["train", "--out", "r", "--resume", "--data", "other.txt"], capsys)
    assert code == 2 and 'data.path: "text.txt" (run) vs "other.txt" (given)' in err


def test_config_diff_lists_nested_keys_in_order() -> None:
    run_cfg = {"name": "a", "description": "x", "moe": {"router_options": {"h": 1}}, "t": 1}
    given = {"name": "a", "description": "y", "moe": {"router_options": {}}, "t": 2}
    assert config_diff(run_cfg, given) == [
        "moe.router_options.h: 1 (run) vs unset (given)",
        "t: 1 (run) vs 2 (given)",
    ]


# --------------------------------------------------------------------------- k values


@pytest.mark.parametrize(
    "override,message",
    [
        ("eval.top_ks=[]", "eval.top_ks must list at least one k"),
        ("eval.top_ks=[0]", r"eval.top_ks must be in \[1, "),
        ("eval.top_ks=[17]", r"eval.top_ks must be in \[1, "),
    ],
)
def test_every_k_list_is_checked(override, message) -> None:
    with pytest.raises(HyperRouterError, match=message):
        load_config("quick", [override])


def test_finetune_k_lists_are_checked() -> None:
    with pytest.raises(HyperRouterError, match="test_top_ks must list at least one k"):
        FinetuneConfig(test_top_ks=[]).validate()


def test_finetune_rejects_test_k_above_the_experts(world, capsys) -> None:
    run(["train", "--config", "tiny.yaml", "--data", "text.txt", "--out", "r"], capsys)
    task = Path("task")
    task.mkdir()
    for split in ("train", "dev", "test"):
        (task / f"stsa.binary.{split}").write_text("1 yes yes\n0 no no\n" * 6)
    code, _, err = run(
        ["finetune", "--data", "task", "--init", "r", "--out", "f", "--set", "test_top_ks=[1,8]"]
        + ["--set", "top_k_min=4", "--set", "top_k_max=4"],
        capsys,
    )
    assert code == 2 and r"test_top_ks must be in [1, 4] (experts per layer), got [8]" in err
    assert not Path("f").exists()


# --------------------------------------------------------------------------- output


def test_validation_prints_one_line_and_eval_shows_progress(world, capsys) -> None:
    code, out, err = run(
        ["train", "--config", "tiny.yaml", "--data", "text.txt", "--out", "r"]
        + [
            "--set",
            "train.steps=4",
            "--set",
            "train.top_k_max=4",
            "--set",
            "train.schedule_steps=2",
        ],
        capsys,
    )
    assert code == 0
    valid = [line for line in (out + err).splitlines() if "valid bpc" in line]
    # step 2 at k < 4, step 4 at k = 4 = all experts: evaluated and printed once
    assert len(valid) == 2, valid
    assert " at k=" in valid[0] and valid[0].endswith("at all 4 experts")
    assert "k=" not in valid[1] and valid[1].endswith("at all 4 experts")
    records = [json.loads(line) for line in Path("r/metrics.jsonl").read_text().splitlines()]
    at_end = [r for r in records if r["split"] == "valid" and r["step"] == 4]
    assert {r["checkpoint"] for r in at_end} == {"best_train_k", "best_all_experts"}
    assert "evaluate" in err  # the final test pass has a progress bar
    code, _, err = run(["eval", "r", "--top-k", "1,4"], capsys)
    assert code == 0 and "evaluate" in err
    code, _, err = run(["eval", "r", "--top-k", "1,4", "--no-progress"], capsys)
    assert code == 0 and err == ""


def test_a_checkpoint_that_disagrees_with_its_config_names_the_tensors(world, capsys) -> None:
    run(["train", "--config", "tiny.yaml", "--data", "text.txt", "--out", "a"], capsys)
    run(
        ["train", "--config", "tiny.yaml", "--data", "text.txt", "--out", "b"]
        + ["--set", "moe.d_expert=12"],
        capsys,
    )
    index = json.loads(Path("a/checkpoints/index.json").read_text())
    folder = Path("a/checkpoints") / index["best_all_experts"]
    other = json.loads(Path("b/checkpoints/index.json").read_text())["best_all_experts"]
    shutil.copy(Path("b/checkpoints") / other / "model.safetensors", folder / "model.safetensors")
    code, _, err = run(["eval", str(folder)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "does not match the model its config.json describes" in err
    assert "experts.w_in is [4, 16, 12] in the file but [4, 16, 8] in the model" in err
