"""Routing interface v2: context, keep masks, hooks, score functions, capacity priority, shared
and fine-grained experts, option errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from hyperrouter import HyperRouterError, MoE
from hyperrouter.models.transformer_xl import ModelConfig, MoEConfig, TransformerXL
from hyperrouter.routers import Router, Routing, RoutingContext, build_router, select_experts
from hyperrouter.routers.capacity import capacity_keep_mask
from hyperrouter.train.step import ChunkResult, training_step

E, D, H = 4, 8, 12


class Recorder(Router):
    """Routes token t to expert t mod E; records contexts, token losses and step hooks."""

    def __init__(self, d_model: int, num_experts: int) -> None:
        super().__init__(d_model, num_experts)
        self.scale = nn.Parameter(torch.ones(()))
        self.contexts: list[RoutingContext] = []
        self.token_losses: list[Tensor] = []
        self.steps: list[tuple[int, list[int]]] = []

    def forward(self, x_TD: Tensor, ctx: RoutingContext | int) -> Routing:
        ctx = self.context(ctx)
        self.contexts.append(ctx)
        ids = (torch.arange(x_TD.shape[0]) % self.num_experts).unsqueeze(1)
        weights = self.scale.expand(x_TD.shape[0], 1) * 1.0
        return Routing(ids, weights, None)

    def token_loss_terms(self, routing: Routing, token_loss_T: Tensor) -> dict[str, Tensor]:
        self.token_losses.append(token_loss_T)
        return {"policy_loss": (routing.weights[:, 0] * token_loss_T).mean()}

    def optimizer_step(self, load_E: Tensor, step: int) -> None:
        self.steps.append((step, load_E.tolist()))


def recorder_layer() -> MoE:
    layer = MoE(D, E, H, 1, router="smoe")
    layer.router = Recorder(D, E)
    return layer


def test_context_carries_k_mode_step_and_masked_ids() -> None:
    layer = recorder_layer().train()
    layer.step = 7
    x = torch.randn(2, 3, D)
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    token_ids = torch.tensor([[10, 11, 12], [13, 14, 15]])
    seq = torch.tensor([[0, 0, 0], [1, 1, 1]])
    out = layer(x, mask=mask, token_ids=token_ids, sequence_ids=seq, return_details=True)
    ctx = layer.router.contexts[-1]
    assert ctx.top_k == 1 and ctx.training and ctx.step == 7
    assert ctx.token_ids.tolist() == [10, 11, 13, 15]
    assert ctx.sequence_ids.tolist() == [0, 0, 1, 1]
    assert out.stats.entropy is None  # a router without logits: no entropy
    layer.eval()
    layer(x)
    assert not layer.router.contexts[-1].training and layer.router.contexts[-1].token_ids is None


def test_transformer_xl_gives_routers_token_and_sequence_ids() -> None:
    torch.manual_seed(0)
    model = TransformerXL(
        20,
        ModelConfig(n_layer=1, n_head=2, d_head=4, d_model=D, d_inner=16, dropout=0.0),
        MoEConfig(layers=[0], num_experts=E, d_expert=H, router="smoe"),
        mem_len=4,
        top_k=1,
    )
    layer = model.moe_layers()[0]
    layer.router = Recorder(D, E)
    data = torch.randint(0, 20, (5, 3))
    model(data, data)
    ctx = layer.router.contexts[-1]
    assert torch.equal(ctx.token_ids, data.reshape(-1))
    assert torch.equal(ctx.sequence_ids, torch.arange(3).repeat(5))


def test_hooks_run_once_per_optimizer_step_after_accumulation_and_never_in_eval() -> None:
    layer = recorder_layer().train()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    xs = [torch.randn(5, D), torch.randn(3, D)]

    def chunk(x: Tensor):
        def run() -> ChunkResult:
            out = layer(x, return_details=True)
            token_loss = out.output.pow(2).sum(-1)
            return ChunkResult(token_loss.mean(), torch.zeros(()), token_loss, [out])

        return run

    result = training_step(layer, opt, [chunk(x) for x in xs], step=3, clip=0.0, params=[])
    router = layer.router
    assert [len(t) for t in router.token_losses] == [5, 3]
    assert router.steps == [(3, [3, 2, 2, 1])]  # the load of both chunks, summed
    assert "policy_loss" in result.aux_losses
    assert router.scale.grad is not None  # the token-loss term was backpropagated
    assert result.layer_load == [[3, 2, 2, 1]]
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(6, D))
    layer.optimizer_step(4)  # nothing accumulated in eval
    assert router.steps[-1] == (4, [0, 0, 0, 0])
    assert layer.token_loss_terms(torch.zeros(6)) == {}


def test_capacity_gives_every_first_choice_priority_over_any_second_choice() -> None:
    # token 0 picks (0, 1); token 1 picks (1, 0); capacity 1 per expert.
    ids = torch.tensor([[0, 1], [1, 0]])
    keep = capacity_keep_mask(ids, 2, 1)
    # First-come-first-served would let token 0's second choice (expert 1) push out token 1's
    # first choice; GShard/Switch order keeps both first choices.
    assert keep.tolist() == [[True, False], [True, False]]
    # within a slot, earlier tokens win; pairs the router dropped take no capacity
    ids = torch.tensor([[0], [0], [0]])
    assert capacity_keep_mask(ids, 1, 2).tolist() == [[True], [True], [False]]
    router_keep = torch.tensor([[False], [True], [True]])
    assert capacity_keep_mask(ids, 1, 2, router_keep).tolist() == [[False], [True], [True]]


def test_score_functions_follow_their_formulas() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, E)
    ids, w = select_experts(logits, 2, "softmax_topk")
    p = torch.softmax(logits, -1)
    top = p.topk(2, -1)
    assert torch.equal(ids.sort(-1).values, top.indices.sort(-1).values)
    torch.testing.assert_close(w.sort(-1).values, top.values.sort(-1).values)
    ids, w = select_experts(logits, 2, "softmax_topk", renormalize=True)
    torch.testing.assert_close(w.sum(-1), torch.ones(6))
    ids, w = select_experts(logits, 2, "sigmoid")
    torch.testing.assert_close(w, torch.sigmoid(logits).gather(1, ids))
    # a selection bias changes the choice, never the weights' formula
    bias = torch.tensor([0.0, 0.0, 0.0, 100.0])
    ids, w = select_experts(logits, 1, "sigmoid", selection_bias_E=bias)
    assert ids.flatten().tolist() == [3] * 6
    torch.testing.assert_close(w.flatten(), torch.sigmoid(logits[:, 3]))
    # the reference rule gives weight 1 at k = 1 (and so no router gradient from the output)
    _, w = select_experts(logits, 1, "topk_softmax")
    assert torch.equal(w, torch.ones(6, 1))
    with pytest.raises(HyperRouterError, match="unknown score 'max'"):
        build_router("smoe", D, E, score="max")


def test_shared_experts_see_every_token_and_granularity_splits_experts() -> None:
    torch.manual_seed(0)
    layer = MoE(D, E, H, 1, router="smoe", shared_experts=1)
    x = torch.randn(10, D)
    routed_only = MoE(D, E, H, 1, router="smoe")
    routed_only.load_state_dict(layer.state_dict(), strict=False)
    shared = layer.shared
    expected = routed_only(x) + torch.stack(
        [shared.expert_forward(0, x[t : t + 1])[0] for t in range(10)]
    )
    torch.testing.assert_close(layer(x), expected)
    gated = MoE(D, E, H, 1, router="smoe", shared_experts=2, shared_mix="gate")
    assert gated(x).shape == (10, D) and gated.shared_gate is not None
    fine = MoE(D, E, H, 4, router="smoe", granularity=3)
    assert fine.num_experts == 3 * E and fine.experts.d_hidden == H // 3
    assert fine(x, return_details=True).stats.tokens_per_expert.numel() == 3 * E


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"capacity_factor": 0.0}, "capacity_factor must be > 0"),
        ({"capacity_factor": -1.0}, "capacity_factor must be > 0"),
        ({"shared_experts": E + 1}, r"shared_experts must be in \[0, num_experts=4\]"),
        ({"granularity": 5}, "granularity must divide d_hidden=12"),
        ({"shared_mix": "max"}, "unknown shared_mix 'max'"),
        ({"dispatch": "scatter"}, "unknown dispatch 'scatter'"),
        ({"second_router": "smoe", "second_top_k": 0}, r"second_top_k must be in \[1, 4\]"),
        ({"router_options": {"score": "max"}}, "unknown score 'max'"),
        ({"router_options": {"balance_loss_weight": -1}}, "balance_loss_weight must be"),
    ],
)
def test_bad_layer_options_name_the_option_and_the_valid_range(kwargs, match) -> None:
    with pytest.raises(HyperRouterError, match=match):
        MoE(D, E, H, 1, **kwargs)


def test_dense_router_rejects_a_balance_loss_and_keeps_the_z_loss() -> None:
    with pytest.raises(HyperRouterError, match="balance loss is constant"):
        MoE(D, E, H, 1, router="dense", router_options={"base_options": {"balance_loss_weight": 1}})
    layer = MoE(D, E, H, 1, router="dense", router_options={"base_options": {"z_loss_weight": 1}})
    out = layer(torch.randn(5, D), return_details=True)
    assert set(out.aux_losses) == {"z_loss"}


def test_dtype_mismatch_is_one_clear_error_and_autocast_still_works() -> None:
    layer = MoE(D, E, H, 2)
    with pytest.raises(HyperRouterError, match=r"torch.float64 but the layer's parameters are"):
        layer(torch.randn(3, D, dtype=torch.float64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.randn(3, D)).dtype == torch.bfloat16
    assert math.isfinite(
        float(layer.double()(torch.randn(3, D, dtype=torch.float64)).sum().detach())
    )


class Competition(Router):
    """Routes every token to the expert whose output has the largest norm (when asked to)."""

    def wants_expert_responses(self, ctx: RoutingContext) -> bool:
        return ctx.training

    def route_by_responses(self, x_TD, ctx, responses_TED) -> Routing:
        self.seen = responses_TED
        ids = responses_TED.norm(dim=-1).argmax(-1, keepdim=True)
        return Routing(ids, torch.ones(x_TD.shape[0], 1))

    def forward(self, x_TD, ctx) -> Routing:
        return Routing(
            torch.zeros(x_TD.shape[0], 1, dtype=torch.long), torch.ones(x_TD.shape[0], 1)
        )


def test_a_router_may_route_by_every_experts_response() -> None:
    torch.manual_seed(0)
    layer = MoE(D, E, H, 1, router="smoe")
    layer.router = Competition(D, E)
    x = torch.randn(9, D)
    out = layer.train()(x, return_details=True)
    manual = torch.stack([layer.experts.expert_forward(e, x) for e in range(E)], 1)
    torch.testing.assert_close(layer.router.seen, manual)
    assert not layer.router.seen.requires_grad
    assert torch.equal(out.routing.expert_ids[:, 0], manual.norm(dim=-1).argmax(-1))
    assert layer.eval()(x, return_details=True).routing.expert_ids.eq(0).all()
