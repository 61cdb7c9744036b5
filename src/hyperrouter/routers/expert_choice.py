"""Expert-choice routing: experts pick their tokens instead of tokens picking experts."""

from __future__ import annotations

import math

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
)
from hyperrouter.routers.losses import at_least_fp32


def expert_choice_capacity(num_tokens: int, num_experts: int, capacity_factor: float) -> int:
    """Tokens each expert takes: ceil(T * c / E), at most T (no expert takes a token twice)."""
    return min(num_tokens, math.ceil(num_tokens * capacity_factor / num_experts))


@register_router("expert_choice")
class ExpertChoiceRouter(LogitRouter):
    """Expert-choice routing (Zhou, Lei, Liu, Du, Huang, Zhao, Dai, Chen, Le, Laudon 2022,
    "Mixture-of-Experts with Expert Choice Routing", arXiv 2202.09368).

    S = softmax(X W_g) in R^{T x E} (softmax over experts, per token); each expert e takes the C
    tokens with the highest S[:, e], G, I = TopK(S^T, C), with C = ceil(T * c / E); token t's
    output is sum over the experts that took it of S[t, e] E_e(x_t). Every expert processes exactly
    C tokens (balanced by construction, no auxiliary loss); a token may be taken by 0 to E experts
    (0: it passes through the block's residual only).

    `capacity_factor` c is the average number of experts per token (the paper's c; C = T c / E);
    None (default) means c = this call's top_k, so the compute matches token-choice top-k. It must
    be > 0. When c > E the capacity ceil(T c / E) would exceed T: it is clamped to T (every expert
    then takes every token). With T >= 1 and c > 0, C >= 1, so no expert is left without a token.

    Not causal: a token's experts depend on the scores of every other token of the call, later ones
    included, so in autoregressive language modelling routing leaks information from the future
    and decoding one token at a time is not the same computation. Evaluation results depend on the
    batch: the batch size, the sequence length and which sequences share a batch (and padding,
    which the layer removes before routing) change T, C and the competition for each expert, so a
    token's output differs between batchings. Compare eval numbers only at a fixed batching.

    Output in the layer's token-major form: expert_ids [T, Kmax] and weights [T, Kmax], Kmax = the
    most experts any token got; slots ordered by score; unused slots have keep False, weight 0 and
    expert id 0 (a valid index).

    Options (defaults): capacity_factor None (= top_k; the paper's EC-CF2 is c = 2),
    z_loss_weight 0, bias False, init_std 0.02.

    Differences from the paper / reference code, and why:
    - Capacity is computed over the T tokens of one call (the layer's tokens, padding removed),
      not per fixed group; the paper's optional per-token cap (max experts per token, solved as a
      linear program) is not implemented: a token may use up to E experts.
    - c defaults to the call's top_k so that expert choice slots into top-k schedules and compares
      at equal compute with the token-choice routers; the paper's names c = 1 / 2 are EC-CF1/2.
    - Balance/z losses: none in the paper; the router z-loss is available as an option, the Switch
      balance loss is not (the load is balanced by construction).
    - Linear router without bias, initialised N(0, init_std), computed in fp32.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        *,
        capacity_factor: float | None = None,
        z_loss_weight: float = 0.0,
        bias: bool = False,
        init_std: float = 0.02,
    ) -> None:
        super().__init__(d_model, num_experts, score="softmax_topk", z_loss_weight=z_loss_weight)
        ok = capacity_factor is None or (
            isinstance(capacity_factor, (int, float))
            and not isinstance(capacity_factor, bool)
            and capacity_factor > 0
        )
        check_option(
            "capacity_factor",
            capacity_factor,
            ok,
            "a number > 0 (average experts per token; capacity ceil(T * c / E), clamped to T) "
            "or None (= top_k)",
        )
        check_option(
            "init_std", init_std, isinstance(init_std, (int, float)) and init_std > 0, "> 0"
        )
        self.capacity_factor = None if capacity_factor is None else float(capacity_factor)
        self.gate = nn.Linear(d_model, num_experts, bias=bool(bias))
        init_linear_(self.gate, init_std)

    def compute_logits(self, x_TD: Tensor) -> Tensor:
        return fp32_linear(self.gate, x_TD)

    def capacity(self, num_tokens: int, top_k: int) -> int:
        """C for a call of T tokens at k = top_k."""
        factor = top_k if self.capacity_factor is None else self.capacity_factor
        return expert_choice_capacity(num_tokens, self.num_experts, factor)

    def forward(self, x_TD: Tensor, ctx: RoutingContext | int) -> Routing:
        ctx = self.context(ctx)
        logits_TE = at_least_fp32(self.scores(x_TD, ctx))
        probs_TE = torch.softmax(logits_TE, dim=-1)
        num_tokens, num_experts = probs_TE.shape
        capacity = self.capacity(num_tokens, ctx.top_k)
        device = x_TD.device

        # Each expert's C best tokens, then the (token, expert) pairs sorted by token (stable, so
        # by descending score within a token) to give every token its slots.
        scores_EC, tokens_EC = torch.topk(probs_TE.detach().t(), capacity, dim=1, sorted=True)
        pair_tokens = tokens_EC.reshape(-1)
        pair_experts = torch.arange(num_experts, device=device).repeat_interleave(capacity)
        by_score = torch.argsort(scores_EC.reshape(-1), descending=True, stable=True)
        order = by_score[torch.argsort(pair_tokens[by_score], stable=True)]
        pair_tokens, pair_experts = pair_tokens[order], pair_experts[order]
        counts_T = torch.bincount(pair_tokens, minlength=num_tokens)
        max_slots = max(1, int(counts_T.max())) if num_tokens > 0 else 1
        starts_T = counts_T.cumsum(0) - counts_T
        slots = torch.arange(pair_tokens.numel(), device=device) - starts_T[pair_tokens]

        ids_TK = torch.zeros(num_tokens, max_slots, dtype=torch.long, device=device)
        keep_TK = torch.zeros(num_tokens, max_slots, dtype=torch.bool, device=device)
        ids_TK[pair_tokens, slots] = pair_experts
        keep_TK[pair_tokens, slots] = True
        weights_TK = torch.where(keep_TK, probs_TE.gather(1, ids_TK), 0.0)
        aux = self.aux_losses(logits_TE, ids_TK)  # z-loss only: balance_loss_weight is always 0
        return Routing(ids_TK, weights_TK, logits_TE, aux, keep=keep_TK)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, capacity_factor={self.capacity_factor}"
