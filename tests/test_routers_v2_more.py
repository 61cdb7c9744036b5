"""Defining properties of the X-MoE, StableMoE and BASE routers on constructed cases."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.nn import functional as F

from hyperrouter import MoE
from hyperrouter.errors import HyperRouterError
from hyperrouter.routers import RoutingContext, build_router
from hyperrouter.routers.base_layers import (
    auction_assignment,
    balanced_capacities,
    exact_assignment,
)

D = 12


def ctx(k: int = 1, training: bool = False, step: int | None = None, ids=None) -> RoutingContext:
    return RoutingContext(top_k=k, training=training, step=step, token_ids=ids)


# ---------------------------------------------------------------- X-MoE
def test_xmoe_logits_are_cosine_over_temperature() -> None:
    torch.manual_seed(0)
    router = build_router("xmoe", D, 5, low_dim=4, temperature=0.5)
    x = torch.randn(7, D)
    logits = router.compute_logits(x)
    low = x @ router.reduction.weight.t()
    emb = router.expert_embeddings
    cos = (low @ emb.t()) / (low.norm(dim=1, keepdim=True) * emb.norm(dim=1)[None, :])
    torch.testing.assert_close(logits, cos / 0.5)
    assert router.reduction.weight.shape == (4, D) and router.reduction.bias is None
    routing = router(x, ctx(k=2))
    assert routing.expert_ids.shape == (7, 2)
    torch.testing.assert_close(routing.logits, logits)


def test_xmoe_temperature_is_learnable_and_stays_positive() -> None:
    torch.manual_seed(0)
    router = build_router("xmoe", D, 4)
    assert abs(router.temperature.item() - 0.07) < 1e-6
    assert "log_temperature" in dict(router.named_parameters())
    x = torch.randn(16, D)
    opt = torch.optim.SGD([router.log_temperature], lr=1e-3)
    for _ in range(5):  # sharpen the logits: the temperature learns to shrink
        opt.zero_grad()
        (-router.compute_logits(x).max(dim=1).values.sum()).backward()
        assert router.log_temperature.grad is not None
        opt.step()
    assert 0.01 < router.temperature.item() < 0.07
    with torch.no_grad():  # however far the optimizer pushes, tau stays >= 0.01
        router.log_temperature.fill_(-1000.0)
    assert router.temperature.item() == pytest.approx(0.01)
    assert torch.isfinite(router.compute_logits(x)).all()
    fixed = build_router("xmoe", D, 4, learn_temperature=False)
    assert "log_temperature" not in dict(fixed.named_parameters())
    assert "log_temperature" in fixed.state_dict()


# ---------------------------------------------------------------- StableMoE
def stable_router(switch_step: int = 5, vocab: int = 6, num_experts: int = 3):
    torch.manual_seed(0)
    router = build_router(
        "stablemoe", D, num_experts, switch_step=switch_step, vocab_size=vocab, distill_dim=4
    )
    with torch.no_grad():  # distilled router: token id v -> expert v % E; backbone disagrees
        emb = torch.zeros(vocab, 4)
        emb[torch.arange(vocab), torch.arange(vocab) % num_experts] = 5.0
        router.distill_embedding.weight.copy_(emb)
        router.distill_centroids.copy_(torch.eye(num_experts, 4))
    return router


def test_stablemoe_switches_exactly_at_switch_step() -> None:
    router = stable_router(switch_step=5).train()
    ids = torch.arange(6)
    x = torch.randn(6, D)
    backbone = (x @ router.centroids.t()).argmax(dim=1)
    distilled = ids % 3
    assert not torch.equal(backbone, distilled)
    before = router(x, ctx(training=True, step=4, ids=ids))
    after = router(x, ctx(training=True, step=5, ids=ids))
    assert torch.equal(before.expert_ids[:, 0], backbone)
    assert torch.equal(after.expert_ids[:, 0], distilled)
    assert set(before.aux_losses) == {"balance_loss", "distill_loss"}
    assert after.aux_losses == {}
    # both stages weight by the backbone's sigmoid score of the chosen expert
    scores = x @ router.centroids.t()
    torch.testing.assert_close(after.weights, torch.sigmoid(scores.gather(1, after.expert_ids)))

    # without a step (evaluation), the stage of the last optimizer step is used and saved
    router.eval()
    load = torch.zeros(3, dtype=torch.long)
    router.optimizer_step(load, 3)  # next step is 4: stage 1
    assert torch.equal(router(x, ctx(ids=ids)).expert_ids[:, 0], backbone)
    router.optimizer_step(load, 4)  # next step is 5: stage 2
    assert int(router.stage) == 2
    assert torch.equal(router(x, ctx(ids=ids)).expert_ids[:, 0], distilled)
    fresh = stable_router(switch_step=5).eval()
    fresh.load_state_dict(router.state_dict())
    assert torch.equal(fresh(x, ctx(ids=ids)).expert_ids[:, 0], distilled)


def test_stablemoe_stage2_router_is_frozen_through_the_layer() -> None:
    torch.manual_seed(0)
    layer = MoE(
        D,
        3,
        16,
        top_k=1,
        router="stablemoe",
        router_options={"switch_step": 3, "vocab_size": 10, "distill_dim": 4},
    ).train()
    router = layer.router
    distilled = [router.distill_embedding.weight, router.distill_centroids]
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    x = torch.randn(2, 8, D)
    ids = torch.randint(0, 10, (2, 8))
    snapshot = None
    for step in range(6):
        opt.zero_grad(set_to_none=True)
        layer.step = step
        out = layer(x, token_ids=ids, return_details=True)
        (out.output.square().mean() + sum(out.aux_losses.values(), torch.zeros(()))).backward()
        if step < 3:  # stage 1: distillation trains the distilled router
            assert "distill_loss" in out.aux_losses
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in distilled)
        else:  # stage 2: nothing reaches it, and Adam (with momentum from stage 1) leaves it
            assert "distill_loss" not in out.aux_losses
            assert all(p.grad is None for p in distilled)
            assert router.centroids.grad is not None  # the gate value still trains
        opt.step()
        layer.optimizer_step(step)
        if step == 2:
            snapshot = [p.detach().clone() for p in distilled]
    assert all(torch.equal(p, s) for p, s in zip(distilled, snapshot))
    assert int(router.stage) == 2


def test_stablemoe_distillation_learns_the_stage1_choice() -> None:
    torch.manual_seed(0)
    vocab, experts = 12, 4
    router = build_router("stablemoe", D, experts, vocab_size=vocab, switch_step=1000)
    table = torch.randn(vocab, D)  # the hidden state is a function of the token id
    ids = torch.arange(vocab).repeat(4)
    x = table[ids]
    target = (x @ router.centroids.t()).argmax(dim=1)
    params = [router.distill_embedding.weight, router.distill_centroids]
    opt = torch.optim.Adam(params, lr=5e-2)
    first = None
    for _ in range(200):
        opt.zero_grad()
        loss = router(x, ctx(training=True, step=0, ids=ids)).aux_losses["distill_loss"]
        first = loss.item() if first is None else first
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * first
    learned = router(x, ctx(training=True, step=1000, ids=ids)).expert_ids[:, 0]
    assert torch.equal(learned, target)


def test_stablemoe_hidden_state_fallback_does_not_train_the_backbone_input() -> None:
    torch.manual_seed(0)
    router = build_router("stablemoe", D, 4).train()
    assert router.distill_embedding is None
    x = torch.randn(9, D, requires_grad=True)
    routing = router(x, ctx(training=True, step=0))  # no token ids needed
    routing.aux_losses["distill_loss"].backward()
    assert x.grad is None or torch.count_nonzero(x.grad) == 0
    assert router.distill_projection.weight.grad is not None


def test_stablemoe_detach_input_keeps_the_balance_loss_out_of_the_backbone() -> None:
    """detach_input: same routing and centroid gradient of L_bal (and the z-loss), none into x;
    the combine weight sigmoid(x . c) still trains x and the centroids."""
    got = {}
    for detach in (False, True):
        torch.manual_seed(0)
        router = build_router("stablemoe", D, 4, z_loss_weight=0.1, detach_input=detach).train()
        x = torch.randn(16, D, requires_grad=True)
        routing = router(x, ctx(training=True, step=0))
        (routing.aux_losses["balance_loss"] + routing.aux_losses["z_loss"]).backward()
        got[detach] = (routing.expert_ids, x.grad, router.centroids.grad.clone())
        assert routing.weights.requires_grad
    (ids_a, xgrad_a, cgrad_a), (ids_b, xgrad_b, cgrad_b) = got[False], got[True]
    assert torch.equal(ids_a, ids_b)
    torch.testing.assert_close(cgrad_a, cgrad_b)
    assert xgrad_a is not None and float(xgrad_a.abs().sum()) > 0
    assert xgrad_b is None or float(xgrad_b.abs().sum()) == 0
    router = build_router("stablemoe", D, 4, detach_input=True).train()
    x = torch.randn(16, D, requires_grad=True)
    router(x, ctx(training=True, step=0)).weights.sum().backward()
    assert float(x.grad.abs().sum()) > 0
    with pytest.raises(HyperRouterError, match="detach_input"):
        build_router("stablemoe", D, 4, detach_input=1)


def test_stablemoe_token_id_errors_are_one_line() -> None:
    router = stable_router(vocab=6)
    x = torch.randn(3, D)
    with pytest.raises(HyperRouterError, match=r"vocab_size=6") as err:
        router(x, ctx(ids=torch.tensor([0, 6, 1])))
    assert "\n" not in str(err.value)
    with pytest.raises(HyperRouterError, match="no token ids"):
        router(x, ctx(training=True, step=0))  # stage 1 training distils on token ids
    with pytest.raises(HyperRouterError, match="no token ids"):
        router(x, ctx(step=5))  # stage 2 routes by them
    assert router(x, ctx(step=0)).expert_ids.shape == (3, 1)  # stage 1 eval: the backbone


# ---------------------------------------------------------------- BASE
def brute_force_best(scores: torch.Tensor) -> float:
    num_tokens, num_experts = scores.shape
    caps = balanced_capacities(num_tokens, num_experts).tolist()
    best = float("-inf")
    for assign in itertools.product(range(num_experts), repeat=num_tokens):
        if [assign.count(e) for e in range(num_experts)] == caps:
            total = sum(float(scores[t, e]) for t, e in enumerate(assign))
            best = max(best, total)
    return best


@pytest.mark.parametrize("num_tokens,num_experts", [(6, 2), (6, 3), (7, 3)])
@pytest.mark.parametrize("solver", ["exact", "auction"])
def test_base_training_is_balanced_and_optimal(num_tokens, num_experts, solver) -> None:
    torch.manual_seed(num_tokens * 10 + num_experts)
    router = build_router("base", D, num_experts, solver=solver).train()
    x = torch.randn(num_tokens, D) * 10
    routing = router(x, ctx(training=True))
    ids = routing.expert_ids[:, 0]
    counts = torch.bincount(ids, minlength=num_experts).tolist()
    assert counts == balanced_capacities(num_tokens, num_experts).tolist()
    if num_tokens % num_experts == 0:
        assert len(set(counts)) == 1
    else:  # the first T mod E experts take one more
        extra = num_tokens % num_experts
        assert counts[:extra] == [counts[-1] + 1] * extra
    scores = (x @ router.centroids.t()).detach()
    got = float(scores.gather(1, ids[:, None]).sum())
    assert got == pytest.approx(brute_force_best(scores), rel=1e-6, abs=1e-6)
    torch.testing.assert_close(routing.weights, torch.sigmoid(scores.gather(1, routing.expert_ids)))


def test_base_auction_is_balanced_and_close_to_optimal_on_a_larger_case() -> None:
    torch.manual_seed(0)
    num_tokens, num_experts = 600, 8
    scores = torch.randn(num_tokens, 32) @ torch.randn(32, num_experts)
    caps = balanced_capacities(num_tokens, num_experts)
    exact = exact_assignment(scores, caps)
    approx = auction_assignment(scores, caps)
    assert torch.equal(torch.bincount(approx, minlength=num_experts), caps)
    best = float(scores.gather(1, exact[:, None]).sum())
    got = float(scores.gather(1, approx[:, None]).sum())
    assert got <= best + 1e-6
    assert (best - got) <= 1e-3 * abs(best)
    greedy = float(scores.max(dim=1).values.sum())  # unbalanced upper bound
    assert got < greedy


def test_base_auto_solver_threshold_and_topk_rounds() -> None:
    router = build_router("base", D, 4, exact_max_tokens=10)
    assert router.solver_for(10) == "exact" and router.solver_for(11) == "auction"
    torch.manual_seed(0)
    x = torch.randn(40, D)
    for k in (2, 3):
        routing = router.train()(x, ctx(k=k, training=True))
        ids = routing.expert_ids
        assert routing.keep is None
        assert all(len(set(row)) == k for row in ids.tolist())  # k distinct experts
        assert torch.bincount(ids.reshape(-1), minlength=4).tolist() == [40 * k // 4] * 4


def test_base_eval_is_top1_by_score() -> None:
    torch.manual_seed(0)
    router = build_router("base", D, 4).eval()
    x = torch.randn(30, D)
    routing = router(x, ctx(k=1))
    scores = x @ router.centroids.t()
    assert torch.equal(routing.expert_ids[:, 0], scores.argmax(dim=1))
    torch.testing.assert_close(routing.weights[:, 0], torch.sigmoid(scores.max(dim=1).values))
    assert routing.keep is None and routing.aux_losses == {}


def test_base_layer_end_to_end_balances_training_load() -> None:
    torch.manual_seed(0)
    layer = MoE(D, 4, 16, top_k=1, router="base").train()
    out = layer(torch.randn(3, 8, D), return_details=True)
    assert out.stats.tokens_per_expert.tolist() == [6, 6, 6, 6]
    F.mse_loss(out.output, torch.zeros_like(out.output)).backward()
    assert layer.router.centroids.grad is not None


# ---------------------------------------------------------------- options
@pytest.mark.parametrize(
    "name,options,option",
    [
        ("xmoe", {"low_dim": 0}, "low_dim"),
        ("xmoe", {"temperature": 0.0}, "temperature"),
        ("xmoe", {"temperature": 0.001}, "temperature"),
        ("stablemoe", {"switch_step": -1}, "switch_step"),
        ("stablemoe", {"vocab_size": 0}, "vocab_size"),
        ("stablemoe", {"distill_dim": 0}, "distill_dim"),
        ("stablemoe", {"balance_loss_weight": -0.1}, "balance_loss_weight"),
        ("stablemoe", {"distill_loss_weight": -1}, "distill_loss_weight"),
        ("base", {"solver": "hungarian"}, "solver"),
        ("base", {"exact_max_tokens": -1}, "exact_max_tokens"),
        ("base", {"init_gain": 0}, "init_gain"),
    ],
)
def test_bad_options_raise_one_line_errors(name, options, option) -> None:
    with pytest.raises(HyperRouterError, match=option) as err:
        build_router(name, D, 4, **options)
    message = str(err.value)
    assert "\n" not in message and "must be" in message


@pytest.mark.parametrize("solver", ["exact", "auction"])
def test_base_uneven_topk_rounds_keep_the_first_experts_one_pair_ahead(solver) -> None:
    torch.manual_seed(0)
    router = build_router("base", D, 4, solver=solver).train()
    routing = router(torch.randn(7, D), ctx(k=3, training=True))
    counts = torch.bincount(routing.expert_ids.reshape(-1), minlength=4).tolist()
    assert counts == [6, 5, 5, 5]  # 21 pairs: the first 21 mod 4 = 1 expert takes one more
    assert all(len(set(row)) == 3 for row in routing.expert_ids.tolist())


@pytest.mark.parametrize(
    "name,options",
    [("xmoe", {}), ("stablemoe", {"vocab_size": 10}), ("base", {})],
)
def test_router_math_is_fp32_under_autocast(name, options) -> None:
    torch.manual_seed(0)
    router = build_router(name, D, 4, **options).train()
    ids = torch.randint(0, 10, (9,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routing = router(torch.randn(9, D), ctx(k=2, training=True, step=0, ids=ids))
    assert routing.logits.dtype == routing.weights.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in routing.aux_losses.values())
