"""Classic routers (switch, gshard, expert_choice, aux_free): each one's defining property on a
constructed case, and its forward against a direct re-implementation of the paper's formula."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hyperrouter import HyperRouterError, MoE
from hyperrouter.routers import RoutingContext, build_router, router_option_defaults

E, H = 4, 8
BACKENDS = ["reference", "grouped", "dense"]


def make_layer(router: str, top_k: int = 1, d_model: int = E, **router_options) -> MoE:
    """A layer whose router logits are the input itself (gate = identity) when d_model == E."""
    torch.manual_seed(0)
    layer = MoE(d_model, E, H, top_k, router=router, router_options=router_options)
    with torch.no_grad():
        for name, p in layer.experts.named_parameters():
            p.normal_(0.0, 0.3 if name.startswith("w_") else 0.1)
        if d_model == E:
            layer.router.gate.weight.copy_(torch.eye(E))
    return layer


def naive_expert(layer: MoE, e: int, x_D: torch.Tensor) -> torch.Tensor:
    ex = layer.experts
    return torch.relu(x_D @ ex.w_in[e] + ex.b_in[e]) @ ex.w_out[e] + ex.b_out[e]


def naive_output(layer: MoE, x_TD: torch.Tensor, pairs: list[list[tuple[int, torch.Tensor]]]):
    """Per token t: sum of weight * expert(x_t) over its (expert, weight) pairs; 0 with none."""
    rows = [
        sum((w * naive_expert(layer, e, x_TD[t]) for e, w in pairs[t]), torch.zeros(x_TD.shape[1]))
        for t in range(x_TD.shape[0])
    ]
    return torch.stack(rows)


def naive_capacity_keep(ids: list[list[int]], capacity: int, keep=None) -> list[list[bool]]:
    """Slot by slot, token by token: a pair fits while its expert has room."""
    used = [0] * E
    out = [[False] * len(row) for row in ids]
    for slot in range(len(ids[0])):
        for t, row in enumerate(ids):
            if keep is not None and not keep[t][slot]:
                continue
            if used[row[slot]] < capacity:
                used[row[slot]] += 1
                out[t][slot] = True
    return out


def routed_pairs(routing) -> list[list[tuple[int, torch.Tensor]]]:
    keep = (
        routing.keep
        if routing.keep is not None
        else torch.ones_like(routing.expert_ids, dtype=bool)
    )
    return [
        [(int(e), w) for e, w, kept in zip(ids, ws, ks) if kept]
        for ids, ws, ks in zip(routing.expert_ids, routing.weights, keep)
    ]


# ----------------------------------------------------------------------------- switch


def test_switch_capacity_drops_later_tokens_and_dropped_tokens_output_zero() -> None:
    layer = make_layer("switch", top_k=1, capacity_factor=1.0).train()
    # 8 tokens, capacity ceil(8 / 4 * 1) = 2; tokens 0, 2, 3, 5 prefer expert 0, so 3 and 5 drop
    prefs = [0, 1, 0, 0, 2, 0, 1, 3]
    x = torch.full((8, E), -1.0)
    x[torch.arange(8), torch.tensor(prefs)] = 2.0
    for backend in BACKENDS:
        out = layer(x, backend=backend, return_details=True)
        keep = out.routing.keep[:, 0].tolist()
        assert keep == [True, True, True, False, True, False, True, True]
        assert out.output[~out.routing.keep[:, 0]].abs().max() == 0  # exactly 0: residual only
        assert out.output[out.routing.keep[:, 0]].abs().min() > 0
        assert out.stats.dropped_fraction.item() == pytest.approx(2 / 8)
    # in eval the eval capacity (2.0 -> 4 per expert) keeps everyone
    assert layer.eval()(x, return_details=True).routing.keep.all()
    # None: no limit at all
    layer = make_layer("switch", capacity_factor=None).train()
    assert layer(x, return_details=True).routing.keep is None


def test_switch_top2_first_choices_beat_second_choices() -> None:
    layer = make_layer("switch", top_k=2, capacity_factor=0.5).train()
    # T=8, k=2: capacity ceil(8 * 2 / 4 * 0.5) = 2. Token 0's second choice is expert 1, which
    # tokens 1 and 2 take as first choice: token 0's second choice is dropped, not theirs.
    torch.manual_seed(5)
    x = torch.randn(8, E) * 0.1
    x[0, 0], x[0, 1] = 3.0, 2.0
    x[1, 1], x[2, 1] = 3.0, 3.0
    routing = layer(x, return_details=True).routing
    ids = routing.expert_ids.tolist()
    assert [row[0] for row in ids] == x.argmax(-1).tolist()  # slot 0 = argmax
    assert routing.keep.tolist() == naive_capacity_keep(ids, 2)
    assert ids[0] == [0, 1] and not routing.keep[0, 1] and routing.keep[1, 0] and routing.keep[2, 0]


def test_switch_forward_matches_paper_formula() -> None:
    torch.manual_seed(1)
    layer = make_layer("switch", top_k=1, d_model=6, capacity_factor=None).train()
    x = torch.randn(9, 6, requires_grad=True)
    out = layer(x, return_details=True)
    p = torch.softmax(x @ layer.router.gate.weight.T, dim=-1)
    e_star = p.argmax(-1)
    assert torch.equal(out.routing.expert_ids[:, 0], e_star)
    assert torch.allclose(out.routing.weights[:, 0], p.gather(1, e_star[:, None])[:, 0])
    pairs = [[(int(e_star[t]), p[t, e_star[t]])] for t in range(9)]
    assert torch.allclose(out.output, naive_output(layer, x, pairs), atol=1e-6)
    fraction = torch.bincount(e_star, minlength=E).float() / 9
    balance = 0.01 * E * (fraction * p.mean(0)).sum()
    assert torch.allclose(out.aux_losses["balance_loss"], balance)
    # the router gets gradient at k = 1 (the weight is p, not 1)
    out.output.sum().backward()
    assert layer.router.gate.weight.grad.abs().sum() > 0


def test_switch_jitter_only_in_training() -> None:
    layer = make_layer("switch", d_model=6, jitter_eps=0.5, capacity_factor=None)
    x = torch.randn(50, 6)
    torch.manual_seed(0)
    a = layer.router(x, RoutingContext(top_k=1, training=True)).logits
    b = layer.router(x, RoutingContext(top_k=1, training=True)).logits
    assert not torch.equal(a, b)
    plain = x @ layer.router.gate.weight.T
    bound = 0.5 * x.abs() @ layer.router.gate.weight.abs().T  # |W (x * (u - 1))| <= eps |W| |x|
    assert ((a - plain).abs() <= bound + 1e-6).all()
    c = layer.router(x, RoutingContext(top_k=1, training=False)).logits
    assert torch.equal(c, plain)


# ----------------------------------------------------------------------------- gshard


def test_gshard_capacity_first_choices_first() -> None:
    layer = make_layer("gshard", top_k=2, second_expert_policy="all", capacity_factor=0.5).train()
    torch.manual_seed(6)
    x = torch.randn(12, E)
    routing = layer(x, return_details=True).routing
    ids = routing.expert_ids.tolist()
    assert routing.keep.tolist() == naive_capacity_keep(ids, math.ceil(12 * 2 / E * 0.5))
    # dropped pairs output exactly nothing: the output equals the kept pairs alone
    out = layer(x)
    assert torch.allclose(out, naive_output(layer, x, routed_pairs(routing)), atol=1e-6)
    # a token with both pairs dropped outputs exactly 0
    x = torch.full((6, E), -1.0)
    x[:, 0], x[:, 1] = 2.0, 1.0  # everyone: expert 0 then 1; capacity ceil(6 * 2 / 4 * 0.5) = 2
    out = layer(x, return_details=True)
    assert out.routing.keep.tolist() == [[True, True]] * 2 + [[False, False]] * 4
    assert out.output[2:].abs().max() == 0 and out.output[:2].abs().min() > 0


def test_gshard_forward_matches_paper_formula_in_eval() -> None:
    torch.manual_seed(2)
    layer = make_layer("gshard", top_k=2, d_model=6, eval_capacity_factor=None).eval()
    x = torch.randn(10, 6)
    out = layer(x, return_details=True)
    p = torch.softmax(x @ layer.router.gate.weight.T, dim=-1)
    e1 = p.argmax(-1)
    e2 = p.masked_fill(torch.nn.functional.one_hot(e1, E).bool(), -1).argmax(-1)
    g1, g2 = p.gather(1, e1[:, None])[:, 0], p.gather(1, e2[:, None])[:, 0]
    assert torch.equal(out.routing.expert_ids, torch.stack([e1, e2], 1))
    assert torch.allclose(out.routing.weights, torch.stack([g1, g2], 1) / (g1 + g2)[:, None])
    assert out.routing.keep is None  # deterministic: always both
    pairs = [
        [(int(e1[t]), g1[t] / (g1[t] + g2[t])), (int(e2[t]), g2[t] / (g1[t] + g2[t]))]
        for t in range(10)
    ]
    assert torch.allclose(out.output, naive_output(layer, x, pairs), atol=1e-6)
    first_fraction = torch.bincount(e1, minlength=E).float() / 10
    balance = 0.01 * E * (first_fraction * p.mean(0)).sum()
    assert torch.allclose(out.aux_losses["balance_loss"], balance)
    assert torch.equal(layer(x), out.output)


def test_gshard_second_expert_kept_with_probability_two_g2() -> None:
    layer = make_layer("gshard", top_k=2, capacity_factor=None).train()
    # normalised second gates 0.1, 0.25, 0.5 -> keep probability 0.2, 0.5, 1.0
    g2 = torch.tensor([0.1, 0.25, 0.5])
    logits = torch.full((3, E), -30.0)
    logits[:, 0] = torch.log(1 - g2)
    logits[:, 1] = torch.log(g2)
    n = 20000
    x = logits.repeat(n, 1)
    torch.manual_seed(7)
    routing = layer(x, return_details=True).routing
    assert routing.keep[:, 0].all()
    assert torch.allclose(routing.weights[:3, 1], g2, atol=1e-5)
    kept = routing.keep[:, 1].view(n, 3).float().mean(0)
    expected = torch.tensor([0.2, 0.5, 1.0])
    sigma = (expected * (1 - expected) / n).sqrt()
    assert ((kept - expected).abs() <= 4 * sigma + 1e-9).all(), kept
    # eval: always kept, same result every call
    layer.eval()
    a, b = layer(x[:30], return_details=True), layer(x[:30], return_details=True)
    assert a.routing.keep.all() and torch.equal(a.output, b.output)


# ----------------------------------------------------------------------------- expert choice


@pytest.mark.parametrize(
    "num_tokens,top_k,factor", [(10, 2, None), (7, 1, None), (9, 2, 1.5), (5, 1, 8.0)]
)
def test_expert_choice_gives_every_expert_its_capacity(num_tokens, top_k, factor) -> None:
    layer = make_layer("expert_choice", top_k=top_k, d_model=6, capacity_factor=factor)
    torch.manual_seed(3)
    x = torch.randn(num_tokens, 6)
    out = layer(x, return_details=True)
    c = top_k if factor is None else factor
    capacity = min(num_tokens, math.ceil(num_tokens * c / E))
    routing = out.routing
    counts = torch.bincount(routing.expert_ids[routing.keep], minlength=E)
    assert counts.tolist() == [capacity] * E
    assert out.stats.tokens_per_expert.tolist() == [capacity] * E
    # each expert took its top-C tokens by softmax score, weighted by that score
    p = torch.softmax(x @ layer.router.gate.weight.T, dim=-1)
    pairs: list[list] = [[] for _ in range(num_tokens)]
    for e in range(E):
        for t in torch.topk(p[:, e], capacity).indices.tolist():
            pairs[t].append((e, p[t, e]))
    for t in range(num_tokens):
        got = {
            int(e): w
            for e, w, k in zip(*(v[t] for v in (routing.expert_ids, routing.weights, routing.keep)))
            if k
        }
        assert got.keys() == {e for e, _ in pairs[t]}
        assert all(torch.allclose(got[e], w) for e, w in pairs[t])
    assert (routing.weights[~routing.keep] == 0).all()
    assert torch.allclose(out.output, naive_output(layer, x, pairs), atol=1e-6)


def test_expert_choice_backends_and_gradients_agree() -> None:
    layer = make_layer("expert_choice", top_k=2, d_model=6)
    torch.manual_seed(4)
    x = torch.randn(11, 6)
    results = []
    for backend in BACKENDS:
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        layer(xi, backend=backend).square().sum().backward()
        results.append((xi.grad, layer.router.gate.weight.grad.clone()))
    for gx, gw in results[1:]:
        assert torch.allclose(gx, results[0][0], atol=1e-6)
        assert torch.allclose(gw, results[0][1], atol=1e-6)
    assert results[0][1].abs().sum() > 0


def test_expert_choice_depends_on_the_batch() -> None:
    """Not causal: a token's experts change when other tokens join the batch."""
    layer = make_layer("expert_choice", top_k=1).eval()
    x = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    alone = layer(x[:1], return_details=True).routing  # C = ceil(1/4) = 1: every expert takes it
    assert alone.keep.sum() == E
    rival = torch.tensor([[5.0, 0.0, 0.0, 0.0]] * 4)
    together = layer(torch.cat([x[:1], rival]), return_details=True).routing  # C = 2
    assert 0 not in together.expert_ids[0][together.keep[0]].tolist()  # expert 0 took the rivals


