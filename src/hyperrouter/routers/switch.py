"""Softmax-gated top-k routers with an expert capacity: Switch (top-1) and GShard (top-2).

Both score experts with p = softmax(x W_r) over all E experts, take every token's best experts in
order (slot 0 = argmax, so `capacity_keep_mask` serves every token's first choice before
anyone's second, earlier tokens first within a slot), and drop the pairs beyond each expert's
capacity ceil(T * k / E * capacity_factor) through `Routing.keep`. The MoE layer gives dropped
pairs output 0, so in a Transformer block a token whose every pair was dropped passes through the
residual only.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hyperrouter.routers.base import (
    LogitRouter,
    Routing,
    RoutingContext,
    check_option,
    fp32_linear,
    init_linear_,
    register_router,
    select_experts,
)
from hyperrouter.routers.capacity import capacity_keep_mask, expert_capacity
from hyperrouter.routers.losses import at_least_fp32

SECOND_EXPERT_POLICIES = ("random", "all")


def _check_capacity_factor(name: str, value: object) -> float | None:
    ok = value is None or (
        isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    )
    check_option(name, value, ok, "a number > 0 or None (no limit)")
    return None if value is None else float(value)


class _CapacityRouter(LogitRouter):
    """Linear gate (no bias by default, as in Switch/GShard), training jitter on the router input,
    and a router-side capacity (separate factors for training and evaluation)."""

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        *,
        capacity_factor: float | None,
        eval_capacity_factor: float | None,
        jitter_eps: float,
        bias: bool,
        init_std: float,
        **options,
    ) -> None:
        super().__init__(d_model, num_experts, **options)
        self.capacity_factor = _check_capacity_factor("capacity_factor", capacity_factor)
        self.eval_capacity_factor = _check_capacity_factor(
            "eval_capacity_factor", eval_capacity_factor
        )
        check_option(
            "jitter_eps",
            jitter_eps,
            isinstance(jitter_eps, (int, float)) and 0 <= jitter_eps < 1,
            "a number in [0, 1)",
        )
        check_option(
            "init_std", init_std, isinstance(init_std, (int, float)) and init_std > 0, "> 0"
        )
        self.jitter_eps = float(jitter_eps)
        self.gate = nn.Linear(d_model, num_experts, bias=bool(bias))
        init_linear_(self.gate, init_std)

    def compute_logits(self, x_TD: Tensor) -> Tensor:
        return fp32_linear(self.gate, x_TD)

    def router_logits(self, x_TD: Tensor, ctx: RoutingContext) -> Tensor:
        """Logits [T, E] in fp32; in training, the input is first multiplied by U(1-eps, 1+eps)."""
        if ctx.training and self.jitter_eps > 0:
            noise = torch.empty_like(x_TD).uniform_(1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
            x_TD = x_TD * noise
        return at_least_fp32(self.scores(x_TD, ctx))

    def capacity_keep(
        self, ids_TK: Tensor, ctx: RoutingContext, keep_TK: Tensor | None = None
    ) -> Tensor | None:
        """The router's keep mask: `keep_TK` further limited by this mode's expert capacity."""
        factor = self.capacity_factor if ctx.training else self.eval_capacity_factor
        num_tokens, top_k = ids_TK.shape
        if factor is None or num_tokens == 0:
            return keep_TK
        capacity = expert_capacity(num_tokens, self.num_experts, top_k, factor)
        return capacity_keep_mask(ids_TK, self.num_experts, capacity, keep_TK)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, capacity_factor={self.capacity_factor}, "
            f"eval_capacity_factor={self.eval_capacity_factor}, jitter_eps={self.jitter_eps}"
        )


@register_router("switch")
class SwitchRouter(_CapacityRouter):
    """Switch Transformer routing (Fedus, Zoph, Shazeer 2021, "Switch Transformers: Scaling to
    Trillion Parameter Models with Simple and Efficient Sparsity", arXiv 2101.03961).

    p = softmax(x W_r) over all E experts; e* = argmax_i p_i; y = p_{e*} E_{e*}(x). The combine
    weight is the probability itself (not renormalised), so at k = 1 the router is trained by the
    output. Balance loss alpha * N * sum_i f_i P_i (f_i: fraction of assignments to expert i before
    dropping, P_i: mean p_i), alpha = 0.01. Expert capacity ceil(T / E * capacity_factor); tokens
    beyond it are dropped (`Routing.keep` False): the layer outputs 0 for them and the block's
    residual carries x.

    Options (defaults): capacity_factor 1.0 (training; the paper's common setting, it also reports
    1.25 and 2.0), eval_capacity_factor 2.0 (as in the Switch/ST-MoE code); None = no limit.
    jitter_eps 0.0: in training the router input is multiplied by U(1 - eps, 1 + eps); the paper
    used eps = 1e-2 in some runs, off here by default. balance_loss_weight 0.01, z_loss_weight 0
    (ST-MoE's router z-loss, 1e-3 there), score softmax_topk, renormalize False, bias False,
    init_std 0.02.

    Differences from the paper / reference code, and why:
    - ctx.top_k is honoured: slots are every token's best k experts in score order, capacity
      ceil(T * k / E * capacity_factor) (k = 1 in the switch presets gives the paper's router).
    - Capacity is counted over the T tokens of one call (the layer's routed tokens, padding
      removed), not per fixed-size group, and has no minimum beyond 1 (DeepSpeed uses 4).
    - The balance loss is the paper's formula over the whole call: f_i and P_i over all T routed
      tokens. transformers' SwitchTransformers computes it per sequence (its "group") and
      averages over the sequences, mean_g N sum_i f_gi P_gi, which also penalises a sequence that
      crowds a few experts while other sequences compensate. We use the whole call because the
      layer routes a flat, padding-free batch of tokens whose sequences it does not always know
      (sequence ids are optional); both agree when every sequence spreads like the batch.
    - The router is Linear(d, E) initialised N(0, init_std) like the rest of the model, not the
      paper's truncated normal of scale 0.1 / fan-in; like the paper it has no bias.
    - The router computes in fp32 (the paper's "selective precision") whatever the model dtype.
    - `score` can swap the softmax for another score function (sigmoid, topk_softmax); only the
      default is Switch.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        *,
        capacity_factor: float | None = 1.0,
        eval_capacity_factor: float | None = 2.0,
        jitter_eps: float = 0.0,
        score: str = "softmax_topk",
        renormalize: bool = False,
        balance_loss_weight: float = 0.01,
        z_loss_weight: float = 0.0,
        bias: bool = False,
        init_std: float = 0.02,
    ) -> None:
        super().__init__(
            d_model,
            num_experts,
            capacity_factor=capacity_factor,
            eval_capacity_factor=eval_capacity_factor,
            jitter_eps=jitter_eps,
            bias=bias,
            init_std=init_std,
            score=score,
            renormalize=renormalize,
            balance_loss_weight=balance_loss_weight,
            z_loss_weight=z_loss_weight,
        )

    def forward(self, x_TD: Tensor, ctx: RoutingContext | int) -> Routing:
        ctx = self.context(ctx)
        logits_TE = self.router_logits(x_TD, ctx)
        ids_TK, weights_TK = select_experts(logits_TE, ctx.top_k, self.score, self.renormalize)
        if ctx.top_k > 1:  # slot order = score order, so capacity serves first choices first
            order_TK = weights_TK.detach().argsort(dim=-1, descending=True, stable=True)
            ids_TK, weights_TK = ids_TK.gather(1, order_TK), weights_TK.gather(1, order_TK)
        keep_TK = self.capacity_keep(ids_TK, ctx)
        return Routing(
            ids_TK, weights_TK, logits_TE, self.aux_losses(logits_TE, ids_TK), keep=keep_TK
        )


@register_router("gshard")
class GShardRouter(_CapacityRouter):
    """GShard top-2 gating (Lepikhin et al. 2020, "GShard: Scaling Giant Models with Conditional
    Computation and Automatic Sharding", arXiv 2006.16668, Algorithm 1).

    p = softmax(x W_g) over all E; e1 = argmax p, e2 = argmax of p without e1; gates renormalised
    over the two, g1 = p_e1 / (p_e1 + p_e2), g2 = p_e2 / (p_e1 + p_e2); y = g1 E_e1(x) + g2 E_e2(x).
    In training the second expert is kept only if 2 * g2 > U(0, 1), i.e. with probability 2 * g2
    (1 when the two gates tie, small when e1 dominates); in evaluation it is always kept, so eval
    is deterministic. Balance loss alpha * E * sum_i f_i P_i with f_i the fraction of tokens whose
    FIRST choice is i (GShard's c_e / S), alpha = 0.01. Capacity per expert
    ceil(T * k / E * capacity_factor) (GShard's 2N/E at k = 2, factor 1), every token's first
    choice before anyone's second; a second choice not sampled takes no capacity.

    The normalisation: the sampling rule uses the gates renormalised over the two chosen experts,
    as Algorithm 1 does, because 2 * g2 is then a probability in [0, 1] that does not depend on E;
    with the full-softmax p_e2 the second expert would almost never be used at large E.

    Options (defaults): capacity_factor 1.0, eval_capacity_factor 2.0 (None = no limit),
    second_expert_policy "random" (GShard's sampling; "all" always keeps the second expert, as in
    evaluation), jitter_eps 0.0 (off; Switch-style input jitter), balance_loss_weight 0.01,
    z_loss_weight 0, bias False, init_std 0.02.

    Differences from the paper / reference code, and why:
    - ctx.top_k is honoured: the gates are renormalised over the k best experts and each slot
      j >= 2 is kept in training with probability min(1, k * g_j) (GShard's rule at k = 2). At
      k = 1 the single gate is 1, so the router trains through the balance loss only.
    - Gates are renormalised before sampling and capacity (Algorithm 1); the fairseq/DeepSpeed
      top2gating renormalises after dropping, so a token whose second expert was dropped gets
      weight 1 there and g1 < 1 here.
    - Capacity is counted over the T tokens of one call, not per fixed-size group; the sampling
      uses torch's global generator (fixed by torch.manual_seed), not a per-layer seed.
    - Linear router initialised N(0, init_std) like the rest of the model, computed in fp32.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        *,
        capacity_factor: float | None = 1.0,
        eval_capacity_factor: float | None = 2.0,
        second_expert_policy: str = "random",
        jitter_eps: float = 0.0,
        balance_loss_weight: float = 0.01,
        z_loss_weight: float = 0.0,
        bias: bool = False,
        init_std: float = 0.02,
    ) -> None:
        super().__init__(
            d_model,
            num_experts,
            capacity_factor=capacity_factor,
            eval_capacity_factor=eval_capacity_factor,
            jitter_eps=jitter_eps,
            bias=bias,
            init_std=init_std,
            score="softmax_topk",
            renormalize=True,
            balance_loss_weight=balance_loss_weight,
            z_loss_weight=z_loss_weight,
        )
        check_option(
            "second_expert_policy",
            second_expert_policy,
            second_expert_policy in SECOND_EXPERT_POLICIES,
            f"one of {', '.join(SECOND_EXPERT_POLICIES)}",
        )
        self.second_expert_policy = second_expert_policy

    def forward(self, x_TD: Tensor, ctx: RoutingContext | int) -> Routing:
        ctx = self.context(ctx)
        top_k = ctx.top_k
        logits_TE = self.router_logits(x_TD, ctx)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        ids_TK = torch.topk(probs_TE.detach(), top_k, dim=-1, sorted=True).indices
        gates_TK = probs_TE.gather(1, ids_TK)
        if top_k == 1:  # g1 / g1: exactly 1, without the rounding residue of its zero gradient
            weights_TK = torch.ones_like(gates_TK.detach())
        else:
            weights_TK = gates_TK / gates_TK.sum(-1, keepdim=True).clamp_min(1e-20)
        keep_TK = None
        if ctx.training and self.second_expert_policy == "random" and top_k > 1:
            keep_prob_TK = (top_k * weights_TK.detach()).clamp(max=1.0)
            keep_TK = keep_prob_TK > torch.rand_like(keep_prob_TK)
            keep_TK[:, 0] = True
        keep_TK = self.capacity_keep(ids_TK, ctx, keep_TK)
        aux = self.aux_losses(logits_TE, ids_TK[:, :1])
        return Routing(ids_TK, weights_TK, logits_TE, aux, keep=keep_TK)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, second_expert_policy={self.second_expert_policy}"
