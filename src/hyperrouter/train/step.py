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
from typing import Any

import torch
from torch import Tensor, nn
from torch import distributed as dist

from hyperrouter.moe import MoEOutput
from hyperrouter.moe.layer import moe_layers, sum_loads_over_ranks


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
    sharded: Sequence[nn.Parameter] = (),
    shard_group: Any = None,
) -> StepResult:
    """Run the chunks' forwards and backwards, one optimizer step, and the routers' hooks.

    `sharded`: the parameters of `params` this rank holds one shard of (expert parallelism over
    `shard_group`); the clip norm is then the whole model's (`clip_grad_norm`)."""
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
        clip_grad_norm(params, clip, sharded, shard_group)
    optimizer.step()
    sum_loads_over_ranks(layers)  # one all-reduce for every layer's hook
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


def clip_grad_norm(
    params: Sequence[nn.Parameter],
    max_norm: float,
    sharded: Sequence[nn.Parameter] = (),
    shard_group: Any = None,
) -> Tensor:
    """Scale the gradients of `params` so that the whole model's gradient norm is <= max_norm;
    returns that norm. Without sharded parameters this is torch's `clip_grad_norm_`. With them
    (expert parallelism) every rank must clip by the same factor, the norm of the unsharded model:
    the squares of the replicated gradients (equal on every rank after averaging) once, plus the
    squares of the sharded gradients summed over `shard_group` (as torchtitan does). A norm from
    this rank's parameters alone would differ per rank and let the replicas drift apart."""
    if not sharded:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    shard_ids = {id(p) for p in sharded}
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    device = grads[0].device

    def squares(tensors: list[Tensor]) -> Tensor:
        norms = [
            torch.linalg.vector_norm(g, dtype=torch.promote_types(g.dtype, torch.float32))
            for g in tensors
        ]
        return torch.stack(norms).square().sum() if norms else torch.zeros((), device=device)

    local = squares([p.grad for p in params if p.grad is not None and id(p) in shard_ids])
    local = local.to(device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(local, group=shard_group)
    replicated = squares([p.grad for p in params if p.grad is not None and id(p) not in shard_ids])
    total = (replicated.to(device) + local).sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    torch._foreach_mul_(grads, coef.to(grads[0].dtype))
    return total


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
