"""MoE++ (Jin et al. 2025) as layer options: zero, copy and constant experts beside the FFN
experts, their heterogeneous balance loss, and the gating residual between MoE layers."""

from __future__ import annotations

import pytest
import torch

from hyperrouter import MoE
from hyperrouter.errors import HyperRouterError
from hyperrouter.models.transformer_xl import ModelConfig, MoEConfig, TransformerXL
from hyperrouter.params import trainable_parameters

D, E, H = 8, 3, 12
ZC = {"constant_experts": 2, "copy_experts": 1, "zero_experts": 1}  # ids 3, 4 | 5 | 6


def make(seed: int = 0, top_k: int = 2, **kwargs) -> MoE:
    torch.manual_seed(seed)
    options = {**ZC, **kwargs}
    layer = MoE(D, E, H, top_k, router="smoe", **options)
    with torch.no_grad():
        for name, p in layer.experts.named_parameters():
            p.normal_(0.0, 0.3 if name.startswith("w_") else 0.1)
    return layer


def force(layer: MoE, expert: int) -> None:
    """Every token's first choice is `expert` (the gate's bias dominates, the weight is 0)."""
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.gate.bias.fill_(-10.0)
        layer.router.gate.bias[expert] = 10.0


def ffn(layer: MoE, e: int, x_D: torch.Tensor) -> torch.Tensor:
    ex = layer.experts
    return torch.relu(x_D @ ex.w_in[e] + ex.b_in[e]) @ ex.w_out[e] + ex.b_out[e]


def zc_expert(layer: MoE, e: int, x_D: torch.Tensor) -> torch.Tensor:
    """The paper's formulas, one token at a time."""
    if e in (3, 4):  # constant experts
        j = e - 3
        zc = layer.zero_computation
        a = torch.softmax(zc.constant_gate[j] @ x_D, dim=0)
        return a[0] * x_D + a[1] * zc.constant[j]
    if e == 5:  # copy
        return x_D
    return torch.zeros_like(x_D)  # zero