# ----------------------------------------------------------------------------- aux-loss-free


def test_aux_free_bias_moves_toward_balance() -> None:
    layer = make_layer("aux_free", top_k=1, d_model=6, bias_update_rate=0.02).train()
    with torch.no_grad():
        layer.router.gate.weight.normal_(0, 0.3)
        layer.router.gate.weight[0] += 0.5  # expert 0 overloaded at the start
    batches = torch.Generator().manual_seed(8)
    imbalance = []  # max / mean load of each optimizer step's last chunk
    for step in range(50):
        for _ in range(2):  # two gradient-accumulation chunks per optimizer step
            x = torch.randn(256, 6, generator=batches) + 1.0
            load = layer(x, return_details=True).stats.tokens_per_expert.float()
        imbalance.append((load.max() / load.mean()).item())
        layer.optimizer_step(step)
    assert layer.router.expert_bias[0] < 0 < layer.router.expert_bias[1:].max()
    assert imbalance[0] > 3 and sum(imbalance[-10:]) / 10 < 1.35, imbalance
    # eval forwards never move the bias
    bias = layer.router.expert_bias.clone()
    layer.eval()(x)
    assert torch.equal(layer.router.expert_bias, bias)


def test_aux_free_update_rule_and_load_from_layer() -> None:
    layer = make_layer("aux_free", top_k=2, bias_update_rate=1e-3).train()
    x = torch.tensor([[4.0, 3.0, 0.0, -1.0]] * 3 + [[0.0, 3.0, 4.0, -1.0]])
    layer(x)
    layer(x)
    layer.optimizer_step(0)  # load [6, 8, 2, 0], mean 4
    assert torch.allclose(layer.router.expert_bias, torch.tensor([-1e-3, -1e-3, 1e-3, 1e-3]))
    layer.optimizer_step(1)  # no forward since: zero load, no change
    assert torch.allclose(layer.router.expert_bias, torch.tensor([-1e-3, -1e-3, 1e-3, 1e-3]))


