"""TC-MoE: ternary expert choice, each expert offered with the multipliers {+1, -1, 0}.

Yan, Bin, Zhang, Wang, Lin: "TC-MoE: Augmenting Mixture of Experts with Ternary Expert Choice",
ICLR 2025 (OpenReview; no arXiv version found; PDF at
zhouchenlin.github.io/Publications/2025-ICLR-TC-MoE.pdf). Reference code
github.com/stiger1000/TC-MoE (`TC-MoE/modeling_tcmoe.py`, the released model's inference code;
its model card gives the training losses' weights); a reimplementation with the losses in
github.com/Fsoft-AIC/LibMoE (`language_modeling/layers/moe_layer_tc_moe.py`).

The gate scores 3E choices: "+E_i", "-E_i" and "0 E_i" for every expert i, with fixed offsets
added to the logits of the -1 and 0 choices (the released code's -1 and -10, so at the start a
token prefers +1 choices and almost never a 0 one):

    l = W x + [0]*E ++ [minus_logit_offset]*E ++ [zero_logit_offset]*E,   p = softmax(l) (3E)
    S = top-k of p;  C = the chosen +1/-1 choices (computed), Z = all E zero choices
    w_c = p_c / (sum_{c' in C} p_c' + sum_{z in Z} p_z)          (c in S)
    y = sum_{+E_i in S} w E_i(x) - sum_{-E_i in S} w E_i(x)

The 0 choices all output 0, so their whole probability mass counts as "activated" in the
normaliser (the released code's rule): the more mass the router puts on 0, the smaller every
computed weight. (w is computed as sigmoid(l_c - logsumexp of the normaliser's other terms),
equal to the ratio, so that its gradient stays accurate in fp32 when w is close to 1, as at k = 1
with the -10 offset: `ternary_weights`.) A slot on a 0 choice is `keep` False with the
expert's id (no compute); a -1 slot gets the negative weight -w.

A token may pick the same expert with both signs (the top-k over 3E allows it, and neither the
paper's rule nor the reference forbids it; the reference then runs the expert twice). Here the
two slots are merged: the first keeps weight w+ - w- and is computed once, the second is `keep`
False, which gives the same output and gradients for one expert's compute.

Load-balance loss (over the computed choices only: +E_i and -E_i share E_i's parameters and
compute, the 0 choices cost nothing). With q_ti = (p_t,+i + p_t,-i) / sum_j (p_t,+j + p_t,-j)
the router's probability of expert i given a computed choice, P_i its mean over the T tokens,
and f_i the share of the call's computed slots whose expert is i (both signs, counted per slot
as chosen),

    balance_loss = alpha_1 * E * sum_i f_i P_i            (0 when no slot is computed)

Reward loss (rewards the 0 choices, trading quality for compute):

    reward_loss = -alpha_2 * (1/T) sum_t sum_{z in Z} p_tz

Statistics (`Routing.stats`, detached): `computed_experts_per_token` (kept pairs per token after
the merge, before a layer capacity limit), `plus_share`, `minus_share`, `zero_share` (shares of
the T k slots).

`Routing.logits` is [T, E]: logsumexp of each expert's +1 and -1 logits (offsets included), so
its softmax over E is q above, the probability of computing expert i given a computed choice.

Options (defaults): balance_loss_weight alpha_1 = 0.01 and reward_loss_weight alpha_2 = 0.0 (the
released model's, from its model card; > 0 lowers the experts computed per token), must be >= 0;
minus_logit_offset -1.0 and zero_logit_offset -10.0 (the released code's), finite numbers; bias
False (the reference gate has none); init_std 0.02. The paper's k is 2 (top-2 over the 3E).

Differences from the paper / reference code, and why:
- The paper's text was not reachable here: the formulas follow the released code (routing,
  offsets, normaliser) and LibMoE's reimplementation (both losses); the weights are the
  released model card's.
- One 0 choice per expert (3E logits, the paper's ternary set). The released code scores
  2E + num_null_experts logits, its 0 choices merged into num_null_experts null logits (default
  2 = k; LibMoE uses k), which give the 0 mass the same role; with E of them here, the initial
  0 mass is E / k times the reference's (e^-10 relative to a +1 choice either way).
- -1 choices subtract: the released inference code's expert loop overwrites the -1 branch
  (`current_hidden_states` is recomputed without the -1 after the if/else), so there a -1
  choice adds +w E_i(x); we follow the paper's -w E_i(x).
- A same-expert +1/-1 pair is computed once with weight w+ - w- (see above); the reference
  computes it twice (the same output).
- balance_loss carries the factor E (Switch's, minimum 1 when balanced, so alpha_1 = 0.01 has its
  usual meaning); LibMoE's reimplementation leaves it out (E times smaller).
- The losses count the router's choices, before any capacity limit of the layer; the reward
  loss is negative by design (a reward). No z-loss; router math in fp32.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from hyperrouter.routers.base import (
    Router,
    Routing,
    RoutingContext,
    check_option,
    fp32_linear,
    init_linear_,
    register_router,
)
from hyperrouter.routers.losses import router_z_loss

PLUS, MINUS, ZERO = 0, 1, 2  # choice c of expert i is index kind * E + i


def _is_number(value: object) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def ternary_balance_loss(probs_TC: Tensor, choice_TK: Tensor, num_experts: int) -> Tensor:
    """TC-MoE's load balance E * sum_i f_i P_i (unweighted) over the computed (+1/-1) choices;
    see the module docstring. probs_TC: [T, 3E] in the order (+1, -1, 0)."""
    e = num_experts
    mass_TE = probs_TC[:, :e] + probs_TC[:, e : 2 * e]
    q_TE = mass_TE / mass_TE.sum(-1, keepdim=True).clamp_min(torch.finfo(mass_TE.dtype).tiny)
    computed = choice_TK[choice_TK < 2 * e]
    counts_E = torch.bincount(computed % e, minlength=e).to(q_TE.dtype)
    load_E = counts_E / max(computed.numel(), 1)
    return e * torch.dot(load_E, q_TE.mean(dim=0))


def zero_choice_reward(probs_TC: Tensor, num_experts: int) -> Tensor:
    """(1/T) sum_t sum_{0 choices} p_t: the mean probability mass on the 0 choices."""
    return probs_TC[:, 2 * num_experts :].sum(-1).mean()


@register_router("tc_moe")
class TCMoERouter(Router):
    """TC-MoE: top-k over the 3E choices {+E_i, -E_i, 0}; -1 gives a negative weight, 0 no
    compute."""

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        *,
        balance_loss_weight: float = 0.01,
        reward_loss_weight: float = 0.0,
        minus_logit_offset: float = -1.0,
        zero_logit_offset: float = -10.0,
        bias: bool = False,
        init_std: float = 0.02,
        z_loss_weight: float = 0.0,
    ) -> None:
        super().__init__(d_model, num_experts)
        check_option(
            "z_loss_weight", z_loss_weight, _is_number(z_loss_weight) and z_loss_weight >= 0,
            "a number >= 0",
        )  # fmt: skip
        self.z_loss_weight = float(z_loss_weight)
        for name, value in (
            ("balance_loss_weight", balance_loss_weight),
            ("reward_loss_weight", reward_loss_weight),
        ):
            check_option(name, value, _is_number(value) and value >= 0, "a number >= 0")
        for name, value in (
            ("minus_logit_offset", minus_logit_offset),
            ("zero_logit_offset", zero_logit_offset),
        ):
            check_option(name, value, _is_number(value), "a finite number")
        check_option("bias", bias, isinstance(bias, bool), "True or False")
        check_option("init_std", init_std, _is_number(init_std) and init_std > 0, "a number > 0")
        self.balance_loss_weight = float(balance_loss_weight)
        self.reward_loss_weight = float(reward_loss_weight)
        self.minus_logit_offset = float(minus_logit_offset)
        self.zero_logit_offset = float(zero_logit_offset)
        self.gate = nn.Linear(d_model, 3 * num_experts, bias=bias)
        init_linear_(self.gate, init_std)

    def choice_logits(self, x_TD: Tensor) -> Tensor:
        """[T, 3E] logits of the (+1, -1, 0) choices, offsets included, in fp32 or wider."""
        plus_TE, minus_TE, zero_TE = fp32_linear(self.gate, x_TD).split(self.num_experts, -1)
        return torch.cat(
            [plus_TE, minus_TE + self.minus_logit_offset, zero_TE + self.zero_logit_offset], -1
        )

    def forward(self, x_TD: Tensor, ctx: RoutingContext | int) -> Routing:
        ctx = self.context(ctx)
        e = self.num_experts
        logits_TC = self.choice_logits(x_TD)
        probs_TC = torch.softmax(logits_TC, dim=-1)
        top_k = min(ctx.top_k, logits_TC.shape[-1])
        choice_TK = torch.topk(logits_TC.detach(), top_k, dim=-1, sorted=True).indices
        kind_TK = torch.div(choice_TK, e, rounding_mode="floor")
        ids_TK = torch.remainder(choice_TK, e)
        computed_TK = kind_TK != ZERO

        w_TK = ternary_weights(logits_TC.gather(1, choice_TK), computed_TK, logits_TC[:, 2 * e :])
        sign_TK = torch.where(kind_TK == PLUS, 1.0, torch.where(kind_TK == MINUS, -1.0, 0.0))
        signed_TK = w_TK * sign_TK.to(w_TK.dtype)
        weights_TK, keep_TK = merge_same_expert(ids_TK, signed_TK, computed_TK)

        num_tokens = x_TD.shape[0]
        aux: dict[str, Tensor] = {}
        if num_tokens > 0:
            if self.balance_loss_weight > 0:
                aux["balance_loss"] = self.balance_loss_weight * ternary_balance_loss(
                    probs_TC, choice_TK, e
                )
            if self.reward_loss_weight > 0:
                aux["reward_loss"] = -self.reward_loss_weight * zero_choice_reward(probs_TC, e)
        if self.z_loss_weight > 0 and num_tokens > 0:  # over every choice's logit
            aux["z_loss"] = self.z_loss_weight * router_z_loss(logits_TC)
        with torch.no_grad():
            slots = max(choice_TK.numel(), 1)
            stats = {
                "computed_experts_per_token": keep_TK.sum().to(torch.float32) / max(num_tokens, 1),
                "plus_share": (kind_TK == PLUS).sum().to(torch.float32) / slots,
                "minus_share": (kind_TK == MINUS).sum().to(torch.float32) / slots,
                "zero_share": (kind_TK == ZERO).sum().to(torch.float32) / slots,
            }
        logits_TE = torch.logsumexp(torch.stack([logits_TC[:, :e], logits_TC[:, e : 2 * e]]), 0)
        return Routing(ids_TK, weights_TK, logits_TE, aux, keep=keep_TK, stats=stats)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, minus_logit_offset={self.minus_logit_offset}, "
            f"zero_logit_offset={self.zero_logit_offset}"
        )


def ternary_weights(chosen_TK: Tensor, computed_TK: Tensor, zero_TE: Tensor) -> Tensor:
    """w_j = p_j / (sum_{chosen computed} p + sum_{all 0 choices} p) on the computed slots (0 on
    the others), from the chosen slots' logits and the 0 choices' logits.

    Computed as sigmoid(l_j - logsumexp(the other terms of the sum)), which equals it: then
    dw_j/dl_j = w_j (1 - w_j) is one product. The plain ratio's gradient is a difference of two
    nearly equal terms whenever w_j is close to 1 (at k = 1 with the 0 offset of -10 it is
    1 - O(e^-10)), which fp32 gets only to a few digits."""
    num_tokens, top_k = chosen_TK.shape
    others_TKK = chosen_TK[:, None, :].expand(num_tokens, top_k, top_k)
    not_self_KK = ~torch.eye(top_k, dtype=torch.bool, device=chosen_TK.device)
    others_TKK = torch.where(computed_TK[:, None, :] & not_self_KK, others_TKK, float("-inf"))
    zeros_TKE = zero_TE[:, None, :].expand(num_tokens, top_k, zero_TE.shape[-1])
    rest_TK = torch.logsumexp(torch.cat([others_TKK, zeros_TKE], -1), -1)  # never all -inf
    return torch.sigmoid(chosen_TK - rest_TK) * computed_TK


def merge_same_expert(
    ids_TK: Tensor, signed_TK: Tensor, computed_TK: Tensor
) -> tuple[Tensor, Tensor]:
    """(weights, keep) [T, K]: a token's computed slots on the same expert (its +1 and -1
    choices) become one computed slot, the first, with the sum of their signed weights; the
    other slots of that expert and the 0 slots are dropped with weight 0."""
    top_k = ids_TK.shape[1]
    same_TKK = (ids_TK[:, :, None] == ids_TK[:, None, :]) & (
        computed_TK[:, :, None] & computed_TK[:, None, :]
    )
    merged_TK = torch.einsum("tjl,tl->tj", same_TKK.to(signed_TK.dtype), signed_TK)
    earlier_KK = torch.ones(top_k, top_k, dtype=torch.bool, device=ids_TK.device).tril(-1)
    keep_TK = computed_TK & ~(same_TKK & earlier_KK).any(-1)
    return torch.where(keep_TK, merged_TK, torch.zeros_like(merged_TK)), keep_TK
