"""Per-token k (top-p, weight-ratio skipping): constructed cases, every backend against a naive
per-token reference (forward and gradients), statistics, the model-level switch."""

from __future__ import annotations

import pytest
import torch

from hyperrouter import HyperRouterError, MoE
from hyperrouter.moe.policies import TopP, WeightRatio, apply_policy, parse_token_policy
from tests.test_moe import (
    BACKENDS,
    D,
    E,
    make_layer,
    naive_expert,
    naive_logits,
    outputs_and_grads,
    rel_err,
)


def keep_of(policy, logits, ids, weights=None):
    if weights is None:
        weights = torch.softmax(logits.gather(1, ids), dim=-1)
    return policy.keep(logits, ids, weights)


# ----------------------------------------------------------------------------- constructed cases


def test_top_p_keeps_the_minimal_prefix_reaching_p() -> None:
    # probabilities 0.5, 0.3, 0.15, 0.05 (in expert order 2, 0, 3, 1); slots given unsorted
    logits = torch.log(torch.tensor([[0.3, 0.05, 0.5, 0.15]]))
    ids = torch.tensor([[3, 0, 1, 2]])
    for p, kept_experts in [
        (0.1, {2}),
        (0.5, {2}),  # 0.5 reaches 0.5: one expert
        (0.51, {2, 0}),
        (0.8, {2, 0}),
        (0.81, {2, 0, 3}),
        (0.96, {2, 0, 3, 1}),
        (1.0, {2, 0, 3, 1}),
    ]:
        keep = keep_of(TopP(p=p), logits, ids)
        assert set(ids[keep].tolist()) == kept_experts, p


def test_top_p_one_dominant_expert_and_p_one() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, E)
    logits[2, 5] = 20.0  # token 2: one expert with ~all the mass
    ids = logits.topk(4, dim=-1).indices
    keep = keep_of(TopP(p=0.9), logits, ids)
    assert keep[2].tolist() == [True, False, False, False]
    assert keep_of(TopP(p=1.0), logits, ids).all()  # p = 1: every one of the k_max slots
    assert (keep.sum(1) >= 1).all()  # never an empty token


def test_weight_ratio_keeps_slots_above_r_times_the_largest() -> None:
    weights = torch.tensor([[0.1, 0.6, 0.3], [0.34, 0.33, 0.33]])
    ids = torch.tensor([[0, 1, 2], [0, 1, 2]])
    assert WeightRatio(r=0.0).keep(None, ids, weights).all()  # r = 0 keeps everything
    keep = WeightRatio(r=0.5).keep(None, ids, weights)
    assert keep.tolist() == [[False, True, True], [True, True, True]]
    keep = WeightRatio(r=1.0).keep(None, ids, weights)
    assert keep.tolist() == [[False, True, False], [True, False, False]]


def test_renormalised_weights_are_static_k_weights() -> None:
    torch.manual_seed(1)
    logits = torch.randn(5, E)
    values, ids = logits.topk(E, dim=-1)
    weights = torch.softmax(values, dim=-1)
    keep, w = apply_policy(TopP(p=0.6), logits, ids, weights, None)
    for t in range(5):
        m = int(keep[t].sum())
        assert keep[t, :m].all()  # sorted slots: a prefix
        torch.testing.assert_close(w[t, :m], torch.softmax(values[t, :m], dim=0))
    keep, w = apply_policy(TopP(p=0.6, renormalize=False), logits, ids, weights, None)
    torch.testing.assert_close(w, weights)


def test_bad_policies_are_refused_in_one_line() -> None:
    for bad in ("top_p=0", "top_p=1.5", "ratio=-0.1", "ratio=2", "top_p=x", "topk=2", "top_p"):
        with pytest.raises(HyperRouterError) as err:
            parse_token_policy(bad)
        assert "\n" not in str(err.value)
    with pytest.raises(HyperRouterError, match="k_max"):
        TopP(p=0.5, k_max=0)
    assert parse_token_policy("top_p=0.7", k_max=4) == TopP(k_max=4, p=0.7)
    assert parse_token_policy("ratio=0.25") == WeightRatio(r=0.25)


# ----------------------------------------------------------------------------- the layer


