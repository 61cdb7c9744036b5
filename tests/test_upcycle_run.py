"""`train.init_from`: a run starts from another run's weights, its dense FFNs upcycled into MoE
layers; at step 0 the upcycled model computes what the dense one did (Transformer-XL and the
Qwen3-style decoder, fine-grained too); bad sources are one-line errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from hyperrouter.cli import main
from hyperrouter.train.config import config_from_dict
from hyperrouter.train.upcycle import initialise_from

pytestmark = pytest.mark.usefixtures("isolated_cache")

TXL = {
    "model": {"n_layer": 2, "n_head": 2, "d_head": 8, "d_model": 16, "d_inner": 32},
    "moe": {"layers": [0, 1], "num_experts": 4, "d_expert": 32, "router": "smoe"},
    "train": {"top_k_schedule": "constant", "top_k_min": 2, "top_k_max": 2, "tgt_len": 8},
}
QWEN = {
    "model": {
        "arch": "qwen3",
        "n_layer": 2,
        "n_head": 2,
        "n_kv_head": 1,
        "d_head": 8,
        "d_model": 16,
        "d_inner": 32,
    },  # fmt: skip
    "moe": {
        "layers": [0, 1],
        "num_experts": 4,
        "d_expert": 32,
        "router": "hyperrouter",
        "router_options": {"hyper_hidden": 16},
        "activation": "swiglu",
    },  # fmt: skip
    "train": {
        "top_k_schedule": "constant",
        "top_k_min": 2,
        "top_k_max": 2,
        "mem_len": 0,
        "tgt_len": 8,
    },  # fmt: skip
}


def build(raw: dict, dense: bool, **moe):
    raw = copy.deepcopy(raw)
    raw["eval"] = {"top_ks": [1, 2, 4]}
    raw["moe"].update(moe)
    if dense:
        raw["moe"]["layers"] = []
    torch.manual_seed(1 if dense else 2)
    return config_from_dict(raw).validate().build_model(50).eval()


@pytest.mark.parametrize(
    "raw,moe",
    [
        (TXL, {}),
        (TXL, {"granularity": 2, "d_expert": 32}),
        (QWEN, {}),
        (QWEN, {"router": "smoe", "router_options": {}, "granularity": 2}),
    ],
    ids=["txl", "txl-granularity-2", "qwen3", "qwen3-granularity-2"],
)
def test_the_upcycled_model_computes_what_the_dense_one_did(raw: dict, moe: dict) -> None:
    dense = build(raw, True)
    sparse = build(raw, False, **moe)
    if moe.get("granularity", 1) > 1:
        sparse.set_top_k(4)  # whole copies: k a multiple of the granularity
    data = torch.randint(0, 50, (8, 3))
    with torch.no_grad():
        before = sparse(data, data).loss
    counts = initialise_from(sparse, dense)
    assert counts["upcycled_layers"] == 2 and counts["copied"] > 0
    with torch.no_grad():
        want, got = dense(data, data), sparse(data, data)
    assert not torch.allclose(before, want.loss)
    # the experts' sums run in another order than the dense FFN's: fp32 rounding
    torch.testing.assert_close(got.nll, want.nll, rtol=1e-5, atol=1e-5)


def test_noise_perturbs_the_copies_reproducibly() -> None:
    dense = build(TXL, True)
    a, b = build(TXL, False), build(TXL, False)
    initialise_from(a, dense, noise=0.1, seed=3)
    initialise_from(b, dense, noise=0.1, seed=3)
    wa, wb = a.moe_layers()[0].experts.w_in, b.moe_layers()[0].experts.w_in
    assert torch.equal(wa, wb) and not torch.equal(wa[0], wa[1])


def cli_train(out: Path, corpus: Path, *settings: str) -> int:
    args = ["train", "--config", "quick", "--data", str(corpus), "--out", str(out)]
    base = ["train.steps=2", "train.eval_interval=2", "train.batch_size=2", "train.tgt_len=8",
            "train.mem_len=8", "eval.tgt_len=8", "eval.max_valid_batches=2", "eval.top_ks=[1,2]",
            "model.n_layer=2", "model.d_model=16", "model.n_head=2", "model.d_head=8",
            "model.d_inner=32", "moe.num_experts=4", "moe.d_expert=32",
            "train.top_k_min=1", "train.top_k_max=4"]  # fmt: skip
    for setting in [*base, *settings]:
        args += ["--set", setting]
    return main([*args, "--no-progress"])


def test_a_dense_run_upcycled_through_the_cli(tmp_path: Path, corpus: Path, capsys) -> None:
    assert cli_train(tmp_path / "dense", corpus, "moe.layers=[]") == 0
    capsys.readouterr()
    code = cli_train(
        tmp_path / "moe", corpus, "moe.router=smoe", f"train.init_from={tmp_path / 'dense'}"
    )
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "2 dense FFNs upcycled" in out.out + out.err
    saved = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert saved["train"]["init_from"] == str(tmp_path / "dense")


@pytest.mark.parametrize(
    "settings,needle",
    [
        (["train.init_from=nowhere"], "holds no trained run"),
        (["moe.d_expert=16"], "the experts need 16 -> 16"),
        (["train.init_noise=-1"], "train.init_noise must be >= 0"),
    ],
)
def test_bad_sources_are_one_line_errors(
    settings: list[str], needle: str, tmp_path: Path, corpus: Path, capsys
) -> None:
    assert cli_train(tmp_path / "dense", corpus, "moe.layers=[]") == 0
    capsys.readouterr()
    init = [] if settings[0].startswith("train.init_from") else [
        f"train.init_from={tmp_path / 'dense'}"
    ]  # fmt: skip
    code = cli_train(tmp_path / "moe", corpus, *init, *settings)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "moe").exists()
