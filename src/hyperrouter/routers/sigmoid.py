"""Sigmoid gating as LibMoE implements it, and the parts LibMoE's routers share.

Nguyen, Ho, Rinaldo 2024, "Sigmoid Gating is More Sample Efficient than Softmax Gating in Mixture
of Experts", arXiv 2405.13997; as implemented in LibMoE (Nguyen et al. 2024, "LibMoE: A Library
for comprehensive benchmarking Mixture of Experts in Large Language Models", arXiv 2411.00918;
github.com/Fsoft-AIC/LibMoE, `moe_model/model/moe/smoe_sigmoidgating.py`, since 2026
`vision_language_model/moe_model/model/moe/smoe_sigmoidgating.py`).

    s = sigmoid(x W)            (W: Linear(d_model, E), no bias, N(0, init_std))
    experts: the top k of s     (= the top k of the logits x W)
    weights: s_i / sum_{j in top k} s_j        (renormalize=True, as LibMoE)

The balance loss LibMoE uses for it (and for every router of its `MoeLayer`, `balanceloss`) is
computed on the *softmax* of the logits, not on the sigmoid scores, and counts first choices only:

    L_bal = E * mean_over_sequences sum_i f_i P_i

with P_i the mean over the sequence's tokens of softmax(x W)_i and f_i the fraction of its tokens
whose best expert is i. LibMoE reduces over the sequence axis of its [B, N, E] tensors before the
product, so the loss is per sequence (per image: its MoE layers route the patch tokens of the
vision encoder and projector), then averaged. We do the same with the routing context's
`sequence_ids`; without them the whole call is one sequence, and the loss is the Switch loss with
f_i over first choices (GShard's form).

Options (defaults): renormalize True (LibMoE divides by the sum of the k sigmoid weights),
balance_loss_weight 0.01 and z_loss_weight 0.0, bias False, init_std 0.02. The score is fixed
to sigmoid (the router's point); the z-loss is the shared router z-loss on the logits.

Differences from the paper / reference code, and why:
- The paper studies a dense mixture, sum_i sigmoid(beta_1i^T x + beta_0i) h_i(x), with a bias
  and without normalisation; LibMoE (and we) take the top k, renormalise the k weights, and use no
  gate bias (its `MoeLayer.gate` is Linear(bias=False)). `renormalize=False` gives the paper's
  unnormalised weights over the chosen experts; `bias=True` its bias.
- LibMoE's coefficients: 0.01 (balance) and 0.001 (z-loss) in its training scripts
  (`scripts/train/*/sft.sh`), 0.0 for both in `train.py`'s defaults. We default the balance loss
  to the scripts' 0.01 and the z-loss off (this project's rule for z-losses); set
  z_loss_weight=0.001 for LibMoE's runs.
- LibMoE computes its auxiliary losses only when the input requires grad (training); we compute
  them in every call, like the other routers (the layer reports them; only training uses them).
- Slots are in score order (slot 0 is the best expert), as LibMoE's sorted `torch.topk`: the
  layer's capacity limit then serves first choices first.
- At k = 1 with renormalize the weight is exactly 1, so the gate trains through the balance loss
  only (as in LibMoE).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from hyperrouter.routers.base import (
    LogitRouter,
    Routing,
    RoutingContext,
    check_option,
    register_router,
    select_experts,
)
from hyperrouter.routers.linear import LinearRouter
from hyperrouter.routers.losses import at_least_fp32, router_z_loss


def libmoe_balance_loss(
    logits_TE: Tensor, first_T: Tensor, sequence_ids_T: Tensor | None = None
) -> Tensor:
    """LibMoE's `balanceloss`: E * mean over sequences of sum_i f_i P_i, with P_i the sequence's
    mean softmax probability of expert i and f_i the fraction of its tokens whose first choice
    (`first_T`) is i. Without `sequence_ids_T` the T tokens are one sequence."""
    num_experts = logits_TE.shape[-1]
    probs_TE = torch.softmax(at_least_fp32(logits_TE), dim=-1)
    first_TE = F.one_hot(first_T, num_experts).to(probs_TE.dtype)
    if sequence_ids_T is None:
        return num_experts * torch.dot(first_TE.mean(0), probs_TE.mean(0))
    _, seq_T = torch.unique(sequence_ids_T, return_inverse=True)
    # [S, T] membership / length: per-sequence means as one deterministic matmul
    member_ST = F.one_hot(seq_T, int(seq_T.max()) + 1).t().to(probs_TE.dtype)
    member_ST = member_ST / member_ST.sum(1, keepdim=True)
    density_SE = member_ST @ first_TE
    mean_prob_SE = member_ST @ probs_TE
    return num_experts * (density_SE * mean_prob_SE).sum(1).mean()


def best_first(logits_TE: Tensor, ids_TK: Tensor, weights_TK: Tensor) -> tuple[Tensor, Tensor]:
    """The slots reordered by logit, best expert first (LibMoE's sorted top-k)."""
    order_TK = logits_TE.detach().gather(1, ids_TK).argsort(dim=1, descending=True, stable=True)
    return ids_TK.gather(1, order_TK), weights_TK.gather(1, order_TK)


def libmoe_routing(
    router: LogitRouter, logits_TE: Tensor, ctx: RoutingContext, softmax_of_weights: bool = False
) -> Routing:
    """Top-k under the router's score, best slot first, with LibMoE's balance loss (weighted by
    `router.balance_loss_weight`) and the shared z-loss; `softmax_of_weights` applies a softmax
    over the k chosen weights (LibMoE's cosine routers)."""
    ids_TK, weights_TK = select_experts(logits_TE, ctx.top_k, router.score, router.renormalize)
    ids_TK, weights_TK = best_first(logits_TE, ids_TK, weights_TK)
    if softmax_of_weights:
        weights_TK = torch.softmax(weights_TK, dim=-1)
    losses: dict[str, Tensor] = {}
    if router.balance_loss_weight > 0 and ids_TK.numel() > 0:
        losses["balance_loss"] = router.balance_loss_weight * libmoe_balance_loss(
            logits_TE, ids_TK[:, 0], ctx.sequence_ids
        )
    if router.z_loss_weight > 0 and logits_TE.numel() > 0:
        losses["z_loss"] = router.z_loss_weight * router_z_loss(logits_TE)
    return Routing(ids_TK, weights_TK, logits_TE, losses)


@register_router("sigmoid")
class SigmoidRouter(LinearRouter):
    """Top-k of sigmoid(x W), weights renormalised over the k, LibMoE's balance loss (0.01)."""

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        *,
        renormalize: bool = True,
        balance_loss_weight: float = 0.01,
        z_loss_weight: float = 0.0,
        bias: bool = False,
        init_std: float = 0.02,
    ) -> None:
        check_option("renormalize", renormalize, isinstance(renormalize, bool), "True or False")
        check_option("bias", bias, isinstance(bias, bool), "True or False")
        check_option(
            "init_std",
            init_std,
            isinstance(init_std, (int, float)) and not isinstance(init_std, bool) and init_std > 0,
            "a number > 0",
        )
        super().__init__(
            d_model,
            num_experts,
            bias=bias,
            init_std=init_std,
            score="sigmoid",
            renormalize=renormalize,
            balance_loss_weight=balance_loss_weight,
            z_loss_weight=z_loss_weight,
        )

    def forward(self, x_TD: Tensor, ctx: RoutingContext | int) -> Routing:
        ctx = self.context(ctx)
        return libmoe_routing(self, self.scores(x_TD, ctx), ctx)
