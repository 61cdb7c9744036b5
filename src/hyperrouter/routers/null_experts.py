"""AdaMoE: token-adaptive routing with null experts.

Zeng, Miao, Gao, Zhang, Deng: "AdaMoE: Token-Adaptive Routing with Null Experts for
Mixture-of-Experts Language Models", Findings of EMNLP 2024, arXiv 2406.13233; reference code
github.com/CengZihao/AdaMoE (exp_1: MoLA/Llama-2 LoRA experts, `mola_lora_hacked.py` and
`mola_modeling_llama_hacked.py`; exp_2: Mixtral, `adaptive_moe_utils.py` and `loader.py`).

The gate scores the E real experts and N null experts (experts whose output is 0 and which cost
no compute); every token takes its top k of the E + N (k = the call's `top_k`, the number of
slots), so it computes between 0 and k real experts, the rest of its slots going to null experts:

    p = softmax(W x)                      over the E + N choices
    S = top-k of p,  R = S ∩ {real experts}
    y = sum_{i in R} p_i / (sum_{j in R} p_j) * E_i(x)      (0 when R is empty)

i.e. the combine weights are renormalised over the selected real experts (both reference
experiments do this; the weights a null slot would get are not used), computed as a softmax over
the chosen real experts' logits (equal, and a single real expert then weighs exactly 1).
A slot on a null expert is `keep` False with a placeholder real id (the null index mod E), so
it costs nothing in every backend and `tokens_per_expert` counts only real experts.

Balance loss (the null experts' loads averaged as one group, exp_1's `load_balancing_loss_func`):
with f_i the share of the T k slots of this call that chose choice i, and P_i the mean of p_i
over the T tokens,

    balance_loss = w (E + N) sum_i f~_i P_i,   f~_i = f_i for a real expert,
                                                f~_i = (1/N) sum_{null j} f_j for a null one.

The null experts are interchangeable, so only their total use matters; averaging their loads
keeps the loss from balancing the null experts against each other while it still drives the
real-versus-null split toward (E : N). With N = 0 this is the Switch loss (minimum 1).

Statistics (`Routing.stats`, detached): `null_share`, the share of the T k slots that chose a
null expert, and `real_experts_per_token`, the mean number of real experts a token chose (before
any capacity limit of the layer, which `RoutingStats.mean_k` then reports).

`Routing.logits` is [T, E]: the gate's logits of the real experts (their softmax is the router's
distribution over the real experts given that a real one is chosen).

Options (defaults): null_experts N = 16 (exp_2's Mixtral setting: 8 real experts, k raised from
2 to 4; must be an integer >= 0, 0 = plain top-k with weights renormalised over the k),
balance_loss_weight w = 1e-3 (exp_1's coefficient, for the loss normalised as above; 0 = off),
bias False (the reference gates have none), init_std 0.02.

Differences from the paper / reference code, and why:
- One gate Linear(d, E + N) trained from scratch. exp_2 fine-tunes Mixtral and adds a second
  gate for the null experts, initialised by repeating the pretrained gate's rows; there is no
  pretrained gate here.
- f is the share of the T k slots (exp_1's normalisation and the project's Switch convention).
  exp_2 uses HuggingFace's Mixtral loss, which sums over the k slot positions (k times larger),
  with weight 1e-4; its null-averaging line indexes the slot axis instead of the expert axis,
  so there the null experts are in fact balanced one by one. We follow exp_1 and the paper's
  description (null loads averaged).
- The loss counts the router's choices, before any capacity limit of the layer (the reference
  has no capacity limit).
- The slots are sorted by score (so a layer capacity limit serves first choices first); the
  reference's order (torch.topk's, sorted) is the same.
- No router jitter noise (Mixtral's `router_jitter_noise`, 0 in its default config) and no
  z-loss. Router math in fp32.
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


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def null_expert_balance_loss(probs_TC: Tensor, choice_TK: Tensor, num_experts: int) -> Tensor:
    """AdaMoE's balance loss (E + N) sum_i f~_i P_i (unweighted), with the loads f of the null
    choices (indices >= num_experts) replaced by their mean; see the module docstring."""
    num_choices = probs_TC.shape[-1]
    num_null = num_choices - num_experts
    counts_C = torch.bincount(choice_TK.reshape(-1), minlength=num_choices).to(probs_TC.dtype)
    load_C = counts_C / max(choice_TK.numel(), 1)
    if num_null > 0:
        null_load = load_C[num_experts:].mean().expand(num_null)
        load_C = torch.cat([load_C[:num_experts], null_load])
    return num_choices * torch.dot(load_C, probs_TC.mean(dim=0))


def renormalised_over_real(logits_TK: Tensor, real_TK: Tensor) -> Tensor:
    """p_i / sum_{j real} p_j on the real slots, 0 on the others (and on every slot of a token
    without a real one). Computed as a softmax over the real slots' logits, which equals it and
    makes a token's single real slot weigh exactly 1 with an exactly-zero gradient (the ratio
    p / p would leave rounding residue there)."""
    any_real_T1 = real_TK.any(-1, keepdim=True)
    masked_TK = torch.where(real_TK, logits_TK, float("-inf"))
    masked_TK = torch.where(any_real_T1, masked_TK, torch.zeros_like(masked_TK))  # no NaN row
    return torch.softmax(masked_TK, dim=-1) * real_TK


@register_router("adamoe")
class AdaMoERouter(Router):
    """AdaMoE: top-k over E real + N null experts; a null slot costs no compute."""

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        *,
        null_experts: int = 16,
        balance_loss_weight: float = 1e-3,
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
        check_option(
            "null_experts",
            null_experts,
            _is_int(null_experts) and null_experts >= 0,
            "an integer >= 0",
        )
        check_option(
            "balance_loss_weight",
            balance_loss_weight,
            _is_number(balance_loss_weight) and balance_loss_weight >= 0,
            "a number >= 0",
        )
        check_option("bias", bias, isinstance(bias, bool), "True or False")
        check_option("init_std", init_std, _is_number(init_std) and init_std > 0, "a number > 0")
        self.null_experts = null_experts
        self.balance_loss_weight = float(balance_loss_weight)
        self.gate = nn.Linear(d_model, num_experts + null_experts, bias=bias)
        init_linear_(self.gate, init_std)

    def forward(self, x_TD: Tensor, ctx: RoutingContext | int) -> Routing:
        ctx = self.context(ctx)
        num_experts = self.num_experts
        logits_TC = fp32_linear(self.gate, x_TD)  # C = E + N choices
        probs_TC = torch.softmax(logits_TC, dim=-1)
        top_k = min(ctx.top_k, logits_TC.shape[-1])
        choice_TK = torch.topk(logits_TC.detach(), top_k, dim=-1, sorted=True).indices
        real_TK = choice_TK < num_experts
        weights_TK = renormalised_over_real(logits_TC.gather(1, choice_TK), real_TK)
        ids_TK = torch.remainder(choice_TK, num_experts)

        num_tokens = x_TD.shape[0]
        aux: dict[str, Tensor] = {}
        if self.balance_loss_weight > 0 and num_tokens > 0:
            aux["balance_loss"] = self.balance_loss_weight * null_expert_balance_loss(
                probs_TC, choice_TK, num_experts
            )
        if self.z_loss_weight > 0 and num_tokens > 0:  # over every choice's logit
            aux["z_loss"] = self.z_loss_weight * router_z_loss(logits_TC)
        with torch.no_grad():
            real = real_TK.sum().to(torch.float32)
            null = (~real_TK).sum().to(torch.float32)
            stats = {
                "null_share": null / max(choice_TK.numel(), 1),
                "real_experts_per_token": real / max(num_tokens, 1),
            }
        return Routing(
            ids_TK, weights_TK, logits_TC[:, :num_experts], aux, keep=real_TK, stats=stats
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, null_experts={self.null_experts}"
