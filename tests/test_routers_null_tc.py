"""AdaMoE (`adamoe`: null experts) and TC-MoE (`tc_moe`: ternary expert choice), each on a
constructed case of its defining property, its losses against hand computations, and bad options.

The constructed gates feed one-hot tokens (x_t = e_t), so a token's logits are one column of the
gate's weight, set to logs of chosen numbers: softmax then gives probabilities known by hand up
to fp32 rounding of log and exp (a few ulps, hence rtol 1e-6 where they enter)."""

from __future__ import annotations

import math

import pytest
import torch

from hyperrouter import MoE
from hyperrouter.errors import HyperRouterError
from hyperrouter.routers import RoutingContext, build_router
from hyperrouter.routers.null_experts import null_expert_balance_loss
from hyperrouter.routers.tc_moe import ternary_balance_loss

H = 12
BACKENDS = ("reference", "grouped", "dense")
RTOL = 1e-6  # fp32 log/exp/softmax round trips and a different summation order: a few ulps


def layer_with_gate(name: str, d: int, e: int, k: int, gate_DC: torch.Tensor, **options) -> MoE:
    """A layer whose router gate has weight gate_DC.T (no bias) and random expert parameters."""
    torch.manual_seed(0)
    layer = MoE(d, e, H, k, router=name, router_options=options)
    with torch.no_grad():
        layer.router.gate.weight.copy_(gate_DC.t())
        for pname, p in layer.experts.named_parameters():
            p.normal_(0.0, 0.3 if pname.startswith("w_") else 0.1)  # nonzero biases
    return layer.eval()


def expert_out(layer: MoE, e: int, x_D: torch.Tensor) -> torch.Tensor:
    ex = layer.experts
    return torch.relu(x_D @ ex.w_in[e] + ex.b_in[e]) @ ex.w_out[e] + ex.b_out[e]


# ---------------------------------------------------------------------------------------- adamoe
def test_adamoe_null_experts_take_slots_but_no_compute() -> None:
    """E = 4 real, N = 4 null, k = 2. Token 0 picks two null experts: output exactly 0 in every
    backend (the experts have biases, so any computed expert would show). Token 1 picks real 0
    and 1, weighted by p renormalised over the two. Token 2 picks real 0 and a null: weight 1."""
    e, n, d = 4, 4, 3
    gate = torch.zeros(d, e + n)
    gate[0, e:] = 5.0  # feature 0 -> the null experts
    gate[1, :e] = torch.tensor([4.0, 1.0, 0.5, 0.2])  # feature 1 -> real 0, then real 1
    x = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0.5, 1.0, 0]])
    # token 2: real 0 at 4, nulls at 2.5, real 1 at 1 -> real 0 and one null
    layer = layer_with_gate("adamoe", d, e, 2, gate, null_experts=n)
    for backend in BACKENDS:
        out = layer(x, backend=backend, return_details=True)
        assert torch.equal(out.output[0], torch.zeros(d)), backend
        w = torch.softmax(torch.tensor([4.0, 1.0]), 0)
        want1 = w[0] * expert_out(layer, 0, x[1]) + w[1] * expert_out(layer, 1, x[1])
        torch.testing.assert_close(out.output[1], want1, rtol=RTOL, atol=1e-7)
        torch.testing.assert_close(out.output[2], expert_out(layer, 0, x[2]), rtol=RTOL, atol=1e-7)
        assert out.stats.tokens_per_expert.tolist() == [2, 1, 0, 0]  # real pairs only
        assert out.stats.mean_k.item() == 1.0
        assert out.stats.extra["null_share"].item() == 0.5  # 3 of the 6 slots
        assert out.stats.extra["real_experts_per_token"].item() == 1.0
    routing = out.routing
    assert routing.keep.tolist() == [[False, False], [True, True], [True, False]]
    assert routing.logits.shape == (3, e)  # the real experts' logits only
    assert int(routing.expert_ids.min()) >= 0 and int(routing.expert_ids.max()) < e
    assert routing.weights[0].tolist() == [0.0, 0.0]


def test_adamoe_without_null_experts_is_top_k_with_renormalised_softmax() -> None:
    torch.manual_seed(0)
    router = build_router("adamoe", 16, 8, null_experts=0)
    x = torch.randn(20, 16)
    routing = router(x, RoutingContext(top_k=3))
    assert routing.keep.all()
    values, ids = torch.topk(routing.logits, 3, dim=-1)
    assert torch.equal(routing.expert_ids, ids)
    torch.testing.assert_close(routing.weights, torch.softmax(values, -1), rtol=RTOL, atol=1e-7)


