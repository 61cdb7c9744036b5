"""Parameter counts that keep trainable and frozen parameters apart."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn


@dataclass(frozen=True)
class ParameterSummary:
    """Numbers of parameters: trainable (optimised), frozen (requires_grad False), total."""

    trainable: int
    frozen: int

    @property
    def total(self) -> int:
        return self.trainable + self.frozen

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}

    def __str__(self) -> str:
        return f"{self.total:,} parameters ({self.trainable:,} trainable, {self.frozen:,} frozen)"


def parameter_summary(module: nn.Module) -> ParameterSummary:
    """Count `module`'s parameters (shared tensors once), split into trainable and frozen."""
    trainable = frozen = 0
    for p in module.parameters():
        if p.requires_grad:
            trainable += p.numel()
        else:
            frozen += p.numel()
    return ParameterSummary(trainable, frozen)


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters an optimizer may touch: those with requires_grad True."""
    return [p for p in module.parameters() if p.requires_grad]
