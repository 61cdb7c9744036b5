"""The analytic multiply-add count against torch's FlopCounterMode on the same forward, part by
part, and `hyperrouter bench model` on a tiny model (records, speedups, dense twin, errors)."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from hyperrouter.bench_model import dense_twin, run_model_bench, speedups
from hyperrouter.cli import main
from hyperrouter.cost import Shape, macs_per_token
from hyperrouter.models.transformer_xl import ModelConfig, MoEConfig, TransformerXL
from hyperrouter.train.config import config_from_dict

QLEN, MLEN, BATCH, VOCAB = 6, 5, 3, 50


def _model(router: str = "smoe", **moe) -> TransformerXL:
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=3, n_head=2, d_head=8, d_model=16, d_inner=32, dropout=0.0)
    options = {"hyper_hidden": 8} if router == "hyperrouter" else {}
    moe_cfg = MoEConfig(
        layers=[0, 2], num_experts=4, d_expert=12, router=router, router_options=options, **moe
    )
    return TransformerXL(VOCAB, cfg, moe_cfg, tgt_len=QLEN, mem_len=MLEN, top_k=2).eval()


def _counted(model: TransformerXL) -> dict[str, float]:
    """FlopCounterMode's multiply-adds per target token, grouped into the analytic parts."""
    data = torch.randint(0, VOCAB, (QLEN, BATCH))
    target = torch.randint(0, VOCAB, (QLEN, BATCH))
    with torch.no_grad():
        mems = [m[-MLEN:] for m in model(data, target).mems]
        mems = [m[-MLEN:] for m in model(data, target, mems).mems]
    # with autograd on, the attention takes its explicit path (at inference it runs the fused
    # scaled_dot_product_attention kernel, whose CPU variant FlopCounterMode does not count):
    # the same multiply-adds
    with FlopCounterMode(display=False) as counter:
        model(data, target, mems)
    by_op = counter.get_flop_counts()
    flops = {name: sum(ops.values()) for name, ops in by_op.items()}
    tokens = QLEN * BATCH
    got = dict.fromkeys(("attention_projections", "attention_scores", "experts"), 0.0)
    got |= {"router": 0.0, "dense_ffn": 0.0}
    for i, layer in enumerate(model.layers):
        base = f"TransformerXL.layers.{i}"
        # the projections are the attention's 2-D products (mm, addmm; qkv_net's weight is used
        # through F.linear, so by the attention module itself), the scores its batched ones
        ops = by_op[f"{base}.attn"]
        nets = sum(v for op, v in ops.items() if str(op).split(".")[-1] in ("mm", "addmm"))
        got["attention_projections"] += nets
        got["attention_scores"] += flops[f"{base}.attn"] - nets
        if layer.ff.moe is None:
            got["dense_ffn"] += flops[f"{base}.ff"]
        else:
            router = flops.get(f"{base}.ff.moe.router", 0)
            got["router"] += router
            got["experts"] += flops[f"{base}.ff.moe"] - router
    got["softmax"] = flops["TransformerXL.crit"]
    return {part: value / 2 / tokens for part, value in got.items()}


@pytest.mark.parametrize(
    ("router", "moe"),
    [
        ("smoe", {}),
        ("hyperrouter", {}),
        ("switch", {}),
        ("smoe", {"granularity": 2, "shared_experts": 1}),
        ("smoe", {"activation": "swiglu"}),
    ],
)
@pytest.mark.parametrize("k", [1, 2, 4])
def test_analytic_count_matches_flop_counter_part_by_part(router: str, moe: dict, k: int) -> None:
    model = _model(router, **moe)
    model.set_top_k(k)
    want = _counted(model)
    got = macs_per_token(model, Shape(QLEN, MLEN, BATCH), k)
    for part, value in want.items():
        assert got[part] == pytest.approx(value, rel=1e-9), part


