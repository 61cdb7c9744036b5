"""The router interface, the routing result, and the registry that builds routers by name.

A router maps tokens x_TD to a `Routing`: which K experts each token uses, with what combine
weights, plus the full logits (for statistics) and the auxiliary losses of this call. Routers know
nothing about models or expert computation.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from hyperrouter.errors import HyperRouterError
from hyperrouter.moe.losses import at_least_fp32, router_z_loss, switch_balance_loss


@dataclass
class Routing:
    """A router's choice for T tokens: expert ids [T, K], combine weights [T, K], logits [T, E]."""

    expert_ids: Tensor
    weights: Tensor
    logits: Tensor
    aux_losses: dict[str, Tensor] = field(default_factory=dict)


def topk_softmax(logits_TE: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """Top-k over the raw logits, then softmax over the k selected logits only (the reference rule).

    With k = E this is the full softmax. Unsorted like the reference, so results match it
    bit for bit.
    """
    values_TK, ids_TK = torch.topk(at_least_fp32(logits_TE), top_k, dim=-1, sorted=False)
    return ids_TK, torch.softmax(values_TK, dim=-1)


class Router(nn.Module):
    """Base class: subclasses implement `compute_logits`; routing is top-k softmax over them.

    `balance_loss_weight` and `z_loss_weight` add the (already weighted) Switch balance loss and the
    router z-loss to `Routing.aux_losses` when positive.
    """

    uses_all_experts: ClassVar[bool] = False

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        *,
        balance_loss_weight: float = 0.0,
        z_loss_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if balance_loss_weight < 0 or z_loss_weight < 0:
            raise HyperRouterError(
                f"loss weights must be >= 0, got balance_loss_weight={balance_loss_weight}, "
                f"z_loss_weight={z_loss_weight}"
            )
        self.d_model = d_model
        self.num_experts = num_experts
        self.balance_loss_weight = float(balance_loss_weight)
        self.z_loss_weight = float(z_loss_weight)

    def compute_logits(self, x_TD: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x_TD: Tensor, top_k: int) -> Routing:
        logits_TE = self.compute_logits(x_TD)
        ids_TK, weights_TK = topk_softmax(logits_TE, top_k)
        return Routing(ids_TK, weights_TK, logits_TE, self.aux_losses(logits_TE, ids_TK))

    def aux_losses(self, logits_TE: Tensor, ids_TK: Tensor) -> dict[str, Tensor]:
        losses: dict[str, Tensor] = {}
        if self.balance_loss_weight > 0 and ids_TK.numel() > 0:
            losses["balance_loss"] = self.balance_loss_weight * switch_balance_loss(
                logits_TE, ids_TK
            )
        if self.z_loss_weight > 0 and logits_TE.numel() > 0:
            losses["z_loss"] = self.z_loss_weight * router_z_loss(logits_TE)
        return losses

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_experts={self.num_experts}"


ROUTERS: dict[str, type[Router]] = {}


def register_router(name: str) -> Callable[[type[Router]], type[Router]]:
    """Class decorator adding a router to the registry under `name`."""

    def wrap(cls: type[Router]) -> type[Router]:
        if name in ROUTERS:
            raise ValueError(f"router {name!r} is already registered")
        ROUTERS[name] = cls
        cls.registry_name = name
        return cls

    return wrap


def router_options(name: str) -> list[str]:
    """Keyword options the router `name` accepts (besides d_model and num_experts)."""
    cls = _router_class(name)
    params = inspect.signature(cls.__init__).parameters
    return [p for p, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY]


def build_router(name: str, d_model: int, num_experts: int, **options: object) -> Router:
    """Build a registered router, rejecting unknown names and options with a one-line error."""
    cls = _router_class(name)
    valid = router_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise HyperRouterError(
            f"unknown option(s) {', '.join(unknown)} for router {name!r}; "
            f"valid: {', '.join(valid) or 'none'}"
        )
    return cls(d_model, num_experts, **options)


def _router_class(name: str) -> type[Router]:
    if name not in ROUTERS:
        raise HyperRouterError(f"unknown router {name!r}; valid: {', '.join(sorted(ROUTERS))}")
    return ROUTERS[name]


def init_linear_(layer: nn.Linear, std: float) -> None:
    """Transformer-XL initialisation: weight N(0, std), bias 0."""
    nn.init.normal_(layer.weight, 0.0, std)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def freeze_(module: nn.Module) -> nn.Module:
    """Mark every parameter of `module` frozen (requires_grad False); still saved and loaded."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module
