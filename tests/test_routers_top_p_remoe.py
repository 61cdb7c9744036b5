"""Defining properties of the top-p (Huang et al. 2024) and ReMoE (Wang et al. 2025) routers on
constructed cases: the kept prefix, the losses against hand computations, the ReLU weights, the
sparsity controller, and one-line errors for bad options."""

from __future__ import annotations

import math

import pytest
import torch

from hyperrouter import MoE
from hyperrouter.errors import HyperRouterError
from hyperrouter.routers import RoutingContext, build_router
from hyperrouter.routers import remoe as remoe_module

D, E = 8, 8


def ctx(k: int, training: bool = False) -> RoutingContext:
    return RoutingContext(top_k=k, training=training)


def top_p_with_probs(probs_TE: torch.Tensor, **options) -> tuple:
    """A top_p router whose gate is the identity and tokens x = log P, so softmax(W x) = P."""
    router = build_router("top_p", E, E, **options)
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(E))
    return router, probs_TE.log()


# ---------------------------------------------------------------- top-p
PROBS = torch.tensor(
    [
        [0.50, 0.25, 0.15, 0.05, 0.02, 0.01, 0.01, 0.01],
        [0.02, 0.03, 0.05, 0.10, 0.30, 0.01, 0.45, 0.04],  # order 6, 4, 3, 2, 7, 1, 0, 5
    ]
)


@pytest.mark.parametrize(
    ("p", "kept"),
    # the fewest experts (by decreasing P) whose cumulative P reaches p; p never equals a partial
    # sum here (such a tie depends on the last bit of a float sum)
    [
        (0.3, ([0], [6])),
        (0.6, ([0, 1], [6, 4])),
        (0.8, ([0, 1, 2], [6, 4, 3])),
        (0.93, ([0, 1, 2, 3], [6, 4, 3, 2, 7])),  # token 1: 0.45 .75 .85 .90 .94
    ],
)
def test_top_p_keeps_the_minimal_prefix_reaching_p(p: float, kept) -> None:
    router, x = top_p_with_probs(PROBS, p=p)
    routing = router(x, ctx(E))
    assert routing.expert_ids[0].tolist() == list(range(E))  # slots sorted by P
    assert routing.expert_ids[1].tolist()[:3] == [6, 4, 3]
    for t in range(2):
        got = routing.expert_ids[t][routing.keep[t]].tolist()
        assert got == kept[t]
        # combine weights: the kept experts' P (the paper's formulation), 0 on dropped slots
        # (rtol: softmax(log P) rounds P by a few ulps)
        want = torch.where(routing.keep[t], PROBS[t][routing.expert_ids[t]], 0.0)
        torch.testing.assert_close(routing.weights[t], want, rtol=1e-6, atol=1e-7)
    mean_k = (len(kept[0]) + len(kept[1])) / 2
    assert routing.stats["mean_k"].item() == pytest.approx(mean_k)


def test_top_p_caps_at_k_max_and_renormalizes_on_request() -> None:
    router, x = top_p_with_probs(PROBS, p=0.95)
    routing = router(x, ctx(2))
    assert routing.expert_ids.shape == (2, 2) and bool(routing.keep.all())
    assert routing.expert_ids.tolist() == [[0, 1], [6, 4]]
    router, x = top_p_with_probs(PROBS, p=0.6, renormalize=True)
    routing = router(x, ctx(E))
    torch.testing.assert_close(routing.weights.sum(-1), torch.ones(2))  # kept weights sum to 1
    torch.testing.assert_close(routing.weights[0, :2], torch.tensor([0.5, 0.25]) / 0.75)


def test_top_p_with_p_one_keeps_every_slot() -> None:
    torch.manual_seed(0)
    router = build_router("top_p", D, E, p=1.0)
    x = torch.randn(16, D)
    for k in (1, 3, E):
        routing = router(x, ctx(k))
        assert routing.keep.shape == (16, k) and bool(routing.keep.all())
        assert routing.stats["mean_k"].item() == k


def test_top_p_losses_match_the_formulas_by_hand() -> None:
    torch.manual_seed(0)
    router = build_router("top_p", D, E, dynamic_loss_weight=0.3, balance_loss_weight=0.7)
    x = torch.randn(10, D)
    routing = router(x, ctx(E))
    probs = torch.softmax(x.double() @ router.gate.weight.double().t(), dim=-1)
    entropy = sum(-sum(p * math.log(p) for p in row.tolist()) for row in probs) / 10
    # rtol: fp32 router math against a float64 hand computation
    assert routing.aux_losses["dynamic_loss"].item() == pytest.approx(0.3 * entropy, rel=1e-5)
    kept = [int(e) for t in range(10) for e in routing.expert_ids[t][routing.keep[t]]]
    f = [kept.count(e) / 10 for e in range(E)]  # tokens that keep expert e, over T
    q = probs.mean(0).tolist()
    balance = E * sum(fi * qi for fi, qi in zip(f, q))
    assert routing.aux_losses["balance_loss"].item() == pytest.approx(0.7 * balance, rel=1e-5)
    defaults = build_router("top_p", D, E)
    assert (defaults.p, defaults.balance_loss_weight, defaults.dynamic_loss_weight) == (
        0.4,
        1e-2,
        1e-4,
    )
    assert defaults.gate.bias is None and not defaults.renormalize