def test_dense_twin_has_ffns_of_k_experts_width() -> None:
    model = _model()
    twin = dense_twin(model, 3)
    assert not twin.moe_layers()
    assert twin.layers[0].ff.core[0].out_features == 3 * 12
    assert twin.layers[1].ff.core[0].out_features == 32  # dense layers keep d_inner
    shape = Shape(QLEN, MLEN, BATCH)
    moe_count = macs_per_token(model, shape, 3)
    twin_count = macs_per_token(twin, shape)
    assert twin_count["dense_ffn"] - 2 * 16 * 32 == moe_count["experts"]


def test_bench_model_times_every_k_and_reports_speedups() -> None:
    model = _model()
    raw = {
        "model": {"n_layer": 3, "n_head": 2, "d_head": 8, "d_model": 16, "d_inner": 32},
        "moe": {"layers": [0, 2], "num_experts": 4, "d_expert": 12, "router": "smoe"},
        "train": {
            "tgt_len": QLEN,
            "mem_len": MLEN,
            "batch_size": 2,
            "top_k_min": 1,
            "top_k_max": 4,
        },
        "eval": {"tgt_len": QLEN, "batch_size": BATCH, "top_ks": [1, 4]},
    }
    records = run_model_bench(model, config_from_dict(raw), repeats=2, warmup=1)
    assert {(r.mode, r.model, r.top_k) for r in records} == {
        (mode, name, k)
        for mode in ("infer", "train")
        for name in ("moe", "dense_twin")
        for k in (1, 4)
    }
    assert all(r.median_ms > 0 and r.min_ms <= r.median_ms <= r.max_ms for r in records)
    table = speedups(records)
    k1 = next(s for s in table if s["mode"] == "infer" and s["top_k"] == 1)
    assert k1["over_k"] == 4 and k1["predicted_speedup"] > 1
    assert model.top_k == 2 and model.mem_len == MLEN  # the model's own k and memory are back


def test_bench_model_memory_longer_than_the_training_memory() -> None:
    """Evaluation keeps mem_len + tgt_len - eval tgt_len rows, more than the model's own
    mem_len: the timed calls see that memory (once a loop waiting for it never ended)."""
    model = _model()
    raw = {
        "model": {"n_layer": 3, "n_head": 2, "d_head": 8, "d_model": 16, "d_inner": 32},
        "moe": {"layers": [0, 2], "num_experts": 4, "d_expert": 12, "router": "smoe"},
        "train": {"tgt_len": 8, "mem_len": MLEN, "batch_size": 2, "top_k_min": 1, "top_k_max": 4},
        "eval": {"tgt_len": 3, "batch_size": BATCH, "top_ks": [1]},
    }
    records = run_model_bench(model, config_from_dict(raw), modes=("infer",), repeats=1, warmup=0)
    assert records[0].macs_per_token["attention_scores"] == 3 * 3 * 2 * 8 * (MLEN + 8)


def test_bench_model_command(tmp_path, capsys) -> None:
    tiny = ["model.n_layer=2", "model.d_model=16", "model.n_head=2", "model.d_head=8"]
    tiny += ["model.d_inner=32", "moe.layers=[0]", "moe.num_experts=4", "moe.d_expert=8"]
    tiny += ["train.top_k_min=1", "train.top_k_max=4", "eval.top_ks=[1,4]", "eval.batch_size=2"]
    tiny += ["eval.tgt_len=8", "train.tgt_len=8", "train.mem_len=8", "train.batch_size=2"]
    args = ["bench", "model", "--config", "quick", "--repeats", "1", "--warmup", "0"]
    for setting in tiny:
        args += ["--set", setting]
    out = tmp_path / "bench.json"
    assert main([*args, "--modes", "infer", "--json", str(out), "--profile"]) == 0
    text = capsys.readouterr().out
    assert "speedup over k=E" in text and "attention" in text and "the rest" in text
    data = json.loads(out.read_text())
    assert {r["top_k"] for r in data["records"]} == {1, 4} and data["speedups"]
    for bad, needle in (
        (["bench", "model"], "RUN_DIR or --config"),
        ([*args, "--top-k", "9"], "--top-k values must be in [1, 4]"),
        ([*args, "--modes", "fly"], "--modes takes infer, train"),
    ):
        assert main(bad) == 2
        assert needle in capsys.readouterr().err