def adamoe_case() -> tuple[torch.Tensor, torch.Tensor]:
    """E = 2 real (0, 1) and N = 2 null (2, 3) choices; three tokens' probabilities, whose top 2
    are {0, 2}, {2, 0}, {3, 1}."""
    probs = torch.tensor(
        [[0.40, 0.10, 0.30, 0.20], [0.35, 0.05, 0.45, 0.15], [0.10, 0.30, 0.25, 0.35]]
    )
    choices = torch.tensor([[0, 2], [2, 0], [3, 1]])
    return probs, choices


def test_adamoe_balance_loss_averages_the_null_loads_by_hand() -> None:
    probs, choices = adamoe_case()
    # loads over the 6 slots: real 2/6, 1/6; null 2/6, 1/6 -> both nulls get their mean 1/4
    f = [1 / 3, 1 / 6, 1 / 4, 1 / 4]
    p_mean = [0.85 / 3, 0.45 / 3, 1.00 / 3, 0.70 / 3]
    want = 4 * sum(a * b for a, b in zip(f, p_mean))  # (E + N) sum f~ P = 1.04444...
    assert math.isclose(want, 4 / 3 * (0.85 / 3 + 0.45 / 6 + 1.0 / 4 + 0.7 / 4))
    got = null_expert_balance_loss(probs, choices, num_experts=2)
    assert got.item() == pytest.approx(want, rel=RTOL)
    switch = 4 / 3 * (0.85 / 3 + 0.45 / 6 + 1.0 / 3 + 0.7 / 6)  # nulls balanced one by one
    assert abs(got.item() - switch) > 0.03
    # the same numbers through the router: logits log p on one-hot tokens, weight 1
    router = build_router("adamoe", 3, 2, null_experts=2, balance_loss_weight=1.0)
    with torch.no_grad():
        router.gate.weight.copy_(probs.log().t())
    routing = router(torch.eye(3), RoutingContext(top_k=2, training=True))
    assert routing.aux_losses["balance_loss"].item() == pytest.approx(want, rel=RTOL)
    assert routing.keep.tolist() == [[True, False], [False, True], [False, True]]
    assert routing.weights[routing.keep].tolist() == [1.0, 1.0, 1.0]  # one real expert each
    assert routing.stats["null_share"].item() == 0.5
    default = build_router("adamoe", 3, 2, null_experts=2)
    with torch.no_grad():
        default.gate.weight.copy_(probs.log().t())
    loss = default(torch.eye(3), RoutingContext(top_k=2)).aux_losses["balance_loss"]
    assert loss.item() == pytest.approx(1e-3 * want, rel=RTOL)  # exp_1's weight


def test_adamoe_balance_loss_is_off_at_weight_zero_and_empty_batches_are_fine() -> None:
    router = build_router("adamoe", 4, 2, null_experts=2, balance_loss_weight=0.0)
    assert router(torch.randn(5, 4), RoutingContext(top_k=2)).aux_losses == {}
    empty = build_router("adamoe", 4, 2)(torch.zeros(0, 4), RoutingContext(top_k=2))
    assert empty.aux_losses == {} and empty.stats["null_share"].item() == 0.0


@pytest.mark.parametrize(
    "options, option, valid",
    [
        ({"null_experts": -1}, "null_experts", "an integer >= 0"),
        ({"null_experts": 1.5}, "null_experts", "an integer >= 0"),
        ({"null_experts": True}, "null_experts", "an integer >= 0"),
        ({"balance_loss_weight": -0.1}, "balance_loss_weight", "a number >= 0"),
        ({"balance_loss_weight": float("nan")}, "balance_loss_weight", "a number >= 0"),
        ({"init_std": 0.0}, "init_std", "a number > 0"),
        ({"bias": "yes"}, "bias", "True or False"),
    ],
)
def test_adamoe_bad_options_give_a_one_line_error(options: dict, option: str, valid: str) -> None:
    with pytest.raises(HyperRouterError) as info:
        build_router("adamoe", 8, 4, **options)
    message = str(info.value)
    assert option in message and valid in message and "\n" not in message


