"""`dense` router: every token uses every expert (the reference's "all experts" evaluation)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from hyperrouter.errors import HyperRouterError
from hyperrouter.routers.base import (
    LogitRouter,
    Router,
    Routing,
    RoutingContext,
    build_router,
    register_router,
)
from hyperrouter.routers.losses import at_least_fp32

WEIGHTINGS = ("softmax", "uniform")


@register_router("dense")
class DenseRouter(Router):
    """All E experts per token, weighted by the full softmax of an underlying logit router's logits
    (`weighting="softmax"`, the default; `base` names that router, `base_options` its options) or
    uniformly 1/E (`weighting="uniform"`, no router parameters at all). top_k is ignored.

    The base router's z-loss applies; a balance loss is rejected: with every token on every expert
    the Switch loss N * sum_i f_i P_i is the constant 1 and trains nothing.
    """

    uses_all_experts: ClassVar[bool] = True

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        *,
        base: str = "smoe",
        weighting: str = "softmax",
        base_options: dict | None = None,
    ) -> None:
        super().__init__(d_model, num_experts)
        if weighting not in WEIGHTINGS:
            raise HyperRouterError(
                f"unknown weighting {weighting!r} for router 'dense'; "
                f"valid: {', '.join(WEIGHTINGS)}"
            )
        if base == "dense":
            raise HyperRouterError("router 'dense' needs a base router other than 'dense'")
        options = dict(base_options or {})
        if float(options.get("balance_loss_weight", 0.0) or 0.0) > 0:
            raise HyperRouterError(
                "router 'dense' rejects base_options.balance_loss_weight > 0: with every token on "
                "every expert the balance loss is constant; use z_loss_weight to regularise logits"
            )
        if options.get("score", "topk_softmax") != "topk_softmax":
            raise HyperRouterError(
                "router 'dense' always weights by the full softmax; base_options.score must be "
                f"topk_softmax, got {options['score']!r}"
            )
        self.weighting = weighting
        self.base = (
            build_router(base, d_model, num_experts, **options) if weighting == "softmax" else None
        )
        if self.base is not None and not isinstance(self.base, LogitRouter):
            raise HyperRouterError(
                f"router 'dense' needs a base router with logits; {base!r} has none"
            )
        if self.base is not None and self.base.balance_loss_weight > 0:
            raise HyperRouterError(
                f"router 'dense' with base {base!r}: its default balance_loss_weight "
                f"{self.base.balance_loss_weight} is constant when every token uses every expert; "
                f"set base_options.balance_loss_weight=0"
            )

    def compute_logits(self, x_TD: Tensor) -> Tensor:
        if self.base is None:
            return x_TD.new_zeros(x_TD.shape[0], self.num_experts, dtype=torch.float32)
        return self.base.compute_logits(x_TD)

    def forward(self, x_TD: Tensor, ctx: RoutingContext | int) -> Routing:
        logits_TE = self.compute_logits(x_TD)
        num_tokens = x_TD.shape[0]
        ids_TE = torch.arange(self.num_experts, device=x_TD.device).expand(num_tokens, -1)
        weights_TE = torch.softmax(at_least_fp32(logits_TE), dim=-1)
        aux = self.base.aux_losses(logits_TE, ids_TE) if self.base is not None else {}
        return Routing(ids_TE, weights_TE, logits_TE, aux)