def test_aux_free_bias_steers_choice_not_weights() -> None:
    torch.manual_seed(9)
    x = torch.randn(20, 6)
    router = build_router("aux_free", 6, E)
    plain = build_router("aux_free", 6, E)
    plain.load_state_dict(router.state_dict())
    ctx = RoutingContext(top_k=2)
    with torch.no_grad():  # a constant shift changes nothing at all
        router.expert_bias.fill_(0.7)
    a, b = router(x, ctx), plain(x, ctx)
    assert torch.equal(a.expert_ids, b.expert_ids) and torch.equal(a.weights, b.weights)
    with torch.no_grad():  # a large bias forces experts 2 and 3; weights stay unbiased sigmoid
        router.expert_bias.copy_(torch.tensor([0.0, 0.0, 10.0, 10.0]))
    a = router(x, ctx)
    assert (
        sorted(a.expert_ids[0].tolist()) == [2, 3]
        and (a.expert_ids.sort(-1).values == torch.tensor([2, 3])).all()
    )
    s = torch.sigmoid(x @ router.gate.weight.T)
    chosen = s.gather(1, a.expert_ids)
    assert torch.allclose(a.weights, chosen / chosen.sum(-1, keepdim=True))
    assert torch.equal(a.logits, plain(x, ctx).logits)


