"""Auxiliary-loss-free load balancing: a per-expert bias that steers the choice, not the weights."""

from __future__ import annotations

import torch
from torch import Tensor

from hyperrouter.routers.base import Routing, RoutingContext, check_option, register_router
from hyperrouter.routers.linear import LinearRouter


@register_router("aux_free")
class AuxFreeRouter(LinearRouter):
    """Auxiliary-loss-free balancing (Wang, Gao, Zeng, Xu, Dai 2024, "Auxiliary-Loss-Free Load
    Balancing Strategy for Mixture-of-Experts", arXiv 2408.15664; as used by DeepSeek-V3,
    DeepSeek-AI 2024, arXiv 2412.19437).

    s = sigmoid(x W) (the V3 affinity; `score` may choose another); the top-k experts are chosen
    on s_i + b_i, but the combine weights use the unbiased scores of the chosen experts,
    g_i = s_i / sum_{j in topk} s_j (`renormalize`, V3). After each optimizer step, with c_i the
    number of (token, slot) assignments expert i computed since the previous step,
    b_i += u * sign(mean_j c_j - c_i): overloaded experts become less attractive, idle ones more.
    The bias is a persistent buffer (`expert_bias`, saved in checkpoints, never trained by
    gradients, kept in fp32 even when the module is cast to a lower precision so that steps of
    u = 1e-3 are not rounded away), updated only by `optimizer_step`, so evaluation and
    gradient-accumulation chunks never change it.

    Options (defaults): bias_update_rate u = 1e-3 (DeepSeek-V3 and Megatron's default; must be
    >= 0, 0 = fixed bias), score sigmoid, renormalize True, balance_loss_weight 0 (aux-loss-free;
    V3 adds a sequence-wise balance loss with weight 1e-4, approximated here by the batch-wise
    Switch loss if set), z_loss_weight 0, bias False (the gate's own bias), init_std 0.02.

    Differences from the paper / reference code, and why:
    - The load is counted after the layer's capacity drops (what experts really computed), summed
      over gradient-accumulation chunks, and over data-parallel ranks (the training step sums every
      layer's load in one all-reduce before the hooks: `moe.layer.sum_loads_over_ranks`).
    - No node-limited / group-limited routing (V3's 8 groups, top-4 groups) and no routed scaling
      factor (V3's 2.5): they concern the expert-parallel deployment and the output scale, not
      balancing; a single machine has no nodes to limit.
    - Wang et al. use softmax gates in their main experiments; the default follows DeepSeek-V3's
      sigmoid (score="softmax_topk" gives the former).
    - Linear gate initialised N(0, init_std) like the rest of the model; router math in fp32.
    - At k = 1 with renormalize the weight is exactly 1, so the gate gets no gradient from the
      output (V3 uses k = 8); use renormalize False (weight s) or a larger k there.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        *,
        bias_update_rate: float = 1e-3,
        score: str = "sigmoid",
        renormalize: bool = True,
        balance_loss_weight: float = 0.0,
        z_loss_weight: float = 0.0,
        bias: bool = False,
        init_std: float = 0.02,
    ) -> None:
        check_option(
            "bias_update_rate",
            bias_update_rate,
            isinstance(bias_update_rate, (int, float))
            and not isinstance(bias_update_rate, bool)
            and bias_update_rate >= 0,
            "a number >= 0",
        )
        super().__init__(
            d_model,
            num_experts,
            bias=bias,
            init_std=init_std,
            score=score,
            renormalize=renormalize,
            balance_loss_weight=balance_loss_weight,
            z_loss_weight=z_loss_weight,
        )
        self.bias_update_rate = float(bias_update_rate)
        self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32))

    def selection_bias(self) -> Tensor:
        return self.expert_bias

    def forward(self, x_TD: Tensor, ctx: RoutingContext | int) -> Routing:
        routing = super().forward(x_TD, ctx)
        if self.renormalize and self.score != "topk_softmax" and routing.weights.shape[1] == 1:
            # s / s at k = 1: exactly 1, without the rounding residue of its zero gradient
            routing.weights = torch.ones_like(routing.weights.detach())
        return routing

    @torch.no_grad()
    def optimizer_step(self, load_E: Tensor, step: int) -> None:
        load = load_E.to(device=self.expert_bias.device, dtype=torch.float32)
        self.expert_bias.add_(torch.sign(load.mean() - load), alpha=self.bias_update_rate)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202  (torch's signature)
        before = self.expert_bias
        super()._apply(fn, recurse)
        after = self.expert_bias
        if after.dtype not in (torch.float32, torch.float64):  # keep the fp32 values, move device
            self.expert_bias = before.to(device=after.device, dtype=torch.float32)
        return self

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bias_update_rate={self.bias_update_rate}"
