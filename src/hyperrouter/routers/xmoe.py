"""X-MoE: cosine routing on a low-dimensional hypersphere with a learnable temperature.

Chi, Dong, Huang, Dai, Ma, Patra, Singhal, Bajaj, Song, Mao, Huang, Wei: "On the Representation
Collapse of Sparse Mixture of Experts", NeurIPS 2022, arXiv 2204.09179.

    s_i(x) = cos(W_red x, e_i) / tau = <W_red x / |W_red x|, e_i / |e_i|> / tau

with W_red: d_model -> d_low (no bias), expert embeddings e [E, d_low] and a learnable
temperature tau. Projecting to a few dimensions before scoring keeps the router from collapsing
the token representation onto the expert span; normalising both sides removes the norm from the
choice. The logits then go through the usual logit-router machinery (score function, Switch
balance loss, z-loss).

Differences from the paper / reference code, and why:
- The reference (torchscale's `Top1Gate(use_xmoe=True)`) rescales the expert embeddings in place
  to norm 1.5 under no_grad at every call, then normalises them in `_cosine` (so the 1.5 does not
  reach the logits), does not normalise the token side W_red x (that line is commented out) and
  applies no temperature: its logits are |W_red x| cos(W_red x, e_i). We follow the paper's
  formula, both sides normalised and divided by a learnable tau, because the paper states it
  and its argument (the norm must not decide the expert) needs the token side normalised too;
  the forward mutates nothing, so eval and gradient accumulation cannot drift the parameters.
- tau is stored as log(tau) (`log_temperature`), so tau = exp(log_temperature) stays positive
  whatever the optimizer does, and is floored at 0.01 (logits at most 100 in size, the bound
  Tutel's cosine gate and CLIP use) so a temperature driven towards 0 cannot overflow the
  logits; below the floor it gets no gradient. `learn_temperature=False` keeps it fixed (a
  buffer instead of a parameter).
- Default score is `softmax_topk` (softmax over all E, weights of the chosen experts), the
  Switch/GShard gating the paper builds on, and the balance loss weight is 0.01 (the GShard/Switch
  weight the X-MoE experiments use); both are every logit router's options and can be changed.
- W_red is initialised N(0, init_std) like the project's other routers (the reference uses
  nn.Linear's default); the expert embeddings orthogonal with gain 0.32 as in the reference
  (only their direction matters after normalisation).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from hyperrouter.routers.base import LogitRouter, check_option, register_router
from hyperrouter.routers.losses import at_least_fp32

MIN_TEMPERATURE = 0.01


@register_router("xmoe")
class XMoERouter(LogitRouter):
    """Cosine router in a `low_dim`-dimensional space with learnable temperature (init 0.07)."""

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        *,
        low_dim: int = 16,
        temperature: float = 0.07,
        learn_temperature: bool = True,
        init_std: float = 0.02,
        score: str = "softmax_topk",
        balance_loss_weight: float = 0.01,
        **options,
    ) -> None:
        super().__init__(
            d_model,
            num_experts,
            score=score,
            balance_loss_weight=balance_loss_weight,
            **options,
        )
        check_option(
            "low_dim",
            low_dim,
            isinstance(low_dim, int) and not isinstance(low_dim, bool) and low_dim >= 1,
            "an integer >= 1",
        )
        check_option(
            "temperature",
            temperature,
            isinstance(temperature, (int, float))
            and math.isfinite(temperature)
            and temperature >= MIN_TEMPERATURE,
            f"a number >= {MIN_TEMPERATURE}",
        )
        check_option(
            "init_std",
            init_std,
            isinstance(init_std, (int, float)) and init_std > 0,
            "a number > 0",
        )
        self.low_dim = low_dim
        self.reduction = nn.Linear(d_model, low_dim, bias=False)
        nn.init.normal_(self.reduction.weight, 0.0, init_std)
        embeddings = torch.empty(num_experts, low_dim)
        nn.init.orthogonal_(embeddings, gain=0.32)
        self.expert_embeddings = nn.Parameter(embeddings)
        log_t = torch.tensor(math.log(temperature))
        if learn_temperature:
            self.log_temperature = nn.Parameter(log_t)
        else:
            self.register_buffer("log_temperature", log_t)

    @property
    def temperature(self) -> Tensor:
        """tau = exp(log_temperature), floored at MIN_TEMPERATURE."""
        return self.log_temperature.exp().clamp_min(MIN_TEMPERATURE)

    def compute_logits(self, x_TD: Tensor) -> Tensor:
        x_TD = at_least_fp32(x_TD)
        dtype = x_TD.dtype
        with torch.autocast(x_TD.device.type, enabled=False):  # fp32 even under autocast
            tokens_TL = F.normalize(F.linear(x_TD, self.reduction.weight.to(dtype)), dim=-1)
            experts_EL = F.normalize(self.expert_embeddings.to(dtype), dim=-1)
            return (tokens_TL @ experts_EL.t()) / self.temperature.to(dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, low_dim={self.low_dim}"
