"""Top-p (dynamic) routing: each token takes the fewest experts whose probability reaches p.

Huang, An, Zhuang, Tao, Zhang, Jin, Xu, Xu, Chen, Huang, Feng: "Harder Tasks Need More Experts:
Dynamic Routing in MoE Models", ACL 2024, arXiv 2403.07652 (reference code
github:ZhenweiAn/Dynamic_MoE, `modeling/modeling_moe.py`, inference only).

    P = softmax(W_r x) over all E experts, sorted decreasingly: P_(1) >= P_(2) >= ...
    t = min { m : P_(1) + ... + P_(m) >= p }          (the first expert is always kept)
    MoE(x) = sum_{j <= t} P_(j) e_(j)(x)              (weights: the kept P, not renormalised)

    L = L_task + alpha * L_b + beta * L_d
    L_d = mean_tokens( -sum_i P_i log P_i )           (dynamic loss: entropy of P, minimised)
    L_b = E * sum_i f_i Q_i,  f_i = (tokens that keep expert i) / T,  Q_i = mean_tokens P_i

Minimising the entropy makes the router confident, so that fewer experts reach p; without it
the router can spread P evenly and buy performance with compute (uniform P at p = 0.5 keeps half
the experts). As slots the router returns the top k_max = ctx.top_k experts by P (sorted) and a
keep mask of the prefix that reaches p; only kept pairs are computed. The keep rule is
`hyperrouter.moe.policies.TopP`'s (the same test, before-mass < p). Routing.stats["mean_k"]:
experts kept per token (before any capacity limit).

Options (defaults, the paper's experimental setup unless said): p = 0.4 (the paper's threshold,
also the reference config's `top_p_threshold`), balance_loss_weight alpha = 1e-2,
dynamic_loss_weight beta = 1e-4, renormalize False (the paper's weights P; True divides the
kept P by their sum, so that each token's weights sum to 1), z_loss_weight 0, bias False (the
reference gate `Linear(hidden, E, bias=False)`), init_std 0.02 (the reference's
initializer_range).

Differences from the paper / reference code, and why:
- k_max = ctx.top_k caps the kept experts (the paper and the reference have no cap; train with
  top_k = E to match them; a smaller k is a compute cap at inference).
- Ties: the paper's rule (cumulative >= p) is used; the reference code keeps one more expert when
  a prefix sums to exactly p (its test is cumulative > p). Measure-zero in practice.
- The reference code has no training losses (inference only); L_d and L_b follow the paper's
  formulas, with f_i over the experts each token keeps (before the layer's capacity limit) and
  both averaged over the call's tokens.
- Router math in fp32 (as every router: under autocast the layer runs routers in fp32).
"""

from __future__ import annotations

import torch
from torch import Tensor

from hyperrouter.moe.policies import TopP
from hyperrouter.routers.base import Routing, RoutingContext, check_option, register_router
from hyperrouter.routers.linear import LinearRouter
from hyperrouter.routers.losses import at_least_fp32, router_z_loss


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def entropy_loss(logits_TE: Tensor) -> Tensor:
    """Mean over tokens of the entropy (nats) of softmax(logits): the paper's dynamic loss L_d."""
    log_p_TE = torch.log_softmax(at_least_fp32(logits_TE), dim=-1)
    return -(log_p_TE.exp() * log_p_TE).sum(-1).mean()


def top_p_balance_loss(probs_TE: Tensor, ids_TK: Tensor, keep_TK: Tensor) -> Tensor:
    """The paper's L_b = E * sum_i f_i Q_i with f_i = (tokens keeping expert i) / T and Q_i the
    mean probability of expert i; at balance it equals the mean number of kept experts."""
    num_tokens, num_experts = probs_TE.shape
    counts_E = torch.bincount(ids_TK[keep_TK], minlength=num_experts).to(probs_TE.dtype)
    return num_experts * torch.dot(counts_E / num_tokens, probs_TE.mean(0))


@register_router("top_p")
class TopPRouter(LinearRouter):
    """Linear gate, softmax over all E, the fewest experts whose probability reaches `p`."""

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        *,
        p: float = 0.4,
        renormalize: bool = False,
        balance_loss_weight: float = 1e-2,
        dynamic_loss_weight: float = 1e-4,
        z_loss_weight: float = 0.0,
        bias: bool = False,
        init_std: float = 0.02,
    ) -> None:
        check_option("p", p, _is_number(p) and 0.0 < p <= 1.0, "a number in (0, 1]")
        check_option(
            "dynamic_loss_weight",
            dynamic_loss_weight,
            _is_number(dynamic_loss_weight) and dynamic_loss_weight >= 0,
            "a number >= 0",
        )
        super().__init__(
            d_model,
            num_experts,
            bias=bias,
            init_std=init_std,
            score="softmax_topk",
            renormalize=renormalize,
            balance_loss_weight=balance_loss_weight,
            z_loss_weight=z_loss_weight,
        )
        self.p = float(p)
        self.dynamic_loss_weight = float(dynamic_loss_weight)
        self.policy = TopP(p=self.p)

    def forward(self, x_TD: Tensor, ctx: RoutingContext | int) -> Routing:
        ctx = self.context(ctx)
        logits_TE = at_least_fp32(self.scores(x_TD, ctx))
        probs_TE = torch.softmax(logits_TE, dim=-1)
        k_max = min(ctx.top_k, self.num_experts)
        ids_TK = torch.topk(probs_TE.detach(), k_max, dim=-1, sorted=True).indices
        probs_TK = probs_TE.gather(1, ids_TK)
        with torch.no_grad():
            keep_TK = self.policy.keep(logits_TE.detach(), ids_TK, probs_TK.detach())
        weights_TK = torch.where(keep_TK, probs_TK, 0.0)
        if self.renormalize:
            weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True).clamp_min(1e-20)
        num_tokens = x_TD.shape[0]
        losses: dict[str, Tensor] = {}
        if num_tokens > 0:
            if self.balance_loss_weight > 0:
                losses["balance_loss"] = self.balance_loss_weight * top_p_balance_loss(
                    probs_TE, ids_TK, keep_TK
                )
            if self.dynamic_loss_weight > 0:
                losses["dynamic_loss"] = self.dynamic_loss_weight * entropy_loss(logits_TE)
            if self.z_loss_weight > 0:
                losses["z_loss"] = self.z_loss_weight * router_z_loss(logits_TE)
        mean_k = keep_TK.sum() / num_tokens if num_tokens else keep_TK.new_zeros(())
        stats = {"mean_k": mean_k.float().detach()}
        return Routing(ids_TK, weights_TK, logits_TE, losses, keep=keep_TK, stats=stats)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p={self.p}"