def test_top_p_gate_learns_through_the_combine_weights() -> None:
    torch.manual_seed(0)
    layer = MoE(D, E, 12, E, router="top_p", router_options={"p": 0.6})
    layer.router.balance_loss_weight = 0.0
    layer.router.dynamic_loss_weight = 0.0
    out = layer(torch.randn(12, D), return_details=True)
    assert out.aux_losses == {}
    assert 1 <= out.stats.mean_k.item() < E  # a variable number of experts per token
    out.output.square().sum().backward()
    grad = layer.router.gate.weight.grad
    assert grad is not None and grad.abs().sum() > 0


@pytest.mark.parametrize("p", [0, 0.0, -0.1, 1.5, "0.5", True, None, float("nan")])
def test_top_p_rejects_a_bad_p_in_one_line(p) -> None:
    with pytest.raises(
        HyperRouterError, match=r"router option p must be a number in \(0, 1\]"
    ) as e:
        build_router("top_p", D, E, p=p)
    assert "\n" not in str(e.value)
    with pytest.raises(HyperRouterError, match="dynamic_loss_weight"):
        build_router("top_p", D, E, dynamic_loss_weight=-1)


# ---------------------------------------------------------------- ReMoE
def test_remoe_weights_are_relu_of_the_gate() -> None:
    torch.manual_seed(0)
    router = build_router("remoe", D, E)
    x = torch.randn(20, D)
    relu = torch.relu(x @ router.gate.weight.t())  # no bias in the paper's gate
    assert router.gate.bias is None
    routing = router(x, ctx(E))
    # exact: the same fp32 matmul, gathered
    assert torch.equal(routing.weights, relu.gather(1, routing.expert_ids))
    assert torch.equal(routing.keep, routing.weights > 0)
    for t in range(20):  # at k = E the kept experts are exactly those with R > 0
        kept = set(routing.expert_ids[t][routing.keep[t]].tolist())
        assert kept == set((relu[t] > 0).nonzero().flatten().tolist())
    active = (relu > 0).float()
    assert routing.stats["mean_k"].item() == pytest.approx(active.sum(1).mean().item())
    assert routing.stats["sparsity"].item() == pytest.approx(1 - active.mean().item())
    assert routing.stats["lambda"].item() == pytest.approx(1e-8)
    capped = router(x, ctx(2))  # a smaller k: the two largest R, kept where positive
    assert capped.expert_ids.shape == (20, 2)
    assert torch.equal(capped.weights, relu.topk(2, dim=1).values)
    assert torch.equal(capped.keep, capped.weights > 0)


def test_remoe_l1_loss_matches_the_formula_by_hand() -> None:
    torch.manual_seed(0)
    x = torch.randn(10, D)
    for balanced in (True, False):
        router = build_router(
            "remoe", D, E, target_sparsity=0.75, lambda_0=0.5, balanced_l1=balanced
        )
        relu = torch.relu(x.double() @ router.gate.weight.double().t())
        if balanced:  # f_e = E / (k T) * tokens with R_e > 0, k = E (1 - 0.75) = 2
            f = (relu > 0).sum(0).double() * E / (2 * 10)
        else:
            f = torch.ones(E, dtype=torch.float64)
        want = 0.5 * (relu * f).sum(1).mean().item()
        got = router(x, ctx(E)).aux_losses["l1_loss"].item()
        assert got == pytest.approx(want, rel=1e-5)  # fp32 router against a float64 hand sum


def test_remoe_token_with_no_active_expert_gets_exactly_zero() -> None:
    torch.manual_seed(0)
    layer = MoE(D, E, 12, E, router="remoe")
    with torch.no_grad():
        layer.router.gate.weight.fill_(1.0)
        layer.router.gate.weight[0] = 2.0
    x = torch.randn(4, D).abs() + 0.1
    x[0] = -x[0]  # every logit of token 0 is negative: R = 0 everywhere
    out = layer(x, return_details=True)
    assert torch.equal(out.output[0], torch.zeros(D))
    assert not bool(out.routing.keep[0].any())
    assert bool(out.routing.keep[1:].all()) and bool((out.output[1:] != 0).any())


