"""Linear routers: trainable `smoe` and the frozen random `smoe_dropout` (SMoE-Dropout)."""

from __future__ import annotations

from torch import Tensor, nn

from hyperrouter.routers.base import LogitRouter, freeze_, init_linear_, register_router


@register_router("smoe")
class LinearRouter(LogitRouter):
    """Trainable Linear(d_model, E) router: top-k over logits, softmax over the k selected logits.

    Optional Switch balance loss and router z-loss (weights default 0, as in the reference), and
    every logit router's score function option.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        *,
        bias: bool = True,
        init_std: float = 0.02,
        **options,
    ) -> None:
        super().__init__(d_model, num_experts, **options)
        self.gate = nn.Linear(d_model, num_experts, bias=bias)
        init_linear_(self.gate, init_std)

    def compute_logits(self, x_TD: Tensor) -> Tensor:
        return self.gate(x_TD)


@register_router("smoe_dropout")
class RandomFrozenRouter(LinearRouter):
    """SMoE-Dropout (Chen et al., ICLR 2023): the linear router, initialised N(0, init_std) with
    zero bias, then frozen. Combine with a growing top-k schedule (hyperrouter.moe.schedules).

    A balance loss or z-loss (off by default) cannot move the frozen router; it still pushes the
    layer's inputs, i.e. the layers below, toward balanced routing.
    """

    def __init__(self, d_model: int, num_experts: int, **options) -> None:
        super().__init__(d_model, num_experts, **options)
        freeze_(self.gate)
