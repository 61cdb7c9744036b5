"""LibMoE's routers: `cosine`, `perturbed_cosine`, `sigmoid`, and the `hypernetwork` option of
`hyperrouter`, each against a hand computation of its formula and on its defining property."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from hyperrouter import MoE
from hyperrouter.errors import HyperRouterError
from hyperrouter.routers import RoutingContext, build_router
from hyperrouter.routers.losses import switch_balance_loss
from hyperrouter.routers.sigmoid import libmoe_balance_loss

D, E, T = 16, 8, 40
# fp32 throughout; the hand computations take other (equally exact) paths through the same
# products, so they agree up to a few float32 roundings of O(1) logits
TOL = {"rtol": 1e-5, "atol": 1e-6}


def ctx(k: int, **kw) -> RoutingContext:
    return RoutingContext(top_k=k, training=True, **kw)


def tokens(seed: int = 1, n: int = T) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(n, D)


def sorted_top_k(scores_TE: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    values, ids = torch.topk(scores_TE, k, dim=-1, sorted=True)
    return ids, values


def balance_by_hand(logits_TE: torch.Tensor, seq_T: torch.Tensor | None) -> torch.Tensor:
    """LibMoE's `balanceloss` with a loop over sequences: E * mean_s sum_i f_si P_si."""
    seq_T = torch.zeros(len(logits_TE), dtype=torch.long) if seq_T is None else seq_T
    terms = []
    for s in seq_T.unique():
        rows = logits_TE[seq_T == s]
        p = torch.softmax(rows, -1).mean(0)
        f = torch.bincount(rows.argmax(-1), minlength=E).float() / len(rows)
        terms.append((f * p).sum())
    return E * torch.stack(terms).mean()


# ------------------------------------------------------------------------------------- cosine
def cosine_logits_by_hand(router, x: torch.Tensor, noise: float | None = None) -> torch.Tensor:
    h = x @ router.reduction.weight.t()
    e = router.expert_embeddings
    if noise is None:
        return (
            1.5 * (h / h.norm(dim=-1, keepdim=True)) @ (e / e.norm(dim=-1, keepdim=True)).t() / 0.3
        )
    den = (h.norm(dim=-1, keepdim=True) + noise) * (e.norm(dim=-1) + noise)
    return 1.5 * (h @ e.t()) / den / 0.3


@pytest.mark.parametrize("k", [1, 2, 3])
def test_cosine_logits_and_weights_equal_libmoes_formula(k: int) -> None:
    torch.manual_seed(0)
    router = build_router("cosine", D, E)
    assert router.low_dim == E // 2 and router.expert_embeddings.shape == (E, E // 2)
    x = tokens()
    routing = router(x, ctx(k))
    logits = cosine_logits_by_hand(router, x)
    torch.testing.assert_close(routing.logits, logits, **TOL)
    ids, probs = sorted_top_k(torch.softmax(logits, -1), k)
    assert torch.equal(routing.expert_ids, ids)  # slot 0 = the best expert, as LibMoE's topk
    # LibMoE's _keepTopk: a softmax over the k chosen *probabilities*
    torch.testing.assert_close(routing.weights, torch.softmax(probs, -1), **TOL)


def test_cosine_other_combine_weights() -> None:
    x = tokens()
    for combine, expected in (
        ("probs", lambda p: p),
        ("renormalized", lambda p: p / p.sum(-1, keepdim=True)),
    ):
        torch.manual_seed(0)
        router = build_router("cosine", D, E, combine_weights=combine)
        routing = router(x, ctx(2))
        _, probs = sorted_top_k(torch.softmax(routing.logits, -1), 2)
        torch.testing.assert_close(routing.weights, expected(probs), **TOL)


def test_cosine_is_invariant_to_the_scale_of_x() -> None:
    torch.manual_seed(0)
    router = build_router("cosine", D, E)
    x = tokens()
    base = router(x, ctx(2))
    for c in (0.05, 3.0, 200.0):
        scaled = router(c * x, ctx(2))
        torch.testing.assert_close(scaled.logits, base.logits, **TOL)
        assert torch.equal(scaled.expert_ids, base.expert_ids)


def test_cosine_temperature_is_fixed_and_learnable_on_request() -> None:
    fixed = build_router("cosine", D, E)
    assert "log_temperature" not in dict(fixed.named_parameters())
    learned = build_router("cosine", D, E, learn_temperature=True)
    assert learned.log_temperature.requires_grad
    torch.testing.assert_close(learned.temperature, torch.tensor(0.3))
    assert build_router("cosine", D, 1).low_dim == 1  # E // 2 = 0 would leave nothing to route by


@pytest.mark.parametrize("k", [1, 2])
def test_perturbed_cosine_logits_equal_the_papers_formula(k: int) -> None:
    torch.manual_seed(0)
    router = build_router("perturbed_cosine", D, E)
    x = tokens()
    routing = router(x, ctx(k))
    torch.testing.assert_close(routing.logits, cosine_logits_by_hand(router, x, noise=0.1), **TOL)
    ids, probs = sorted_top_k(torch.softmax(routing.logits, -1), k)
    assert torch.equal(routing.expert_ids, ids)
    torch.testing.assert_close(routing.weights, torch.softmax(probs, -1), **TOL)


