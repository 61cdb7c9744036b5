"""SMEAR: the merge dispatch against per-token merged parameters, causal and whole-sequence
summaries, expert dropout."""

from __future__ import annotations

import pytest
import torch

from hyperrouter import HyperRouterError, MoE
from hyperrouter.routers.smear import sequence_summary

E, D, H = 4, 8, 12


def naive_merged(layer: MoE, x_TD: torch.Tensor, w_TE: torch.Tensor) -> torch.Tensor:
    ex = layer.experts
    rows = []
    for t in range(x_TD.shape[0]):
        w_in = torch.einsum("e,edh->dh", w_TE[t], ex.w_in)
        b_in = w_TE[t] @ ex.b_in
        w_out = torch.einsum("e,ehd->hd", w_TE[t], ex.w_out)
        b_out = w_TE[t] @ ex.b_out
        h = ex.hidden(x_TD[t] @ w_in + b_in)
        rows.append(h @ w_out + b_out)
    return torch.stack(rows)


@pytest.mark.parametrize("activation", ["relu", "swiglu"])
def test_merge_dispatch_equals_running_the_merged_expert(activation: str) -> None:
    torch.manual_seed(0)
    layer = MoE(D, E, H, 1, router="smear", activation=activation).eval()
    with torch.no_grad():
        for p in layer.experts.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(2, 5, D, requires_grad=True)
    seq = torch.tensor([[0] * 5, [1] * 5])
    out = layer(x, sequence_ids=seq, return_details=True)
    w_TE = out.routing.weights
    ref = naive_merged(layer, x.reshape(-1, D), w_TE).reshape(2, 5, D)
    torch.testing.assert_close(out.output, ref, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(ref)
    wrt = [x, layer.experts.w_in, layer.router.gate.weight]
    got = torch.autograd.grad((out.output * g).sum(), wrt, retain_graph=True)
    want = torch.autograd.grad((ref * g).sum(), wrt)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_summaries_causal_prefix_mean_and_whole_sequence_mean() -> None:
    x = torch.tensor([[1.0], [10.0], [3.0], [20.0], [5.0]])
    seq = torch.tensor([0, 1, 0, 1, 0])
    causal = sequence_summary(x, seq, causal=True).flatten().tolist()
    assert causal == pytest.approx([1.0, 10.0, 2.0, 15.0, 3.0])
    whole = sequence_summary(x, seq, causal=False).flatten().tolist()
    assert whole == pytest.approx([3.0, 15.0, 3.0, 15.0, 3.0])


def test_causal_routing_does_not_see_the_future() -> None:
    torch.manual_seed(0)
    layer = MoE(D, E, H, 1, router="smear").eval()
    x = torch.randn(6, 1, D)
    seq = torch.zeros(6, 1, dtype=torch.long)
    full = layer(x, sequence_ids=seq)
    changed = x.clone()
    changed[4:] += 5.0  # the future changes
    prefix = layer(changed, sequence_ids=seq)
    torch.testing.assert_close(prefix[:4], full[:4])
    mean_layer = MoE(D, E, H, 1, router="smear", router_options={"summary": "mean"}).eval()
    mean_layer.load_state_dict(layer.state_dict())
    # the paper's whole-sequence mean does see it: the first tokens' routing changes
    a = mean_layer(changed, sequence_ids=seq, return_details=True).routing.weights[:4]
    b = mean_layer(x, sequence_ids=seq, return_details=True).routing.weights[:4]
    assert not torch.equal(a, b)
    a = layer(changed, sequence_ids=seq, return_details=True).routing.weights[:4]
    b = layer(x, sequence_ids=seq, return_details=True).routing.weights[:4]
    assert torch.equal(a, b)


def test_expert_dropout_only_in_training_and_weights_stay_normalised() -> None:
    torch.manual_seed(0)
    layer = MoE(D, E, H, 1, router="smear", router_options={"expert_dropout": 0.5})
    x = torch.randn(40, D)
    train = layer.train()(x, return_details=True).routing.weights
    assert (train == 0).any()
    torch.testing.assert_close(train.sum(-1), torch.ones(40))
    ev = layer.eval()(x, return_details=True).routing.weights
    assert (ev > 0).all()
    with pytest.raises(HyperRouterError, match="expert_dropout must be a number in"):
        MoE(D, E, H, 1, router="smear", router_options={"expert_dropout": 1.0})


def test_one_hot_router_probabilities_run_that_single_expert() -> None:
    from hyperrouter.moe.dispatch import LocalDispatcher, Routed
    from hyperrouter.routers import Routing

    torch.manual_seed(0)
    layer = MoE(D, E, H, 1, router="smear").eval()
    x = torch.randn(5, D)
    for e in range(E):
        ids = torch.arange(E).expand(5, -1)
        weights = torch.nn.functional.one_hot(torch.full((5,), e), E).float()
        routed = Routed(x, Routing(ids, weights), None, "auto", x.dtype, False)
        y = LocalDispatcher().merge(layer.experts, routed)
        torch.testing.assert_close(y, layer.experts.expert_forward(e, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("summary", ["mean", "causal"])
def test_expert_dropout_draws_one_mask_per_sequence(summary: str) -> None:
    """As the reference (one mask per example): every token of a sequence merges the same
    experts, so with the whole-sequence mean one sequence gets one merged expert."""
    torch.manual_seed(0)
    options = {"expert_dropout": 0.5, "summary": summary}
    layer = MoE(D, E, H, 1, router="smear", router_options=options).train()
    x = torch.randn(2, 10, D)
    sequence_ids = torch.arange(2).unsqueeze(1).expand(2, 10)
    routing = layer(x, return_details=True, sequence_ids=sequence_ids).routing
    dropped = (routing.weights == 0).reshape(2, 10, E)
    for s in range(2):
        assert (dropped[s] == dropped[s, 0]).all()  # one mask per sequence
    assert (dropped[0] != dropped[1]).any()  # drawn per sequence, not once per call
    if summary == "mean":
        assert torch.unique(routing.weights.reshape(2, 10, E)[0], dim=0).shape[0] == 1