def test_aux_free_forward_matches_formula_and_bias_is_saved() -> None:
    torch.manual_seed(10)
    router = build_router("aux_free", 6, E)
    with torch.no_grad():
        router.expert_bias.copy_(torch.randn(E) * 0.2)
    x = torch.randn(15, 6)
    out = router(x, RoutingContext(top_k=2))
    s = torch.sigmoid(x @ router.gate.weight.T)
    ids = torch.topk(s + router.expert_bias, 2, dim=-1).indices
    assert torch.equal(out.expert_ids.sort(-1).values, ids.sort(-1).values)
    chosen = s.gather(1, out.expert_ids)
    assert torch.allclose(out.weights, chosen / chosen.sum(-1, keepdim=True))
    # persistent buffer, not a parameter; kept in fp32 when the module is cast
    assert "expert_bias" in router.state_dict()
    assert all(p is not router.expert_bias for p in router.parameters())
    fresh = build_router("aux_free", 6, E)
    fresh.load_state_dict(router.state_dict())
    assert torch.equal(fresh.expert_bias, router.expert_bias)
    half = build_router("aux_free", 6, E).to(torch.bfloat16)
    assert half.expert_bias.dtype == torch.float32 and half.gate.weight.dtype == torch.bfloat16


# ----------------------------------------------------------------------------- all four