def test_the_perturbation_is_noise_on_both_norms() -> None:
    """perturbed = cosine * |h| / (|h| + noise) * |e_i| / (|e_i| + noise), for the same
    parameters; so it depends on the scale of x and tends to the cosine as |h| grows."""
    torch.manual_seed(0)
    perturbed = build_router("perturbed_cosine", D, E, noise=0.3)
    torch.manual_seed(0)
    plain = build_router("cosine", D, E)
    plain.load_state_dict(perturbed.state_dict())
    # LibMoE's in-place rescale 1.5 e / (|e| + noise) converges to norm 1.5 - noise: our start
    torch.testing.assert_close(
        perturbed.expert_embeddings.norm(dim=-1), torch.full((E,), 1.2), **TOL
    )
    x = tokens()
    h_norm = (x @ perturbed.reduction.weight.t()).norm(dim=-1, keepdim=True)
    e_norm = perturbed.expert_embeddings.norm(dim=-1)
    factor = h_norm / (h_norm + 0.3) * e_norm / (e_norm + 0.3)
    torch.testing.assert_close(perturbed(x, ctx(2)).logits, plain(x, ctx(2)).logits * factor, **TOL)
    small, large = perturbed(0.1 * x, ctx(2)).logits, perturbed(1e4 * x, ctx(2)).logits
    assert small.abs().max() < 0.5 * perturbed(x, ctx(2)).logits.abs().max()
    e_factor = e_norm / (e_norm + 0.3)
    # |h| ~ 1e4 |W x|: the token-side perturbation is below 1e-3 relative there
    torch.testing.assert_close(large, plain(x, ctx(2)).logits * e_factor, rtol=1e-3, atol=1e-3)


def test_cosine_routers_train_their_parameters() -> None:
    for name in ("cosine", "perturbed_cosine"):
        torch.manual_seed(0)
        router = build_router(name, D, E)
        routing = router(tokens(), ctx(2))
        (routing.weights.square().sum() + sum(routing.aux_losses.values())).backward()
        assert router.reduction.weight.grad.abs().sum() > 0, name
        assert router.expert_embeddings.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    ("name", "options", "option"),
    [
        ("cosine", {"expert_norm": 0.0}, "expert_norm"),
        ("cosine", {"expert_norm": float("inf")}, "expert_norm"),
        ("cosine", {"combine_weights": "softmax"}, "combine_weights"),
        ("cosine", {"low_dim": 0}, "low_dim"),
        ("cosine", {"temperature": 0.001}, "temperature"),
        ("cosine", {"learn_temperature": "yes"}, "learn_temperature"),
        ("cosine", {"balance_loss_weight": -1.0}, "balance_loss_weight"),
        ("cosine", {"score": "sigmoid"}, "score"),
        ("perturbed_cosine", {"noise": 0.0}, "noise"),
        ("perturbed_cosine", {"noise": 1.5}, "noise"),
        ("perturbed_cosine", {"noise": "0.1"}, "noise"),
        ("sigmoid", {"renormalize": "yes"}, "renormalize"),
        ("sigmoid", {"init_std": 0.0}, "init_std"),
        ("sigmoid", {"z_loss_weight": -0.1}, "z_loss_weight"),
        ("sigmoid", {"score": "softmax_topk"}, "score"),
        ("hyperrouter", {"hypernetwork": "learned"}, "hypernetwork"),
        ("hyperrouter", {"hypernetwork": True}, "hypernetwork"),
    ],
)
def test_bad_options_are_one_line_errors_naming_the_option(name, options, option) -> None:
    with pytest.raises(HyperRouterError, match=option) as err:
        build_router(name, D, E, **options)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------ sigmoid
@pytest.mark.parametrize("k", [1, 2, 3])
def test_sigmoid_weights_are_the_chosen_sigmoids_renormalised(k: int) -> None:
    torch.manual_seed(0)
    router = build_router("sigmoid", D, E)
    assert router.gate.bias is None and router.score == "sigmoid"
    x = tokens()
    routing = router(x, ctx(k))
    logits = x @ router.gate.weight.t()
    torch.testing.assert_close(routing.logits, logits, **TOL)
    ids, s = sorted_top_k(torch.sigmoid(logits), k)
    assert torch.equal(routing.expert_ids, ids)
    torch.testing.assert_close(routing.weights, s / s.sum(-1, keepdim=True), **TOL)
    torch.manual_seed(0)
    raw = build_router("sigmoid", D, E, renormalize=False)(x, ctx(k))
    torch.testing.assert_close(raw.weights, s, **TOL)  # the paper's unnormalised gates