# ---------------------------------------------------------------------------------------- tc_moe
def tc_layer(token_exps: list[list[float]], k: int, **options) -> MoE:
    """E = 2, one-hot tokens; token t's choice logits (+0, +1, -0, -1, 0_0, 0_1) are the logs of
    token_exps[t], with both offsets 0 unless given."""
    options = {"minus_logit_offset": 0.0, "zero_logit_offset": 0.0, **options}
    gate = torch.tensor(token_exps).log()  # [D = T, 3E]
    return layer_with_gate("tc_moe", len(token_exps), 2, k, gate, **options)


def test_tc_moe_each_choice_on_a_constructed_case() -> None:
    """k = 1. Token 0 picks +E_0, token 1 -E_1, token 2 the 0 choice of E_0. Each has exp-logits
    4 on its choice and 1 on the other five: p = 4/9, the zero mass 2/9 (1/9 + 1/9 for token 0
    and 1; 4/9 + 1/9 for token 2), so w = (4/9) / (4/9 + 2/9) = 2/3."""
    exps = [[4, 1, 1, 1, 1, 1], [1, 1, 1, 4, 1, 1], [1, 1, 1, 1, 4, 1]]
    layer = tc_layer(exps, 1)
    x = torch.eye(3)
    for backend in BACKENDS:
        out = layer(x, backend=backend, return_details=True)
        torch.testing.assert_close(
            out.output[0], 2 / 3 * expert_out(layer, 0, x[0]), rtol=RTOL, atol=1e-7
        )
        torch.testing.assert_close(
            out.output[1], -2 / 3 * expert_out(layer, 1, x[1]), rtol=RTOL, atol=1e-7
        )
        assert torch.equal(out.output[2], torch.zeros(3)), backend  # no compute at all
        assert out.stats.tokens_per_expert.tolist() == [1, 1]
        extra = out.stats.extra
        assert extra["computed_experts_per_token"].item() == pytest.approx(2 / 3)
        for kind in ("plus", "minus", "zero"):
            assert extra[f"{kind}_share"].item() == pytest.approx(1 / 3)
    routing = out.routing
    assert routing.expert_ids[:, 0].tolist() == [0, 1, 0]  # the 0 choice keeps its expert id
    assert routing.keep[:, 0].tolist() == [True, True, False]
    torch.testing.assert_close(
        routing.weights[:, 0], torch.tensor([2 / 3, -2 / 3, 0.0]), rtol=RTOL, atol=1e-7
    )


def test_tc_moe_same_expert_with_both_signs_is_computed_once() -> None:
    """k = 2, exp-logits +E_0: 4, -E_0: 2, the rest 1 (sum 10): w+ = .4 / (.6 + .2) = 1/2,
    w- = .2 / .8 = 1/4, so y = (1/2 - 1/4) E_0(x) from one computation of E_0."""
    layer = tc_layer([[4, 1, 2, 1, 1, 1]], 2)
    x = torch.eye(1)
    for backend in BACKENDS:
        out = layer(x, backend=backend, return_details=True)
        torch.testing.assert_close(
            out.output[0], 0.25 * expert_out(layer, 0, x[0]), rtol=RTOL, atol=1e-7
        )
        assert out.stats.tokens_per_expert.tolist() == [1, 0]
        assert out.stats.extra["computed_experts_per_token"].item() == 1.0
    assert out.routing.keep.tolist() == [[True, False]]
    torch.testing.assert_close(out.routing.weights, torch.tensor([[0.25, 0.0]]), rtol=RTOL, atol=0)


