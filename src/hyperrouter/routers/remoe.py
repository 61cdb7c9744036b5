"""ReMoE: ReLU routing with an adaptive L1 regulariser that steers the sparsity to a target.

Wang, Chen, Zhu: "ReMoE: Fully Differentiable Mixture-of-Experts with ReLU Routing", ICLR 2025,
arXiv 2412.14711 (reference code github:thu-ml/ReMoE, a Megatron-LM fork:
`megatron/core/transformer/moe/router.py` `ReLURouter`, the controller in
`megatron/training/training.py`).

    R(x) = ReLU(W x)                                  over all E experts, no top-k, no softmax
    MoE(x) = sum_{e : R_e(x) > 0} R_e(x) e(x)          (a token with R = 0 everywhere: output 0)

    L_reg = mean_tokens sum_e f_e R_e(x),  f_e = E / (k T) * #{tokens t : R_e(x_t) > 0}
                                                      (load-balanced L1; plain L1: f_e = 1)
    L = L_task + lambda_t * L_reg
    lambda_{t+1} = lambda_t * alpha ** sign(target_sparsity - S_t),  S_t = share of zero R entries

with k = E (1 - target_sparsity) the dense-equivalent number of experts (the paper sets
target_sparsity = 1 - k/E to match a top-k MoE's compute). Experts the ReLU switches off cost
nothing; f_e (no gradient) makes the penalty heavier on busy experts, which balances the load.

Slots: the ctx.top_k experts with the largest W x (the largest R among the active ones) and keep
= R > 0 among them; ctx.top_k = E is ReMoE proper (train with it), a smaller k caps the experts
per token (an inference-time compute cap). `Routing.logits` is W x (the layer's entropy
statistic is then that of softmax(W x), not of R). `Routing.stats`: `mean_k` (active experts per
token, R > 0, before any cap), `sparsity` (share of zero entries of R in this call) and `lambda`.

The controller: lambda is a persistent fp32 buffer (`l1_coeff`, saved in checkpoints) changed
only by `optimizer_step`, once per optimizer step, never in forward (which also runs in eval and
once per gradient-accumulation chunk). S_t = 1 - load / (tokens * E), with load the (token,
expert) pairs computed since the previous step, summed over data-parallel ranks by the training
step, and tokens the number this router routed in training forwards since the previous step (a
non-persistent buffer), times the world size when torch.distributed is initialised: exact when
every rank routes the same number of tokens (the trainer's equal batches), an estimate otherwise.
sign(0) = 0 leaves lambda unchanged.

Options (defaults): target_sparsity None = 1 - 1/E (dense-equivalent k = 1, the paper's main
setting and the reference scripts' default E = 8, k = 1, i.e. 0.875; give 1 - k/E for another k;
must be in (0, 1)), balanced_l1 True (the paper's load-balanced L1; False: plain L1), alpha
1.2 and lambda_0 1e-8 (the paper and the reference's `moe_relu_l1_reg_coeff_multiplier` /
`moe_relu_l1_reg_coeff_init`; alpha >= 1, 1 = a fixed lambda; lambda_0 >= 0, 0 = no
regulariser), bias False and init_std 0.01 (the reference gate has no bias and Megatron's normal
init with the scripts' `--init-method-std 0.01`).

Differences from the paper / reference code, and why:
- One lambda per layer, driven by that layer's sparsity: the reference keeps one global lambda
  driven by the sparsity averaged over all layers, so its layers may settle at different
  sparsities around the target. A router knows only its own layer; each layer here is steered to
  the target itself.
- S_t counts the pairs the experts computed (after the layer's capacity limit and a k < E cap, if
  any); the reference counts R > 0. Identical at top_k = E without a capacity limit.
- The reference adds L_reg only when gradients are enabled in training; here every call returns
  it (a detached evaluation ignores it), and the sparsity statistics come from every call.
- Megatron sums each layer's L_reg times lambda; the paper averages over layers (1/L). We sum
  per-layer terms, like every aux loss here (the adaptive lambda absorbs the factor L).
- Router math in fp32 (as every router: under autocast the layer runs routers in fp32).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch import distributed as dist

from hyperrouter.routers.base import (
    Router,
    Routing,
    RoutingContext,
    check_option,
    init_linear_,
    register_router,
)
from hyperrouter.routers.losses import at_least_fp32, router_z_loss


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def relu_l1_loss(relu_TE: Tensor, dense_k: float, balanced: bool = True) -> Tensor:
    """The ReMoE regulariser (unweighted): mean over tokens of sum_e f_e R_te, with
    f_e = E / (k T) * (tokens with R_te > 0) when `balanced`, else f_e = 1 (plain L1)."""
    num_tokens, num_experts = relu_TE.shape
    if not balanced:
        return relu_TE.sum(-1).mean()
    with torch.no_grad():
        active_E = (relu_TE > 0).sum(0).to(relu_TE.dtype)
        f_E = active_E * (num_experts / (dense_k * num_tokens))
    return torch.dot(f_E, relu_TE.mean(0))


@register_router("remoe")
class ReMoERouter(Router):
    """ReLU router R = ReLU(W x) with the adaptive (load-balanced) L1 sparsity controller."""

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        *,
        target_sparsity: float | None = None,
        balanced_l1: bool = True,
        alpha: float = 1.2,
        lambda_0: float = 1e-8,
        bias: bool = False,
        init_std: float = 0.01,
        z_loss_weight: float = 0.0,
    ) -> None:
        super().__init__(d_model, num_experts)
        check_option(
            "z_loss_weight", z_loss_weight, _is_number(z_loss_weight) and z_loss_weight >= 0,
            "a number >= 0",
        )  # fmt: skip
        self.z_loss_weight = float(z_loss_weight)
        check_option(
            "target_sparsity",
            target_sparsity,
            target_sparsity is None or (_is_number(target_sparsity) and 0 < target_sparsity < 1),
            "a number in (0, 1) or None (= 1 - 1/E)",
        )
        check_option("balanced_l1", balanced_l1, isinstance(balanced_l1, bool), "True or False")
        check_option("alpha", alpha, _is_number(alpha) and alpha >= 1, "a number >= 1")
        check_option("lambda_0", lambda_0, _is_number(lambda_0) and lambda_0 >= 0, "a number >= 0")
        check_option("init_std", init_std, _is_number(init_std) and init_std > 0, "a number > 0")
        if target_sparsity is None:
            target_sparsity = 1.0 - 1.0 / num_experts
        check_option(
            "target_sparsity",
            target_sparsity,
            target_sparsity > 0,
            "in (0, 1); 1 - 1/E is 0 for a single expert",
        )
        self.target_sparsity = float(target_sparsity)
        self.balanced_l1 = balanced_l1
        self.alpha = float(alpha)
        self.regularize = lambda_0 > 0  # lambda only ever multiplies: 0 stays 0
        self.gate = nn.Linear(d_model, num_experts, bias=bias)
        init_linear_(self.gate, init_std)
        self.register_buffer("l1_coeff", torch.tensor(float(lambda_0), dtype=torch.float32))
        self.register_buffer(
            "tokens_since_step", torch.zeros((), dtype=torch.long), persistent=False
        )

    @property
    def dense_k(self) -> float:
        """The dense-equivalent experts per token, k = E (1 - target_sparsity)."""
        return self.num_experts * (1.0 - self.target_sparsity)

    def forward(self, x_TD: Tensor, ctx: RoutingContext | int) -> Routing:
        ctx = self.context(ctx)
        logits_TE = at_least_fp32(self.gate(x_TD))
        relu_TE = torch.relu(logits_TE)
        k = min(ctx.top_k, self.num_experts)
        # ReLU is monotone: the top k of W x are the k largest R, ties at 0 broken by W x
        ids_TK = torch.topk(logits_TE.detach(), k, dim=-1, sorted=True).indices
        weights_TK = relu_TE.gather(1, ids_TK)
        keep_TK = weights_TK.detach() > 0
        num_tokens = x_TD.shape[0]
        if ctx.training:
            with torch.no_grad():
                self.tokens_since_step += num_tokens
        losses: dict[str, Tensor] = {}
        coeff = self.l1_coeff
        if num_tokens > 0 and self.regularize:
            reg = relu_l1_loss(relu_TE, self.dense_k, self.balanced_l1)
            losses["l1_loss"] = coeff.to(reg.dtype) * reg
        if num_tokens > 0 and self.z_loss_weight > 0:
            losses["z_loss"] = self.z_loss_weight * router_z_loss(logits_TE)
        with torch.no_grad():
            active = (relu_TE > 0).sum()
            total = max(num_tokens * self.num_experts, 1)
            stats = {
                "mean_k": (active / max(num_tokens, 1)).float(),
                "sparsity": (1.0 - active / total).float() if num_tokens else active.float() * 0,
                "lambda": coeff.detach().float().clone(),
            }
        return Routing(ids_TK, weights_TK, logits_TE, losses, keep=keep_TK, stats=stats)

    @torch.no_grad()
    def optimizer_step(self, load_E: Tensor, step: int) -> None:
        """lambda *= alpha ** sign(target - S) with S the sparsity since the previous step."""
        tokens = int(self.tokens_since_step)
        self.tokens_since_step.zero_()
        if dist.is_available() and dist.is_initialized():
            tokens *= dist.get_world_size()  # the load is summed over ranks, so are the tokens
        if tokens == 0:
            return
        pairs = float(load_E.sum())
        sparsity = 1.0 - pairs / (tokens * self.num_experts)
        diff = self.target_sparsity - sparsity
        if diff > 0:
            self.l1_coeff.mul_(self.alpha)
        elif diff < 0:
            self.l1_coeff.div_(self.alpha)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202  (torch's signature)
        before = self.l1_coeff
        super()._apply(fn, recurse)
        after = self.l1_coeff
        if after.dtype not in (torch.float32, torch.float64):  # keep lambda's fp32 value
            self.l1_coeff = before.to(device=after.device, dtype=torch.float32)
        return self

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, target_sparsity={self.target_sparsity:g}, "
            f"alpha={self.alpha:g}, balanced_l1={self.balanced_l1}"
        )
