"""SMEAR (Muqeeth, Liu, Raffel, TMLR 2024, "Soft Merging of Experts with Adaptive Routing",
arXiv 2306.03745): every token is processed by one merged expert whose parameters are the router-
weighted average of all experts' parameters, f(u; sum_i R(v)_i theta_i).

Routing is per sequence: v = a summary of the sequence's layer inputs, p = softmax(W LN(v) + b)
over the E experts; in training, expert dropout zeroes each expert's probability with rate
`expert_dropout` and renormalises, with one dropout mask per sequence (as the reference draws one
per example), shared by every token of the sequence under either summary. The router asks the
layer for the `merge` dispatch (`hyperrouter.moe.dispatch`), which computes
f(x_t; sum_e p_e theta_e) exactly.

Summaries (`summary` option):
- `mean` (the paper): the mean of the whole sequence's inputs. A token's routing then depends on
  the tokens after it: not causal, so a language model may not use it (it would see the future).
- `causal` (our addition, the default): the mean of the sequence's inputs up to and including the
  token (a prefix mean), so routing never sees the future. Each token then has its own merged
  expert. In Transformer-XL the prefix covers the current segment only (the recurrence memory is
  not part of the routed tokens).
Sequences come from `RoutingContext.sequence_ids` (Transformer-XL: the batch column; the
classifier: the example); without them the whole call is one sequence, in token order.

Options (defaults): summary "causal", expert_dropout 0.1, router_init_std 0.01 (the reference
initialises the router N(0, 1e-2)), z_loss_weight 0.

Differences from the paper / reference code, and why:
- The reference experts are adapters inside T5; here they are the layer's FFN experts.
- The reference (r-three/smear, `adapter_utils.Router`) normalises the router input with a
  LayerNorm and, with `normalize_router_weights`, also the router weight matrix with a LayerNorm
  whose gain starts at the init scale 1e-2; we normalise the summary only and use a Linear
  initialised N(0, 1e-2). Our gate has a bias (starting at 0); the reference's is optional
  (`no_router_bias`).
- When dropout removes every expert of a sequence, the reference renormalises (p + 1e-10) and so
  falls back to near-uniform weights; we keep each token's most probable expert instead.
- Merging is computed as sum_e p_e (x W_e) layer by layer (exact, since each layer is linear in
  its parameters) instead of materialising the merged weights: the same result, and per-token
  merged experts (the causal summary) need no [T, d, h] buffer. It costs every expert's GEMMs on
  every token (E times a top-1 layer): the price of SMEAR on one device.
- No balance loss: every expert is used by every token (a balance loss is meaningless).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from hyperrouter.routers.base import (
    Router,
    Routing,
    RoutingContext,
    check_option,
    fp32_linear,
    register_router,
)
from hyperrouter.routers.losses import at_least_fp32, router_z_loss

SUMMARIES = ("causal", "mean")


def sequence_summary(x_TD: Tensor, sequence_ids: Tensor | None, causal: bool) -> Tensor:
    """[T, D]: per token, the mean of its sequence's inputs (up to itself when `causal`).

    Tokens of one sequence are taken in their order in x_TD (a stable sort by sequence id).
    """
    num_tokens = x_TD.shape[0]
    if sequence_ids is None:
        sequence_ids = torch.zeros(num_tokens, dtype=torch.long, device=x_TD.device)
    order = torch.argsort(sequence_ids, stable=True)
    seq_sorted = sequence_ids.index_select(0, order)
    x_sorted = x_TD.index_select(0, order)
    _, inverse, counts = torch.unique_consecutive(
        seq_sorted, return_inverse=True, return_counts=True
    )
    if causal:
        csum = x_sorted.cumsum(0)
        starts = counts.cumsum(0) - counts
        before = torch.cat([csum.new_zeros(1, x_TD.shape[1]), csum])[starts].index_select(
            0, inverse
        )
        position = torch.arange(num_tokens, device=x_TD.device) - starts.index_select(0, inverse)
        summary_sorted = (csum - before) / (position + 1).unsqueeze(1).to(x_TD.dtype)
    else:
        sums = x_sorted.new_zeros(counts.numel(), x_TD.shape[1]).index_add(0, inverse, x_sorted)
        means = sums / counts.unsqueeze(1).to(x_TD.dtype)
        summary_sorted = means.index_select(0, inverse)
    summary = torch.empty_like(summary_sorted)
    summary[order] = summary_sorted
    return summary


@register_router("smear")
class SmearRouter(Router):
    """Soft merging of experts: one merged expert per sequence (or per prefix); see the module."""

    uses_all_experts: ClassVar[bool] = True
    dispatch: ClassVar[str | None] = "merge"

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        *,
        summary: str = "causal",
        expert_dropout: float = 0.1,
        router_init_std: float = 0.01,
        z_loss_weight: float = 0.0,
    ) -> None:
        super().__init__(d_model, num_experts)
        check_option("summary", summary, summary in SUMMARIES, f"one of {', '.join(SUMMARIES)}")
        check_option(
            "expert_dropout",
            expert_dropout,
            isinstance(expert_dropout, (int, float)) and 0 <= expert_dropout < 1,
            "a number in [0, 1)",
        )
        check_option(
            "router_init_std",
            router_init_std,
            isinstance(router_init_std, (int, float)) and router_init_std > 0,
            "a number > 0",
        )
        check_option(
            "z_loss_weight",
            z_loss_weight,
            isinstance(z_loss_weight, (int, float)) and z_loss_weight >= 0,
            "a number >= 0",
        )
        self.summary = summary
        self.expert_dropout = float(expert_dropout)
        self.z_loss_weight = float(z_loss_weight)
        self.norm = nn.LayerNorm(d_model)
        self.gate = nn.Linear(d_model, num_experts)
        nn.init.normal_(self.gate.weight, 0.0, router_init_std)
        nn.init.zeros_(self.gate.bias)

    def _dropout_mask(
        self, sequence_ids: Tensor | None, num_tokens: int, device: torch.device
    ) -> Tensor:
        """[T, E] experts kept: one draw per sequence, repeated for each of its tokens."""
        if sequence_ids is None:
            inverse = torch.zeros(num_tokens, dtype=torch.long, device=device)
            num_sequences = 1
        else:
            unique, inverse = torch.unique(sequence_ids, return_inverse=True)
            num_sequences = unique.numel()
        alive_SE = torch.rand(num_sequences, self.num_experts, device=device) >= self.expert_dropout
        return alive_SE.index_select(0, inverse)

    def forward(self, x_TD: Tensor, ctx: RoutingContext | int) -> Routing:
        ctx = self.context(ctx)
        num_tokens = x_TD.shape[0]
        v_TD = sequence_summary(at_least_fp32(x_TD), ctx.sequence_ids, self.summary == "causal")
        with torch.autocast(x_TD.device.type, enabled=False):
            normed = F.layer_norm(
                v_TD,
                (self.d_model,),
                self.norm.weight.to(v_TD.dtype),
                self.norm.bias.to(v_TD.dtype),
            )
        logits_TE = fp32_linear(self.gate, normed)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        if ctx.training and self.expert_dropout > 0 and num_tokens > 0:
            alive = self._dropout_mask(ctx.sequence_ids, num_tokens, x_TD.device)
            # keep at least one expert per token: the best one survives if all were dropped
            none = ~alive.any(-1)
            if bool(none.any()):
                alive[none, probs_TE[none].argmax(-1)] = True
            probs_TE = probs_TE * alive
            probs_TE = probs_TE / probs_TE.sum(-1, keepdim=True)
        ids_TE = torch.arange(self.num_experts, device=x_TD.device).expand(num_tokens, -1)
        aux = {}
        if self.z_loss_weight > 0 and num_tokens > 0:
            aux["z_loss"] = self.z_loss_weight * router_z_loss(logits_TE)
        return Routing(ids_TE, probs_TE, logits_TE, aux)