def test_tc_moe_losses_weights_and_logits_by_hand() -> None:
    """E = 2, k = 2. Token 0: p = (+0 .4, +1 .1, -0 .1, -1 .2, 0_0 .1, 0_1 .1) picks +E_0, -E_1;
    token 1: p = (.1, .3, .05, .05, .4, .1) picks 0_0, +E_1."""
    exps = [[4, 1, 1, 2, 1, 1], [1, 3, 0.5, 0.5, 4, 1]]  # each sums to 10
    router = build_router(
        "tc_moe",
        2,
        2,
        balance_loss_weight=1.0,
        reward_loss_weight=1.0,
        minus_logit_offset=0.0,
        zero_logit_offset=0.0,
    )
    with torch.no_grad():
        router.gate.weight.copy_(torch.tensor(exps).log().t())
    routing = router(torch.eye(2), RoutingContext(top_k=2, training=True))
    # normaliser: chosen computed mass + all zero mass; token 0: (.4 + .2) + .2, token 1: .3 + .5
    torch.testing.assert_close(
        routing.weights, torch.tensor([[0.5, -0.25], [0.0, 0.375]]), rtol=RTOL, atol=1e-7
    )
    assert routing.expert_ids.tolist() == [[0, 1], [0, 1]]
    assert routing.keep.tolist() == [[True, True], [False, True]]
    # balance: computed slots on experts (0, 1, 1) -> f = (1/3, 2/3); q_t = (p+ + p-) renormalised:
    # token 0 (.5, .3) / .8, token 1 (.15, .35) / .5 -> P = ((.625 + .3) / 2, (.375 + .7) / 2)
    want_balance = 2 * (1 / 3 * 0.4625 + 2 / 3 * 0.5375)  # E sum f P = 1.025
    assert routing.aux_losses["balance_loss"].item() == pytest.approx(want_balance, rel=RTOL)
    # reward: minus the mean zero mass, (.2 + .5) / 2
    assert routing.aux_losses["reward_loss"].item() == pytest.approx(-0.35, rel=RTOL)
    # logits [T, E]: logsumexp of the +1 and -1 logits, so their softmax is q
    torch.testing.assert_close(
        torch.softmax(routing.logits, -1),
        torch.tensor([[0.625, 0.375], [0.3, 0.7]]),
        rtol=RTOL,
        atol=1e-7,
    )
    stats = routing.stats
    assert stats["plus_share"].item() == 0.5 and stats["zero_share"].item() == 0.25
    assert stats["minus_share"].item() == 0.25
    assert stats["computed_experts_per_token"].item() == 1.5


def test_tc_moe_defaults_offsets_and_loss_weights() -> None:
    torch.manual_seed(0)
    router = build_router("tc_moe", 8, 4)
    x = torch.randn(6, 8)
    raw = x @ router.gate.weight.t()
    offsets = torch.tensor([0.0] * 4 + [-1.0] * 4 + [-10.0] * 4)
    torch.testing.assert_close(router.choice_logits(x), raw + offsets, rtol=RTOL, atol=1e-6)
    routing = router(x, RoutingContext(top_k=2, training=True))
    assert set(routing.aux_losses) == {"balance_loss"}  # reward weight 0 (model card)
    probs = torch.softmax(router.choice_logits(x), -1)
    choices = torch.topk(router.choice_logits(x), 2, -1).indices
    want = 0.01 * ternary_balance_loss(probs, choices, 4)
    torch.testing.assert_close(routing.aux_losses["balance_loss"], want)


def test_tc_moe_reward_loss_pushes_toward_the_zero_choices() -> None:
    torch.manual_seed(0)
    router = build_router("tc_moe", 8, 4, balance_loss_weight=0.0, reward_loss_weight=1.0)
    x = torch.randn(16, 8)
    routing = router(x, RoutingContext(top_k=2, training=True))
    routing.aux_losses["reward_loss"].backward()
    zero_rows = router.gate.weight.grad[8:]  # rows of the 0 choices
    before = torch.softmax(router.choice_logits(x), -1)[:, 8:].sum()
    with torch.no_grad():
        router.gate.weight -= 10.0 * router.gate.weight.grad
    after = torch.softmax(router.choice_logits(x), -1)[:, 8:].sum()
    assert zero_rows.abs().sum() > 0 and after > before


@pytest.mark.parametrize(
    "options, option, valid",
    [
        ({"balance_loss_weight": -1.0}, "balance_loss_weight", "a number >= 0"),
        ({"reward_loss_weight": -0.1}, "reward_loss_weight", "a number >= 0"),
        ({"reward_loss_weight": "a lot"}, "reward_loss_weight", "a number >= 0"),
        ({"minus_logit_offset": float("inf")}, "minus_logit_offset", "a finite number"),
        ({"zero_logit_offset": float("nan")}, "zero_logit_offset", "a finite number"),
        ({"zero_logit_offset": None}, "zero_logit_offset", "a finite number"),
        ({"init_std": -0.02}, "init_std", "a number > 0"),
        ({"bias": 1}, "bias", "True or False"),
    ],
)
def test_tc_moe_bad_options_give_a_one_line_error(options: dict, option: str, valid: str) -> None:
    with pytest.raises(HyperRouterError) as info:
        build_router("tc_moe", 8, 4, **options)
    message = str(info.value)
    assert option in message and valid in message and "\n" not in message


def test_unknown_options_are_rejected() -> None:
    for name in ("adamoe", "tc_moe"):
        with pytest.raises(HyperRouterError, match="unknown option"):
            build_router(name, 8, 4, null_expert=2)
