"""LocMoE (GrAP + orthogonal cosine gate, locality loss, angular minimum capacity, off-node
statistic) and CompeteSMoE (competition calls route by expert responses, router loss)."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from hyperrouter import HyperRouterError, MoE
from hyperrouter.routers import RoutingContext, build_router
from hyperrouter.routers.locmoe import locality_loss, minimum_capacity

E, D, H, T = 8, 16, 24, 40


# ---------------------------------------------------------------- locmoe
def test_locmoe_scores_are_cosines_of_grouped_average_pools_over_temperature() -> None:
    torch.manual_seed(0)
    router = build_router("locmoe", D, E, temperature=0.5)
    x = torch.randn(T, D)
    pooled = x.view(T, E, D // E).mean(-1)  # G = E groups of D / E features
    want = F.cosine_similarity(pooled[:, None, :], router.gate[None, :, :], dim=-1) / 0.5
    torch.testing.assert_close(router.compute_logits(x), want)
    routing = router(x, RoutingContext(top_k=2, training=False))
    torch.testing.assert_close(routing.logits, want)


def test_locmoe_gate_is_orthogonally_initialised() -> None:
    torch.manual_seed(0)
    for groups in (None, 16):
        gate = build_router("locmoe", 32, E, num_groups=groups).gate.detach()
        assert gate.shape == (E, groups or E)
        torch.testing.assert_close(gate @ gate.t(), torch.eye(E), atol=1e-5, rtol=0)


def test_locmoe_placement_is_contiguous_or_as_given() -> None:
    router = build_router("locmoe", D, E, num_nodes=4)
    assert router.expert_nodes.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    uneven = build_router("locmoe", D, 5, num_nodes=2)
    assert uneven.expert_nodes.tolist() == [0, 0, 0, 1, 1]
    given = build_router("locmoe", D, 4, num_nodes=2, expert_nodes=[1, 0, 1, 0])
    assert given.expert_nodes.tolist() == [1, 0, 1, 0]


def test_locmoe_locality_loss_is_zero_on_node_and_lower_nearer_home() -> None:
    local = torch.tensor([[True, True, False, False]] * 2)  # both tokens live on node 0
    on_node = torch.tensor([[3.0, 1.0, -2.0, -2.0], [1.0, 3.0, -2.0, -2.0]])
    off_node = torch.tensor([[-2.0, -2.0, 3.0, 1.0], [1.0, -2.0, 3.0, -2.0]])
    routed_off = torch.tensor([True, True])
    assert locality_loss(on_node, local, torch.tensor([False, False])) == 0
    near = locality_loss(on_node, local, routed_off)
    far = locality_loss(off_node, local, routed_off)
    assert 0 < near < far
    p = torch.softmax(off_node, -1)
    torch.testing.assert_close(far, -torch.log(p[:, :2].sum(-1)).mean())


def test_locmoe_loss_in_the_layer_is_zero_when_every_token_routes_home() -> None:
    torch.manual_seed(0)
    router = build_router("locmoe", D, 4, num_nodes=2, capacity_factor=None)
    x = torch.randn(T, D)
    home = router(x, RoutingContext(top_k=1, training=True)).expert_ids[:, 0] // 2
    ctx = RoutingContext(top_k=1, training=True, sequence_ids=home)  # node s mod 2 = s
    routing = router(x, ctx)
    assert routing.aux_losses["locality_loss"] == 0
    assert router.last_off_node_fraction == 0
    away = router(x, RoutingContext(top_k=1, training=True, sequence_ids=1 - home))
    assert away.aux_losses["locality_loss"] > 0
    assert router.last_off_node_fraction == 1


def test_locmoe_off_node_fraction_counts_kept_pairs_on_a_constructed_case() -> None:
    router = build_router("locmoe", 4, 4, num_nodes=2, capacity_factor=None)
    with torch.no_grad():
        router.gate.copy_(torch.eye(4))
    # GrAP with G = E = 4 on d = 4 is the identity: token t's best expert is its largest feature
    x = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
    x = x + 0.01 * torch.arange(4.0)  # break ties for the second slot: expert 3 everywhere
    seq = torch.tensor([0, 1, 0, 1])  # home nodes 0, 1, 0, 1; experts 0,1 on node 0, 2,3 on 1
    routing = router(x, RoutingContext(top_k=1, training=False, sequence_ids=seq))
    assert routing.expert_ids[:, 0].tolist() == [0, 1, 2, 3]
    # token 0 -> e0 (node 0, home 0) on; 1 -> e1 (0 vs 1) off; 2 -> e2 (1 vs 0) off; 3 -> e3 on
    assert router.last_off_node_fraction.item() == pytest.approx(0.5)
    # without sequence ids the home node is the position mod 2: the same pattern here
    router(x, RoutingContext(top_k=1, training=False))
    assert router.last_off_node_fraction.item() == pytest.approx(0.5)
    # top-2: the second slot of every token is expert 3 (node 1) except token 3's (expert 2)
    router(x, RoutingContext(top_k=2, training=False, sequence_ids=seq))
    # pairs: (0,e0 on) (0,e3 off) (1,e1 off) (1,e3 on) (2,e2 off) (2,e3 off) (3,e3 on) (3,e2 on)
    assert router.last_off_node_fraction.item() == pytest.approx(4 / 8)


def test_locmoe_minimum_capacity_on_a_constructed_case() -> None:
    # cosines of 5 tokens to 3 experts; top-1 picks 0, 0, 1, 2, 0; the worst pick has cos 0.6
    cos = torch.tensor(
        [
            [0.9, 0.1, 0.0],  # only e0 within delta: forced to e0
            [0.8, 0.7, 0.0],  # e0 and e1 within delta: free
            [0.2, 0.95, 0.1],  # forced to e1
            [0.0, 0.3, 0.6],  # the worst pick (delta = acos 0.6); forced to e2
            [0.85, 0.0, 0.2],  # forced to e0
        ]
    )
    ids = cos.argmax(-1, keepdim=True)
    assert minimum_capacity(cos, ids).item() == 2  # e0 must hold tokens 0 and 4
    ids2 = cos.topk(2, dim=-1).indices  # top-2: worst pick cos 0.1 (token 0's e1)
    # within delta: t0 {0,1} forced, t1 {0,1} forced, t2 {0,1,2} free, t3 {1,2} forced, t4 {0,2}
    assert minimum_capacity(cos, ids2).item() == 3  # e0: t0 t1 t4; e1: t0 t1 t3; e2: t3 t4


def test_locmoe_capacity_is_switch_capacity_floored_at_the_minimum() -> None:
    torch.manual_seed(0)
    router = build_router("locmoe", D, E, capacity_factor=0.25)
    x = torch.randn(T, D)
    routing = router(x, RoutingContext(top_k=1, training=True))
    capacity = max(int(router.last_min_capacity), 2)  # ceil(40 / 8 * 0.25) = 2
    load = torch.bincount(routing.expert_ids[routing.keep], minlength=E)
    want = torch.bincount(routing.expert_ids[:, 0], minlength=E).clamp(max=capacity)
    assert torch.equal(load, want)
    floorless = build_router("locmoe", D, E, capacity_factor=0.25, min_capacity=False)
    floorless.load_state_dict(router.state_dict())
    kept = floorless(x, RoutingContext(top_k=1, training=True)).keep
    assert torch.bincount(routing.expert_ids[kept], minlength=E).max() <= 2
    assert router(x, RoutingContext(top_k=1, training=False)).keep is None  # eval: no limit


@pytest.mark.parametrize(
    "options, name",
    [
        ({"num_nodes": 9}, "num_nodes"),
        ({"num_nodes": 0}, "num_nodes"),
        ({"num_groups": 17}, "num_groups"),
        ({"temperature": 0.0}, "temperature"),
        ({"locality_loss_weight": -1.0}, "locality_loss_weight"),
        ({"capacity_factor": 0.0}, "capacity_factor"),
        ({"expert_nodes": [0, 1, 0]}, "expert_nodes"),
        ({"expert_nodes": [0] * 8}, "expert_nodes"),  # node 1 holds no expert
        ({"expert_nodes": [0, 1, 2, 0, 1, 0, 1, 0]}, "expert_nodes"),
    ],
)
def test_locmoe_bad_options_are_one_line_errors(options: dict, name: str) -> None:
    with pytest.raises(HyperRouterError, match=name) as err:
        build_router("locmoe", D, E, **options)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- competesmoe
def all_responses(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    ex = layer.experts
    outs = [torch.relu(x @ ex.w_in[e] + ex.b_in[e]) @ ex.w_out[e] + ex.b_out[e] for e in range(E)]
    return torch.stack(outs, 1)


@pytest.mark.parametrize("response_score", ["norm", "softplus_mean"])
def test_competesmoe_competition_routes_to_the_top_k_responses(response_score: str) -> None:
    torch.manual_seed(0)
    options = {"competition_rate": 1.0, "response_score": response_score}
    layer = MoE(D, E, H, 2, router="competesmoe", router_options=options).train()
    x = torch.randn(T, D)
    out = layer(x, return_details=True)
    y = all_responses(layer, x).detach()
    scores = y.norm(dim=-1) if response_score == "norm" else F.softplus(y).mean(-1)
    values, ids = scores.topk(2, dim=-1)
    assert torch.equal(out.routing.expert_ids.sort(-1).values, ids.sort(-1).values)
    weights = torch.softmax(values, -1)
    got = out.routing.weights.gather(1, out.routing.expert_ids.argsort(-1))
    torch.testing.assert_close(got, weights.gather(1, ids.argsort(-1)))
    target = torch.zeros(T, E).scatter(1, ids, weights)
    probs = torch.softmax(layer.router.gate(x), -1)
    want = 5.0 * ((probs - target) ** 2).mean()
    torch.testing.assert_close(out.aux_losses["router_loss"], want)
    assert set(out.aux_losses) == {"router_loss", "balance_loss"}
    out.aux_losses["router_loss"].backward()
    assert layer.router.gate.weight.grad.abs().sum() > 0
    want_out = (y.gather(1, ids[..., None].expand(-1, -1, D)) * weights[..., None]).sum(1)
    torch.testing.assert_close(out.output, want_out, rtol=1e-5, atol=1e-5)


def test_competesmoe_never_competes_in_eval() -> None:
    torch.manual_seed(0)
    layer = MoE(D, E, H, 2, router="competesmoe", router_options={"competition_rate": 1.0})
    layer.eval()
    assert not layer.router.wants_expert_responses(RoutingContext(top_k=2, training=False))
    out = layer(torch.randn(T, D), return_details=True)
    assert "router_loss" not in out.aux_losses


def test_competesmoe_at_rate_zero_is_the_linear_router() -> None:
    torch.manual_seed(0)
    options = {"competition_rate": 0.0, "balance_loss_weight": 0.0}
    compete = MoE(D, E, H, 2, router="competesmoe", router_options=options).train()
    smoe = MoE(D, E, H, 2, router="smoe").train()
    smoe.load_state_dict(compete.state_dict())
    x = torch.randn(T, D)
    for _ in range(3):
        a, b = compete(x, return_details=True), smoe(x, return_details=True)
        assert torch.equal(a.output, b.output)
        assert torch.equal(a.routing.expert_ids, b.routing.expert_ids)
        assert a.aux_losses == {}


def test_competesmoe_competes_on_about_the_rate_of_calls_fixed_by_the_seed() -> None:
    router = build_router("competesmoe", D, E, competition_rate=0.2)
    ctx = RoutingContext(top_k=2, training=True)

    def draws() -> list[bool]:
        torch.manual_seed(3)
        return [router.wants_expert_responses(ctx) for _ in range(4000)]

    first = draws()
    assert first == draws()
    assert sum(first) / len(first) == pytest.approx(0.2, abs=0.02)  # ~3.2 standard deviations


@pytest.mark.parametrize(
    "options, name",
    [
        ({"competition_rate": 1.5}, "competition_rate"),
        ({"competition_rate": -0.1}, "competition_rate"),
        ({"response_score": "max"}, "response_score"),
        ({"router_loss_weight": -1.0}, "router_loss_weight"),
    ],
)
def test_competesmoe_bad_options_are_one_line_errors(options: dict, name: str) -> None:
    with pytest.raises(HyperRouterError, match=name) as err:
        build_router("competesmoe", D, E, **options)
    assert "\n" not in str(err.value)