@pytest.mark.parametrize(
    "name,k", [("switch", 1), ("gshard", 2), ("expert_choice", 2), ("aux_free", 2)]
)
def test_empty_batch_dtypes_and_eval_determinism(name: str, k: int) -> None:
    layer = make_layer(name, top_k=k, d_model=6)
    layer.train()
    out = layer(torch.randn(0, 6, requires_grad=True), return_details=True)
    assert out.output.shape == (0, 6)
    layer.eval()
    torch.manual_seed(11)
    x = torch.randn(3, 5, 6)
    assert torch.equal(layer(x), layer(x))
    for dtype in (torch.float64, torch.bfloat16):
        routing = layer.router.to(dtype)(x.reshape(-1, 6).to(dtype), RoutingContext(top_k=k))
        assert routing.weights.dtype in (torch.float32, torch.float64)
        layer.router.float()
    if name != "expert_choice":  # k changes between calls
        for kk in (1, 3):
            assert layer(x, top_k=kk, return_details=True).routing.expert_ids.shape == (15, kk)


@pytest.mark.parametrize(
    "name,options,needle",
    [
        ("switch", {"capacity_factor": 0}, "capacity_factor must be a number > 0 or None"),
        ("switch", {"capacity_factor": -1.0}, "capacity_factor"),
        ("switch", {"eval_capacity_factor": 0.0}, "eval_capacity_factor"),
        ("switch", {"jitter_eps": 1.5}, "jitter_eps must be a number in [0, 1)"),
        ("switch", {"score": "nope"}, "unknown score"),
        ("gshard", {"capacity_factor": 0}, "capacity_factor"),
        ("gshard", {"second_expert_policy": "sometimes"}, "second_expert_policy must be one of"),
        ("gshard", {"score": "sigmoid"}, "unknown option(s) score"),
        ("expert_choice", {"capacity_factor": 0.0}, "capacity_factor must be a number > 0"),
        ("expert_choice", {"capacity_factor": -2}, "capacity_factor"),
        ("expert_choice", {"balance_loss_weight": 0.01}, "unknown option(s) balance_loss_weight"),
        ("aux_free", {"bias_update_rate": -1e-3}, "bias_update_rate must be a number >= 0"),
        ("aux_free", {"score": "relu"}, "unknown score"),
    ],
)
def test_bad_options_raise_one_line_errors(name: str, options: dict, needle: str) -> None:
    with pytest.raises(HyperRouterError) as info:
        build_router(name, 6, E, **options)
    message = str(info.value)
    assert needle in message and "\n" not in message


def test_option_defaults_follow_the_papers() -> None:
    switch = router_option_defaults("switch")
    assert switch["capacity_factor"] == 1.0 and switch["eval_capacity_factor"] == 2.0
    assert switch["balance_loss_weight"] == 0.01 and switch["jitter_eps"] == 0.0
    assert switch["score"] == "softmax_topk" and switch["renormalize"] is False
    gshard = router_option_defaults("gshard")
    assert gshard["balance_loss_weight"] == 0.01 and gshard["second_expert_policy"] == "random"
    assert router_option_defaults("expert_choice")["capacity_factor"] is None
    aux = router_option_defaults("aux_free")
    assert aux["bias_update_rate"] == 1e-3 and aux["score"] == "sigmoid" and aux["renormalize"]
    assert aux["balance_loss_weight"] == 0.0
    for name in ("switch", "gshard", "expert_choice", "aux_free"):
        assert isinstance(build_router(name, 6, E), nn.Module)