def test_libmoe_balance_loss_by_hand_per_sequence_and_per_call() -> None:
    torch.manual_seed(0)
    logits = 2.0 * torch.randn(T, E)
    first = logits.argmax(-1)
    seq = torch.arange(T) // 7 + 3  # ids need not start at 0; the last sequence is shorter
    torch.testing.assert_close(
        libmoe_balance_loss(logits, first, seq), balance_by_hand(logits, seq), **TOL
    )
    # one sequence: the Switch loss with f over first choices (GShard's f_i)
    one = libmoe_balance_loss(logits, first)
    torch.testing.assert_close(one, balance_by_hand(logits, None), **TOL)
    torch.testing.assert_close(one, switch_balance_loss(logits, first[:, None]), **TOL)


@pytest.mark.parametrize("name", ["sigmoid", "cosine", "perturbed_cosine"])
def test_the_routers_balance_loss_is_libmoes_on_the_softmax_of_the_logits(name: str) -> None:
    torch.manual_seed(0)
    router = build_router(name, D, E)
    x, seq = tokens(), torch.arange(T) // 10
    routing = router(x, ctx(2, sequence_ids=seq))
    assert set(routing.aux_losses) == {"balance_loss"}  # z-loss off by default
    expected = 0.01 * balance_by_hand(routing.logits, seq)  # softmax, even for sigmoid scores
    torch.testing.assert_close(routing.aux_losses["balance_loss"], expected, **TOL)
    whole = router(x, ctx(2)).aux_losses["balance_loss"]  # no sequence ids: one sequence
    torch.testing.assert_close(whole, 0.01 * balance_by_hand(routing.logits, None), **TOL)
    z = build_router(name, D, E, z_loss_weight=0.001)(x, ctx(2)).aux_losses
    assert set(z) == {"balance_loss", "z_loss"}


def test_sigmoid_balance_loss_trains_the_gate_at_k1() -> None:
    """At k = 1 the renormalised weight is exactly 1: the gate learns from the balance loss."""
    torch.manual_seed(0)
    router = build_router("sigmoid", D, E)
    routing = router(tokens(), ctx(1))
    assert torch.equal(routing.weights, torch.ones(T, 1))
    routing.aux_losses["balance_loss"].backward()
    assert router.gate.weight.grad.abs().sum() > 0


# -------------------------------------------------------------------------------- hyperrouter
def hyper_step(mode: str | None) -> tuple[MoE, dict, dict]:
    """One Adam step of a hyperrouter layer; its router's parameters before and after."""
    torch.manual_seed(0)
    options = {"hyper_hidden": 32} | ({} if mode is None else {"hypernetwork": mode})
    layer = MoE(D, E, 24, 2, router="hyperrouter", router_options=options).train()
    before = {n: p.detach().clone() for n, p in layer.router.named_parameters()}
    trainable = [p for p in layer.parameters() if p.requires_grad]
    opt = torch.optim.Adam(trainable, lr=1e-2)  # moves every parameter with a gradient
    out = layer(tokens(), return_details=True)
    (out.output.square().mean() + sum(out.aux_losses.values(), torch.zeros(()))).backward()
    opt.step()
    after = {n: p.detach().clone() for n, p in layer.router.named_parameters()}
    return layer, before, after


def test_trainable_hypernetwork_gets_gradients_and_moves() -> None:
    layer, before, after = hyper_step("trainable")
    hypernet = [n for n in before if n.startswith("hypernet.")]
    assert len(hypernet) == 4
    for name, p in layer.router.named_parameters():
        assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        assert not torch.equal(before[name], after[name]), name


@pytest.mark.parametrize("mode", [None, "frozen"])
def test_frozen_hypernetwork_gets_no_gradient_and_stays(mode: str | None) -> None:
    layer, before, after = hyper_step(mode)
    assert layer.router.hypernetwork == "frozen"
    for name, p in layer.router.named_parameters():
        if name.startswith("hypernet."):
            assert not p.requires_grad and p.grad is None, name
            assert torch.equal(before[name], after[name]), name
    assert not torch.equal(before["embedding"], after["embedding"])  # the embedding still trains


def test_the_hypernetwork_option_changes_only_what_trains() -> None:
    """Same draws, same generated router: 'trainable' differs from the paper only in training."""
    x = tokens()
    routings = []
    for mode in ("frozen", "trainable"):
        torch.manual_seed(0)
        router = build_router("hyperrouter", D, E, hyper_hidden=32, hypernetwork=mode)
        routings.append(router(x, ctx(2)))
    assert torch.equal(routings[0].logits, routings[1].logits)
    assert torch.equal(routings[0].expert_ids, routings[1].expert_ids)


def test_unit_helpers_agree_with_torch() -> None:
    """The hand formulas above use h / |h|; F.normalize's eps (1e-4 in LibMoE) is inactive for
    these tokens, so the comparison is exact up to rounding."""
    torch.manual_seed(0)
    router = build_router("cosine", D, E)
    h = tokens() @ router.reduction.weight.t()
    assert h.norm(dim=-1).min() > 1e-3
    torch.testing.assert_close(router.unit_tokens(h), F.normalize(h, dim=-1), **TOL)