def naive(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    logits = layer.router.gate(x)
    values, ids = logits.topk(layer.top_k, dim=-1)
    weights = torch.softmax(values, dim=-1)
    rows = []
    for t in range(x.shape[0]):
        row = torch.zeros(D)
        for j in range(layer.top_k):
            e = int(ids[t, j])
            out = ffn(layer, e, x[t]) if e < E else zc_expert(layer, e, x[t])
            row = row + weights[t, j] * out
        rows.append(row)
    return torch.stack(rows)


def test_each_kind_returns_its_formula() -> None:
    x = torch.randn(5, D)
    for expert, want in ((6, torch.zeros(5, D)), (5, x)):
        layer = make(top_k=1).eval()
        force(layer, expert)
        out = layer(x, return_details=True)
        torch.testing.assert_close(out.output, want, rtol=0, atol=0)
        assert out.stats.mean_k.item() == 0.0  # no FFN computed
        assert int(out.stats.tokens_per_expert[expert]) == 5
    layer = make(top_k=1).eval()
    force(layer, 4)
    zc = layer.zero_computation
    a = torch.softmax(x @ zc.constant_gate[1].T, dim=-1)
    torch.testing.assert_close(layer(x), a[:, :1] * x + a[:, 1:] * zc.constant[1])
    assert layer(x, return_details=True).stats.extra["constant_share"].item() == 1.0


@pytest.mark.parametrize("backend", ["grouped", "reference", "dense"])
def test_layer_matches_a_naive_loop_forward_and_every_gradient(backend: str) -> None:
    layer = make(backend=backend, zc_balance_loss_weight=0.0).train()
    torch.manual_seed(1)
    x, g = torch.randn(40, D), torch.randn(40, D)
    results = []
    for fn in (lambda t: layer(t), lambda t: naive(layer, t)):
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        out = fn(xi)
        (out * g).sum().backward()
        params = trainable_parameters(layer)
        grads = [xi.grad] + [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        results.append((out.detach(), grads))
    (out, got), (ref, want) = results
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(got, want):  # fp32 sums in another order: 1e-5 relative
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    ids = layer.router.gate(x).topk(2, dim=-1).indices
    assert (ids >= E).any() and (ids < E).any()  # both kinds exercised


def test_statistics_count_ffn_experts_and_each_kinds_share() -> None:
    layer = make().eval()
    x = torch.randn(64, D)
    out = layer(x, return_details=True)
    ids = out.routing.expert_ids
    assert out.stats.tokens_per_expert.shape == (E + 4,)
    assert out.stats.mean_k.item() == pytest.approx((ids < E).sum().item() / 64)
    shares = out.stats.extra
    assert sum(shares[f"{k}_share"].item() for k in ("constant", "copy", "zero")) == pytest.approx(
        1 - shares["ffn_share"].item()
    )


def test_heterogeneous_balance_loss_by_hand() -> None:
    layer = make(zc_balance_loss_weight=0.01, zc_tau=0.5).train()
    x = torch.randn(30, D)
    out = layer(x, return_details=True)
    logits = layer.router.gate(x)
    probs = torch.softmax(logits, -1)
    ids = logits.topk(2, dim=-1).indices
    counts = torch.bincount(ids.reshape(-1), minlength=E + 4).float()
    f, p = counts / counts.sum(), probs.mean(0)
    eta = torch.tensor([1.0] * E + [0.5] * 4)
    want = 0.01 * (E + 4) * (eta * f * p).sum()
    torch.testing.assert_close(out.aux_losses["zc_balance_loss"], want)


def test_gating_residual_adds_the_previous_layers_logits_through_w_g() -> None:
    layer = make(gating_residual=True).eval()
    x, prev = torch.randn(6, D), torch.randn(6, E + 4)
    out = layer(x, previous_logits=prev, return_details=True)
    want = layer.router.gate(x) + prev @ layer.gate_map.weight.T
    torch.testing.assert_close(out.routing.logits, want)
    plain = layer(x, return_details=True)  # the first MoE layer: nothing added
    torch.testing.assert_close(plain.routing.logits, layer.router.gate(x))
    with pytest.raises(HyperRouterError, match=r"previous_logits must be \[tokens, experts\]"):
        layer(x, previous_logits=torch.randn(6, E))


def test_a_model_chains_the_residual_from_layer_to_layer_and_trains() -> None:
    torch.manual_seed(0)
    moe = MoEConfig(layers=[0, 1], num_experts=4, d_expert=8, router="smoe", gating_residual=True,
                    **ZC)  # fmt: skip
    cfg = ModelConfig(n_layer=2, n_head=2, d_head=4, d_model=8, d_inner=16)
    model = TransformerXL(20, cfg, moe, tgt_len=6, mem_len=6, top_k=2)
    data = torch.randint(0, 20, (6, 3))
    x2 = None

    def capture(module, args, kwargs):
        nonlocal x2
        x2 = args[0]

    handle = model.layers[1].ff.moe.register_forward_pre_hook(capture, with_kwargs=True)
    model.eval()
    with torch.no_grad():
        out = model(data, data)
    handle.remove()
    first, second = out.moe_outputs
    layer = model.layers[1].ff.moe
    want = layer.router.gate(x2.reshape(-1, 8)) + layer.gate_map(first.routing.logits)
    torch.testing.assert_close(second.routing.logits, want)
    model.train()
    loss = model(data, data)
    (loss.loss + loss.aux_loss).backward()
    assert model.layers[1].ff.moe.gate_map.weight.grad.abs().sum() > 0
    assert model.layers[0].ff.moe.zero_computation.constant.grad is not None


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"router": "hash"}, "gating_residual needs a logit router"),
        ({"router": "locmoe"}, "gating_residual needs a logit router"),
    ],
)
def test_gating_residual_needs_a_router_that_chooses_from_its_scores(kwargs, message) -> None:
    with pytest.raises(HyperRouterError, match=message):
        MoE(D, 4, H, 1, gating_residual=True, **kwargs)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"zero_experts": -1}, "zero_experts must be an integer >= 0"),
        ({"copy_experts": 1.5}, "copy_experts must be an integer >= 0"),
        ({"zero_experts": 1, "zc_tau": -1}, "zc_tau must be a number >= 0"),
        ({"zero_experts": 1, "router": "smear"}, "zero-computation experts need a router"),
        ({"zero_experts": 1, "router": "dense"}, "zero-computation experts need a router"),
    ],
)
def test_bad_options_are_one_line_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(HyperRouterError, match=message) as info:
        MoE(D, 4, H, 1, **kwargs)
    assert "\n" not in str(info.value)


def test_evaluation_charges_the_ffn_experts_computed_not_k() -> None:
    """Every token on the zero expert: the measured mean k is 0 in every layer, and the
    results' multiply-adds are those of k = 0 (the router's and attention's only)."""
    from hyperrouter.cost import Shape, macs_per_token
    from hyperrouter.train.config import RunConfig
    from hyperrouter.train.evaluate import cost_and_aiq, evaluate

    torch.manual_seed(0)
    moe = MoEConfig(layers=[0, 1], num_experts=4, d_expert=8, router="smoe", **ZC)
    cfg = ModelConfig(n_layer=2, n_head=2, d_head=4, d_model=8, d_inner=16)
    model = TransformerXL(20, cfg, moe, tgt_len=6, mem_len=6, top_k=1)
    for layer in model.moe_layers():
        force(layer, 4 + 3)  # the zero expert (4 FFN + 2 constant + 1 copy)
    data = torch.randint(0, 20, (200,))
    result = evaluate(
        model, data, batch_size=2, tgt_len=6, mem_len=6, top_k=1, device=torch.device("cpu")
    )
    assert result.mean_k == [0.0, 0.0]
    run = RunConfig(model=cfg, moe=moe)
    run.eval.tgt_len, run.eval.batch_size, run.train.mem_len, run.train.tgt_len = 6, 2, 6, 6
    out = cost_and_aiq(model, run, "bpc", {"1": 3.0}, {"1": 1e4}, {"1": result.mean_k})
    shape = Shape(6, 6, 2)
    assert out["cost"]["macs_per_token"]["1"] == round(
        sum(macs_per_token(model, shape, 0).values()), 1
    )
    assert out["cost"]["macs_per_token"]["1"] < sum(macs_per_token(model, shape, 1).values())
    assert out["mean_k"] == {"1": [0.0, 0.0]}
