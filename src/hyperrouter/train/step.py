"""One optimizer step, shared by pretraining and fine-tuning, with the routers' training hooks.

    for every MoE layer: layer.step = step                 (routers see it in their context)
    zero grads
    for each gradient-accumulation chunk:
        forward -> task loss, per-token loss, MoE outputs
        routers' token-loss terms (RL-R style) from the per-token loss
        backward((task loss + auxiliary losses + token-loss terms) / chunks)
    clip, optimizer.step()
    for every MoE layer: layer.optimizer_step(step)        (state updated from the step's load)

The per-step hook runs exactly once per optimizer step, after gradient accumulation, and never in
evaluation (evaluation does not go through here). Under data parallelism `after_backward` averages
the accumulated gradients over the ranks (`distributed.average_gradients`, and the expert-parallel
gradients over their own group), before clipping.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from hyperrouter.moe import MoEOutput
from hyperrouter.moe.layer import moe_layers


@dataclass
class ChunkResult:
    """What one forward chunk returns to the step: the mean task loss (a scalar with a graph), the
    model's summed auxiliary loss, the per-token task loss laid out like the MoE layers' inputs
    (without their last dimension; None when the model has none), and the MoE layers' outputs in
    layer order (their named losses are logged; `aux_loss` is what is backpropagated)."""

    loss: Tensor
    aux_loss: Tensor
    token_loss: Tensor | None
    moe_outputs: list[MoEOutput]


@dataclass
class StepResult:
    """Means over the chunks: task loss, each named auxiliary loss summed over layers; and per
    MoE layer, the expert load (kept assignments) summed over the chunks and the mean entropy."""

    loss: float
    aux_losses: dict[str, float] = field(default_factory=dict)
    layer_load: list[list[int]] = field(default_factory=list)
    layer_entropy: list[float | None] = field(default_factory=list)
    dropped_fraction: float = 0.0
    layer_router_stats: list[dict[str, float]] = field(default_factory=list)


def training_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    chunks: Sequence[Callable[[], ChunkResult]],
    *,
    step: int,
    clip: float,
    params: list[nn.Parameter],
    after_backward: Callable[[], None] | None = None,
) -> StepResult:
    """Run the chunks' forwards and backwards, one optimizer step, and the routers' hooks."""
    layers = moe_layers(model)
    for layer in layers:
        layer.step = step
    optimizer.zero_grad(set_to_none=True)
    n = len(chunks)
    loss_sum = 0.0
    aux_sums: dict[str, Tensor] = {}
    loads: list[Tensor | None] = [None] * len(layers)
    entropies: list[list[float]] = [[] for _ in layers]
    extras: list[dict[str, list[float]]] = [{} for _ in layers]
    dropped: list[float] = []
    for run in chunks:
        res = _chunk_backward(run, layers, n, aux_sums)
        loss_sum += float(res.loss.detach())
        for i, out in enumerate(res.moe_outputs):
            if out.stats is None:
                continue
            counts = out.stats.tokens_per_expert
            loads[i] = counts if loads[i] is None else loads[i] + counts
            if out.stats.entropy is not None:
                entropies[i].append(float(out.stats.entropy))
            for name, value in out.stats.extra.items():
                extras[i].setdefault(name, []).append(float(value))
            dropped.append(float(out.stats.dropped_fraction))
    if after_backward is not None:
        after_backward()
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(params, clip)
    optimizer.step()
    for layer in layers:
        layer.optimizer_step(step)
        layer.step = None  # outside a training step routers see no step (evaluation)
    return StepResult(
        loss=loss_sum / n,
        aux_losses={name: float(value) / n for name, value in aux_sums.items()},
        layer_load=[[] if load is None else load.tolist() for load in loads],
        layer_entropy=[sum(e) / len(e) if e else None for e in entropies],
        dropped_fraction=sum(dropped) / len(dropped) if dropped else 0.0,
        layer_router_stats=[{n: sum(v) / len(v) for n, v in e.items()} for e in extras],
    )


def _chunk_backward(
    run: Callable[[], ChunkResult], layers: list, n: int, aux_sums: dict[str, Tensor]
) -> ChunkResult:
    """One chunk's forward, its routers' token-loss terms, and backward of its share of the loss."""
    res = run()
    loss = res.loss.float()
    total = loss + res.aux_loss if res.aux_loss.requires_grad else loss
    named: dict[str, Tensor] = {}
    for out in res.moe_outputs:
        for name, value in out.aux_losses.items():
            named[name] = named[name] + value if name in named else value
    if res.token_loss is not None:
        for layer in layers:
            for name, value in layer.token_loss_terms(res.token_loss).items():
                total = total + value
                named[name] = named[name] + value if name in named else value
    for name, value in named.items():
        aux_sums[name] = aux_sums.get(name, 0.0) + value.detach().float()
    (total / n).backward()
    return res
