"""LibMoE's cosine router and the perturbed cosine router.

`cosine`: the cosine router as LibMoE implements it (Nguyen et al. 2024, "LibMoE: A Library for
comprehensive benchmarking Mixture of Experts in Large Language Models", arXiv 2411.00918;
github.com/Fsoft-AIC/LibMoE, `moe_model/model/moe/smoe_cosinegating.py`, whose forward is that of
LibMoE's own X-MoE, `moe_model/model/moe/xmoe.py`). It is X-MoE's router (Chi et al. 2022,
arXiv 2204.09179; our `xmoe`) with LibMoE's settings, so it subclasses `XMoERouter`:

    h = W_red x                              (W_red: d_model -> low_dim = E // 2, no bias)
    l_i = expert_norm * cos(h, e_i) / tau    (expert_norm 1.5, tau 0.3 fixed)
    p = softmax(l); experts: the top k of p; weights: softmax over the k chosen p_i

`perturbed_cosine`: Nguyen, Akbarian, Pham, Nguyen, Zhang, Ho 2024 (ICLR 2025), "Statistical
Advantages of Perturbing Cosine Router in Mixture of Experts", arXiv 2405.14131: a noise added to
both L2 norms of the cosine removes the parameter interaction that makes the plain cosine router's
estimation rates as slow as 1 / log(n):

    l_i = expert_norm * h^T e_i / ((|h| + noise) (|e_i| + noise)) / tau      (noise 0.1)

(the paper's tau_1 on the expert norm and tau_2 on the token norm, one value here as in LibMoE,
`moe_model/model/moe/smoe_perturbed.py` and the language-model layer
`moeut_training_code/layers/moe_layer_perturbed.py`, theta = 0.1). Unlike the cosine, the
perturbed logits depend on the norms: they shrink towards 0 for small |h| or |e_i|.

Both use LibMoE's balance loss (first choices, per sequence; `sigmoid.libmoe_balance_loss`) on
p = softmax(l), and the shared router z-loss on l.

Options (defaults, LibMoE's): low_dim None (= max(1, E // 2)), temperature 0.3, learn_temperature
False, expert_norm 1.5, combine_weights 'softmax_of_probs' (or 'probs': the p_i themselves, the
X-MoE paper's; 'renormalized': p_i / sum of the chosen p_j), init_std 0.02, balance_loss_weight
0.01, z_loss_weight 0.0; perturbed_cosine adds noise 0.1 (> 0, < expert_norm).

Differences from LibMoE, and why:
- LibMoE rescales its expert embeddings in place to norm 1.5 under no_grad at every call
  (perturbed: to 1.5 e / (|e| + 0.1), which converges to norm 1.4) and normalises only the
  token side in its `_cosine`. The logits are the same as ours (1.5 cos; 1.5 h^T e /
  ((|h| + 0.1)(|e| + 0.1)) for the stored e), but we compute them in the graph and mutate
  nothing: the expert-side gradient is projected on the sphere instead of being a step then a
  retraction, and evaluation or gradient accumulation cannot move the parameters. For the
  perturbed router the embeddings' norms are therefore trained, as the paper's beta_1i; they
  start at LibMoE's fixed point expert_norm - noise (1.4), so the first logits are LibMoE's
  steady-state ones.
- The token-side normalisation of `cosine` uses LibMoE's eps 1e-4; W_red is initialised
  N(0, init_std) like the project's other routers (LibMoE leaves nn.Linear's default); the
  expert embeddings as `xmoe` (orthogonal, gain 0.32; LibMoE draws N(0, 0.02): only their
  direction matters for `cosine`).
- The weights are a softmax over the chosen experts' *probabilities* (LibMoE's `_keepTopk`
  applies a softmax to softmax scores), so they stay close to uniform; `combine_weights` offers
  the usual alternatives.
- LibMoE's z-loss (coefficient 0.001 in its scripts, 0 in `train.py`) is on 1.5 cos before the
  temperature; ours is the shared z-loss on the routing logits l, off by default (this project's
  rule for z-losses). LibMoE computes its auxiliary losses in training only; we in every call.
- LibMoE v1.1 (December 2024, `moe_model/model/moe/moe_cosinegating.py` / `moe_perturbed.py`)
  had other routers under these names: the cosine between x and the rows of a full Linear(d, E)
  gate, no projection and no temperature, and the gate bias added to the softmax probabilities
  before the top-k. We follow the later code (v2, 2025), which matches the two papers' routers
  (X-MoE's projection and temperature) and, in the logits, LibMoE's language-model layer; that
  layer (MoEUT-based) weights differently: its selection activation (sigmoid by default) on the
  probabilities, then the k chosen values renormalised to sum 1.
- Slots are in score order (slot 0 is the best expert), as LibMoE's sorted top-k.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F

from hyperrouter.routers.base import Routing, RoutingContext, check_option, register_router
from hyperrouter.routers.losses import at_least_fp32
from hyperrouter.routers.sigmoid import libmoe_routing
from hyperrouter.routers.xmoe import XMoERouter

COMBINE_WEIGHTS = ("softmax_of_probs", "probs", "renormalized")
TOKEN_EPS = 1e-4  # LibMoE's F.normalize eps on the token side


@register_router("cosine")
class CosineRouter(XMoERouter):
    """X-MoE's cosine router with LibMoE's settings: low_dim E // 2, fixed tau 0.3, scale 1.5,
    weights = softmax over the chosen experts' probabilities, LibMoE's balance loss."""

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        *,
        low_dim: int | None = None,
        temperature: float = 0.3,
        learn_temperature: bool = False,
        expert_norm: float = 1.5,
        combine_weights: str = "softmax_of_probs",
        init_std: float = 0.02,
        balance_loss_weight: float = 0.01,
        z_loss_weight: float = 0.0,
    ) -> None:
        check_option(
            "expert_norm",
            expert_norm,
            isinstance(expert_norm, (int, float))
            and not isinstance(expert_norm, bool)
            and math.isfinite(expert_norm)
            and expert_norm > 0,
            "a finite number > 0",
        )
        check_option(
            "combine_weights",
            combine_weights,
            combine_weights in COMBINE_WEIGHTS,
            f"one of {', '.join(map(repr, COMBINE_WEIGHTS))}",
        )
        check_option(
            "learn_temperature",
            learn_temperature,
            isinstance(learn_temperature, bool),
            "True or False",
        )
        super().__init__(
            d_model,
            num_experts,
            low_dim=max(1, num_experts // 2) if low_dim is None else low_dim,
            temperature=temperature,
            learn_temperature=learn_temperature,
            init_std=init_std,
            score="softmax_topk",
            renormalize=combine_weights == "renormalized",
            balance_loss_weight=balance_loss_weight,
            z_loss_weight=z_loss_weight,
        )
        self.expert_norm = float(expert_norm)
        self.combine_weights = combine_weights

    def unit_tokens(self, h_TL: Tensor) -> Tensor:
        """The token side of the cosine: h / max(|h|, eps)."""
        return F.normalize(h_TL, dim=-1, eps=TOKEN_EPS)

    def unit_experts(self, e_EL: Tensor) -> Tensor:
        """The expert side of the cosine: e / |e|."""
        return F.normalize(e_EL, dim=-1)

    def compute_logits(self, x_TD: Tensor) -> Tensor:
        x_TD = at_least_fp32(x_TD)
        dtype = x_TD.dtype
        with torch.autocast(x_TD.device.type, enabled=False):  # fp32 even under autocast
            tokens_TL = self.unit_tokens(F.linear(x_TD, self.reduction.weight.to(dtype)))
            experts_EL = self.unit_experts(self.expert_embeddings.to(dtype))
            scale = self.expert_norm / self.temperature.to(dtype)
            return (tokens_TL @ experts_EL.t()) * scale

    def forward(self, x_TD: Tensor, ctx: RoutingContext | int) -> Routing:
        ctx = self.context(ctx)
        softmax_of_probs = self.combine_weights == "softmax_of_probs"
        return libmoe_routing(self, self.scores(x_TD, ctx), ctx, softmax_of_probs)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, expert_norm={self.expert_norm}"


@register_router("perturbed_cosine")
class PerturbedCosineRouter(CosineRouter):
    """The cosine router with `noise` added to both norms of the cosine (Nguyen et al. 2024)."""

    def __init__(self, d_model: int, num_experts: int, *, noise: float = 0.1, **options) -> None:
        super().__init__(d_model, num_experts, **options)
        check_option(
            "noise",
            noise,
            isinstance(noise, (int, float))
            and not isinstance(noise, bool)
            and 0 < noise < self.expert_norm,
            f"a number in (0, expert_norm = {self.expert_norm})",
        )
        self.noise = float(noise)
        with torch.no_grad():  # LibMoE's fixed point: its in-place rescale converges to this norm
            self.expert_embeddings.mul_(
                (self.expert_norm - self.noise)
                / self.expert_embeddings.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            )

    def unit_tokens(self, h_TL: Tensor) -> Tensor:
        return h_TL / (h_TL.norm(dim=-1, keepdim=True) + self.noise)

    def unit_experts(self, e_EL: Tensor) -> Tensor:
        return e_EL / (e_EL.norm(dim=-1, keepdim=True) + self.noise)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, noise={self.noise}"