def drive(router, tokens: int, pairs: int) -> float:
    """One optimizer-step hook after `tokens` routed tokens that used `pairs` experts in all;
    returns the new lambda."""
    router.tokens_since_step.fill_(tokens)
    load = torch.zeros(E, dtype=torch.long)
    load[0] = pairs
    router.optimizer_step(load, step=0)
    return router.l1_coeff.item()


def test_remoe_controller_raises_lambda_below_target_and_lowers_it_above() -> None:
    router = build_router("remoe", D, E, target_sparsity=0.75, lambda_0=1e-3, alpha=2.0)
    x = torch.randn(10, D)
    router(x, ctx(E, training=True))  # forwards never touch lambda, they count the tokens
    router.eval()(x, ctx(E))
    assert router.l1_coeff.item() == pytest.approx(1e-3)
    assert int(router.tokens_since_step) == 10
    # sparsity 1 - 40 / (10 * 8) = 0.5 < 0.75: lambda * 2
    assert drive(router, 10, 40) == pytest.approx(2e-3)
    assert int(router.tokens_since_step) == 0
    assert drive(router, 10, 8) == pytest.approx(1e-3)  # 0.9 > 0.75: lambda / 2
    assert drive(router, 10, 20) == pytest.approx(1e-3)  # exactly 0.75: unchanged
    assert drive(router, 0, 0) == pytest.approx(1e-3)  # no training forward: no update


def test_remoe_controller_counts_every_rank_s_tokens(monkeypatch) -> None:
    """Under torch.distributed the load is summed over ranks: the tokens are scaled to match."""
    router = build_router("remoe", D, E, target_sparsity=0.75, lambda_0=1e-3, alpha=2.0)
    monkeypatch.setattr(remoe_module.dist, "is_available", lambda: True)
    monkeypatch.setattr(remoe_module.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(remoe_module.dist, "get_world_size", lambda *a, **k: 2)
    # 10 tokens here, 2 ranks, 32 pairs in all: 1 - 32 / (20 * 8) = 0.8 > 0.75 (one rank: 0.6)
    assert drive(router, 10, 32) == pytest.approx(5e-4)


def test_remoe_regulariser_moves_the_sparsity_to_the_target() -> None:
    torch.manual_seed(0)
    target = 0.75
    layer = MoE(D, E, 16, E, router="remoe", router_options={"target_sparsity": target})
    layer.router.l1_coeff.fill_(1e-3)  # a faster start than the paper's 1e-8 for 60 steps
    x = torch.randn(64, D) + 1.0  # hidden states share a direction; random ones have none
    goal = torch.randn(64, D)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    sparsity = []
    for step in range(60):
        optimizer.zero_grad()
        out = layer(x, return_details=True)
        loss = (out.output - goal).square().mean() + sum(out.aux_losses.values())
        loss.backward()
        optimizer.step()
        layer.optimizer_step(step)
        sparsity.append(out.stats.extra["sparsity"].item())
    start, end = sparsity[0], sum(sparsity[-5:]) / 5
    assert abs(start - target) > 0.2  # ReLU of small random logits: about half the experts
    assert abs(end - target) < 0.1  # measured 0.75 (seeds 0-3: 0.69 .. 0.81)


def test_remoe_state_dict_keeps_lambda_but_not_the_token_count() -> None:
    router = build_router("remoe", D, E, target_sparsity=0.5, lambda_0=1e-3, alpha=2.0)
    drive(router, 10, 80)  # sparsity 0 < 0.5: lambda doubles
    router.tokens_since_step.fill_(7)
    state = router.state_dict()
    assert "l1_coeff" in state and "tokens_since_step" not in state
    fresh = build_router("remoe", D, E, target_sparsity=0.5)
    fresh.load_state_dict(state)
    assert fresh.l1_coeff.item() == pytest.approx(2e-3)
    assert router.to(torch.bfloat16).l1_coeff.dtype == torch.float32  # lambda stays fp32


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("target_sparsity", 0),
        ("target_sparsity", 1),
        ("target_sparsity", 1.5),
        ("target_sparsity", -0.2),
        ("target_sparsity", "0.5"),
        ("balanced_l1", "yes"),
        ("alpha", 0.5),
        ("lambda_0", -1.0),
        ("init_std", 0),
    ],
)
def test_remoe_rejects_bad_options_in_one_line(option: str, value) -> None:
    with pytest.raises(HyperRouterError, match=f"router option {option} must be") as e:
        build_router("remoe", D, E, **{option: value})
    assert "\n" not in str(e.value)


def test_remoe_default_target_is_one_minus_one_over_e() -> None:
    assert build_router("remoe", D, E).target_sparsity == pytest.approx(1 - 1 / E)
    assert build_router("remoe", D, E).dense_k == pytest.approx(1.0)
    with pytest.raises(HyperRouterError, match="target_sparsity"):
        build_router("remoe", D, 1)  # one expert: 1 - 1/E = 0 is no sparsity
