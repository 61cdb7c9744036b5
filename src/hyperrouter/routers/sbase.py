"""S-BASE: a linear router whose training-time choice is balanced by Sinkhorn normalisation.

Clark, de las Casas, Guy, Mensch et al.: "Unified Scaling Laws for Routed Language Models",
ICML 2022, arXiv 2202.01169 (S-BASE, "Sinkhorn-BASE"); the balanced assignment it approximates is
BASE layers (Lewis et al. 2021, arXiv 2103.16716, router `base`).

Logits l = x W_r [T, E]. In training, under no_grad, the Sinkhorn iteration rescales exp(l / tau)
into a plan P with row sums 1/T and column sums 1/E (every expert gets the same mass):

    P_te = exp(c_te + a_t + b_e),   c = l / tau,
    a_t = -log T - logsumexp_e(c_te + b_e),   b_e = -log E - logsumexp_t(c_te + a_t),

repeated (rows, then columns) until the largest row-marginal error max_t |T sum_e P_te - 1| is
<= `tol` or `max_iters` iterations ran. Each token's experts are the top k of its row of P, i.e.
the top k of c_te + b_e: Sinkhorn finds the per-expert offsets b that balance the soft assignment.
The temperature tau (1 in Megatron) trades exactness for speed: as tau -> 0 the plan tends to
BASE's exact balanced assignment (equal counts), at the cost of more iterations.
The combine weights come from the router's own scores at those experts: sigmoid(l) at k = 1 and
softmax(l) over all E, gathered, at k > 1 (`renormalize` divides those by their sum). In
evaluation the experts are the plain top k of l, with the same weights. There is no balance
loss: balance comes from the assignment (the optional router z-loss, off by default, only keeps
the logits small).

Options (defaults): tol 1e-4 and max_iters 100 (Megatron's tolerance; see below; logits spread
like N(0, 1) converge in ~5-30 iterations), temperature 1.0 (Megatron), bias False and
init_std 0.02 (Linear(d_model, E) without bias, as Megatron's router, initialised like the rest
of the model), renormalize False, z_loss_weight 0 (ST-MoE's router z-loss, shared with every
logit router).

Differences from the paper / reference code, and why:
- Clark et al.'s own S-BASE code is not public; this follows Megatron-Core's
  `sinkhorn_load_balancing` (training: top k of sinkhorn(logits) under no_grad, weights
  act(logits) gathered, act = sigmoid at k = 1 and softmax at k > 1; evaluation: top k of
  act(logits)). Clark et al.'s iteration count, temperature and gate activation are unverified
  here (the paper's S-BASE is believed to be top-1, with Sinkhorn in training only).
- The iteration runs in the log domain in fp32 (fp64 for fp64 inputs), so large logits cannot
  overflow exp(); Megatron multiplies exp(logits) directly.
- The stopping rule is the row-marginal error (scale-free) with an iteration cap, where Megatron
  stops when mean |d1_new - d1_old| < 1e-4 with no cap; with a cap, strongly skewed logits can
  stop before the plan is balanced to `tol` (`last_sinkhorn` records iterations and error).
- A balanced soft assignment does not make the top-k counts exactly equal: at tau = 1 the counts
  scatter around T k / E (a few percent at T / E = 256 on skewed logits, where plain top k sends
  most tokens to one expert); near-uniform logits (a fresh router) give near-random counts. Only
  a small tau with enough iterations approaches BASE's exact T k / E.
- Not causal in training: a token's expert depends on the other tokens of the call (as in BASE
  and expert choice); evaluation is per token and deterministic.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from hyperrouter.routers.base import (
    Router,
    Routing,
    RoutingContext,
    check_option,
    init_linear_,
    register_router,
)
from hyperrouter.routers.losses import at_least_fp32, router_z_loss


@torch.no_grad()
def sinkhorn_expert_bias(
    logits_TE: Tensor, tol: float = 1e-4, max_iters: int = 100
) -> tuple[Tensor, int, float]:
    """Per-expert log offsets b [E] of the Sinkhorn plan of exp(logits), iterations, final error.

    The plan P_te = exp(l_te + a_t + b_e) has column sums exactly 1/E and row sums within `tol`
    (relative, max over rows) of 1/T once converged; the top k of P's row t are the top k of
    l_t + b. The error is max_t |T sum_e P_te - 1| after the last column normalisation.
    """
    logits_TE = at_least_fp32(logits_TE.detach())
    num_tokens, num_experts = logits_TE.shape
    b_E = logits_TE.new_zeros(num_experts)
    if num_tokens == 0:
        return b_E, 0, 0.0
    log_t, log_e = math.log(num_tokens), math.log(num_experts)
    row_lse_T = torch.logsumexp(logits_TE, dim=1)
    error, iters = float("inf"), 0
    while iters < max_iters:
        iters += 1
        a_T = -log_t - row_lse_T
        b_E = -log_e - torch.logsumexp(logits_TE + a_T[:, None], dim=0)
        row_lse_T = torch.logsumexp(logits_TE + b_E, dim=1)
        error = float(torch.expm1(row_lse_T + a_T + log_t).abs().max())
        if error <= tol:
            break
    return b_E, iters, error


def sinkhorn_plan(logits_TE: Tensor, tol: float = 1e-4, max_iters: int = 100) -> Tensor:
    """The balanced plan P [T, E] (rows sum to 1/T, columns to 1/E), computed without gradient."""
    logits_TE = at_least_fp32(logits_TE.detach())
    b_E, _, _ = sinkhorn_expert_bias(logits_TE, tol, max_iters)
    shifted = logits_TE + b_E
    return torch.exp(shifted - torch.logsumexp(shifted, dim=1, keepdim=True)) / max(
        logits_TE.shape[0], 1
    )


@register_router("sbase")
class SBaseRouter(Router):
    """S-BASE: Sinkhorn-balanced top k in training, plain top k in eval, no auxiliary loss."""

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        *,
        tol: float = 1e-4,
        max_iters: int = 100,
        temperature: float = 1.0,
        renormalize: bool = False,
        z_loss_weight: float = 0.0,
        bias: bool = False,
        init_std: float = 0.02,
    ) -> None:
        super().__init__(d_model, num_experts)
        check_option(
            "tol",
            tol,
            isinstance(tol, (int, float)) and not isinstance(tol, bool) and tol > 0,
            "a number > 0",
        )
        check_option(
            "max_iters",
            max_iters,
            isinstance(max_iters, int) and not isinstance(max_iters, bool) and max_iters >= 1,
            "an integer >= 1",
        )
        check_option(
            "temperature",
            temperature,
            isinstance(temperature, (int, float))
            and not isinstance(temperature, bool)
            and temperature > 0,
            "a number > 0",
        )
        check_option(
            "z_loss_weight",
            z_loss_weight,
            isinstance(z_loss_weight, (int, float))
            and not isinstance(z_loss_weight, bool)
            and z_loss_weight >= 0,
            "a number >= 0",
        )
        check_option(
            "init_std",
            init_std,
            isinstance(init_std, (int, float)) and not isinstance(init_std, bool) and init_std > 0,
            "a number > 0",
        )
        self.tol = float(tol)
        self.max_iters = max_iters
        self.temperature = float(temperature)
        self.renormalize = bool(renormalize)
        self.z_loss_weight = float(z_loss_weight)
        self.gate = nn.Linear(d_model, num_experts, bias=bool(bias))
        init_linear_(self.gate, init_std)
        self.last_sinkhorn: tuple[int, float] | None = None  # (iterations, error) of the last call

    def compute_logits(self, x_TD: Tensor) -> Tensor:
        """Router logits [T, E] in fp32 (fp64 for fp64 inputs), even under autocast."""
        x_TD = at_least_fp32(x_TD)
        bias = None if self.gate.bias is None else self.gate.bias.to(x_TD.dtype)
        with torch.autocast(x_TD.device.type, enabled=False):
            return F.linear(x_TD, self.gate.weight.to(x_TD.dtype), bias)

    def forward(self, x_TD: Tensor, ctx: RoutingContext | int) -> Routing:
        ctx = self.context(ctx)
        logits_TE = self.compute_logits(x_TD)
        choice_TE = logits_TE.detach()
        if ctx.training and logits_TE.shape[0] > 0:
            cost_TE = choice_TE / self.temperature
            b_E, iters, error = sinkhorn_expert_bias(cost_TE, self.tol, self.max_iters)
            self.last_sinkhorn = (iters, error)
            choice_TE = cost_TE + b_E
        ids_TK = torch.topk(choice_TE, ctx.top_k, dim=-1).indices
        if ctx.top_k == 1:
            weights_TK = torch.sigmoid(logits_TE.gather(1, ids_TK))
        else:
            weights_TK = torch.softmax(logits_TE, dim=-1).gather(1, ids_TK)
            if self.renormalize:
                weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True).clamp_min(1e-20)
        aux = {}
        if self.z_loss_weight > 0 and logits_TE.shape[0] > 0:
            aux["z_loss"] = self.z_loss_weight * router_z_loss(logits_TE)
        return Routing(ids_TK, weights_TK, logits_TE, aux)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, tol={self.tol}, max_iters={self.max_iters}, "
            f"temperature={self.temperature}, renormalize={self.renormalize}"
        )