def naive_variable_k(layer: MoE, x: torch.Tensor, policy) -> tuple[torch.Tensor, list[int]]:
    """Per token: the full softmax, experts by decreasing probability, the number m the policy
    keeps among the first k_max, then static top-m (softmax over those m logits) on that token."""
    x_TD = x.reshape(-1, D)
    logits = naive_logits(layer, x_TD)
    k_max = policy.slots(E)
    rows, ms = [], []
    for t in range(x_TD.shape[0]):
        order = sorted(range(E), key=lambda e: -logits[t, e].item())[:k_max]
        probs = torch.softmax(logits[t].detach(), dim=0)
        if isinstance(policy, TopP):
            m, mass = 0, 0.0
            while m < k_max and (m == 0 or mass < policy.p):
                mass += probs[order[m]].item()
                m += 1
        else:
            top = torch.softmax(logits[t, order].detach(), dim=0)
            m = int((top >= policy.r * top.max()).sum())
        chosen = order[:m]
        weights = torch.softmax(torch.stack([logits[t, e] for e in chosen]), dim=0)
        rows.append(sum(w * naive_expert(layer, e, x_TD[t]) for w, e in zip(weights, chosen)))
        ms.append(m)
    return torch.stack(rows).reshape(x.shape), ms


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("router", ["smoe", "hyperrouter"])
@pytest.mark.parametrize(
    "policy", [TopP(p=0.5), TopP(p=0.8, k_max=3), WeightRatio(r=0.6), WeightRatio(r=0.0, k_max=2)]
)
def test_every_backend_matches_the_naive_per_token_reference(router, backend, policy) -> None:
    layer = make_layer(router)
    layer.token_policy = policy
    torch.manual_seed(3)
    x = torch.randn(3, 7, D)
    out, grads = outputs_and_grads(layer, x, lambda x: layer(x, backend=backend))
    ref, ref_grads = outputs_and_grads(layer, x, lambda x: naive_variable_k(layer, x, policy)[0])
    assert rel_err(out, ref) <= 1e-5
    for g, r in zip(grads, ref_grads):
        if r.norm() == 0:
            assert g.norm() == 0
        else:
            assert rel_err(g, r) <= 1e-5
    _, ms = naive_variable_k(layer, x, policy)
    stats = layer(x, backend=backend, return_details=True).stats
    assert stats.mean_k.item() == pytest.approx(sum(ms) / len(ms))
    assert stats.dropped_fraction.item() == 0.0  # the policy's choice is not a drop
    assert stats.top_k == policy.slots(E)


def test_a_policy_that_keeps_k_everywhere_is_static_k() -> None:
    layer = make_layer("smoe").eval()
    x = torch.randn(40, D)
    static = layer(x, top_k=2, return_details=True)
    layer.token_policy = WeightRatio(r=0.0, k_max=2)
    ruled = layer(x, return_details=True)
    torch.testing.assert_close(ruled.output, static.output, rtol=1e-6, atol=1e-7)
    assert ruled.stats.mean_k.item() == 2.0 == static.stats.mean_k.item()


def test_policies_need_per_token_slots_and_scores() -> None:
    with pytest.raises(HyperRouterError, match="every expert"):
        make_layer("dense").token_policy = TopP(p=0.5)
    layer = MoE(D, E, 8, 2, router="hash", router_options={"vocab_size": 50})
    layer.token_policy = TopP(p=0.5)
    with pytest.raises(HyperRouterError, match="scores"):
        layer(torch.randn(4, D), token_ids=torch.arange(4))
    layer.token_policy = WeightRatio(r=0.5)  # weights are enough for the ratio rule
    layer(torch.randn(4, D), token_ids=torch.arange(4))


def test_model_switch_and_lower_cost_with_lower_p() -> None:
    from hyperrouter.train.config import load_config

    config = load_config("quick")
    model = config.build_model(40).eval()
    data = torch.randint(0, 40, (16, 2))
    means = []
    for p in (0.2, 0.6, 1.0):
        model.set_token_policy(TopP(p=p))
        out = model(data)
        means.append(sum(s.mean_k.item() for s in out.moe_stats) / len(out.moe_stats))
    model.set_token_policy(None)
    assert means[0] <= means[1] <= means[2] == model.num_experts
    assert all(layer.token_policy is None for layer in model.moe_layers())


def test_renormalising_keeps_what_the_router_itself_dropped_out() -> None:
    weights = torch.tensor([[0.6, 0.3, 0.1]])
    ids = torch.tensor([[0, 1, 2]])
    router_keep = torch.tensor([[True, False, True]])  # e.g. a capacity drop of slot 1
    keep, w = apply_policy(TopP(p=1.0), torch.zeros(1, 3), ids, weights, router_keep)
    assert keep.tolist() == [[True, False, True]]
    torch.testing.assert_close(w * keep, weights * router_keep)  # p = 1: as the router left it
