"""Expert parallelism: the experts of every MoE layer spread over the ranks of a process group.

`shard_experts(model, ep_group)` makes every `MoE` layer of a model expert-parallel in place: it
keeps each layer's shard of the experts and gives the layer an `AllToAllDispatcher` (the layer's
class and code stay those of `MoE`; only its dispatcher object changes). With P ranks in the
group and E experts (E % P == 0), rank j keeps the experts [j E/P, (j+1) E/P): its
`layer.experts` is an `Experts` of E/P experts whose parameters are those slices of the full
layer (so ranks built from the same seed hold consistent shards; state-dict keys are unchanged,
shapes are [E/P, ...]). The router, shared experts and gates stay replicated.

Semantics. Routing is local: on each rank the layer is exactly the single-process layer applied to
that rank's tokens (the same routing, combine weights, auxiliary losses, statistics, `MoEOutput`
and training hooks, random draws included); only where the experts compute changes:
- `tokens` dispatch: each kept (token, slot) pair's input row travels to the rank owning its expert
  (an all-to-all with variable split sizes), the owner runs the layer's backend on the rows it
  received (expert ids remapped to its local ids; `dense`, which would run every local expert on
  every received row, runs as `grouped` there), the outputs travel back by the reverse all-to-all
  and are combined with the routing weights on the token's rank. The exchanges are differentiable
  (the backward of an all-to-all is the reverse all-to-all), so an owner's expert gradients are the
  sum over the group of what the single-process layer would give on each rank's tokens.
- `merge` dispatch (SMEAR: every token uses a merge of every expert) and the experts' responses of
  competition routers (CompeteSMoE: all experts on all tokens, detached): the ranks all-gather the
  expert parameters within the group (the all-gather's backward sums each shard's gradient over the
  ranks back onto its owner) and compute locally as the single-process layer does. Every expert's
  parameters are then briefly held by every rank: the memory saving of expert parallelism does not
  apply to these calls (SMEAR's compute uses every expert on every token anyway).
- `second_router`: its dispatch goes through the same exchanges as the first path.
- `capacity_factor` (the layer's, not a router's own capacity, which stays local) applies per
  expert across the group: the capacity is ceil(T_group * k / E * c) over the group's T_group
  tokens, and the priority order is that of the single-process layer run on the concatenation of the
  group's tokens in rank order (every token's first choice before anyone's second). Each rank
  all-gathers the group's (small, integer) expert ids, so all ranks agree on the keep mask.
- Expert dropout masks are drawn on the owner rank: same distribution, different draws than
  single-process.

Cost per call of a layer with `tokens` dispatch: one all-to-all of the per-expert row counts (read
on the host to size the next two), then two all-to-alls of d_model-wide rows, one row per kept
pair (a token with two experts on one rank travels twice); a layer capacity adds two small
all-gathers. Expert parameters are sharded; their gradients never cross the group.

Every call is a collective: every rank of the group must call every layer (the same layers in the
same order, with the same grad mode), including ranks without tokens, which still compute the rows
other ranks send them; and every rank must backpropagate through every layer's output whenever one
does. Routers that compete on random calls (CompeteSMoE) first agree, with one small all-reduce,
on whether any rank competes in this call.

Training with data parallelism over the world and expert parallelism within groups of the world
(`hyperrouter.distributed`): shard first; after backward average the gradients of every parameter
but `expert_parameter_names(model)` over the world and call `reduce_expert_grads` for those;
checkpoints are written in the unsharded layout by `full_state_dict` (and `full_optimizer_state`)
and read back by `load_full_state_dict` (and `load_full_optimizer_state`) for any number of ranks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch import distributed as dist
from torch.autograd.function import once_differentiable

from hyperrouter.errors import HyperRouterError
from hyperrouter.moe.dispatch import LocalDispatcher, Routed
from hyperrouter.moe.experts import (
    BACKEND_FUNCTIONS,
    Experts,
    ExpertWeights,
    capacity_keep_mask,
    expert_capacity,
)
from hyperrouter.moe.layer import MoE


@dataclass(frozen=True)
class ExpertShard:
    """Where a layer's experts live: the `size` ranks of `group` hold `count` = num_experts / size
    experts each, in rank order; this process is `rank` in the group and holds
    [first, first + count)."""

    group: Any
    size: int
    rank: int
    num_experts: int

    @property
    def count(self) -> int:
        return self.num_experts // self.size

    @property
    def first(self) -> int:
        return self.rank * self.count

    def __deepcopy__(self, memo: dict) -> ExpertShard:
        return self  # immutable, and a process group is a handle to share, not to copy


# --------------------------------------------------------------------------- exchanges


def _all_to_all_rows(x: Tensor, send_splits: list[int], recv_splits: list[int], group) -> Tensor:
    out = x.new_empty(sum(recv_splits), *x.shape[1:])
    dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
    return out


class _ExchangeRows(torch.autograd.Function):
    """All-to-all of rows with variable split sizes; the backward is the reverse exchange.

    (torch.distributed.nn.functional.all_to_all_single does the same, but recent torch warns
    that it is deprecated.)
    """

    @staticmethod
    def forward(ctx, x: Tensor, send_splits: list[int], recv_splits: list[int], group) -> Tensor:
        ctx.splits = (send_splits, recv_splits)
        ctx.group = group
        return _all_to_all_rows(x, send_splits, recv_splits, group)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        send_splits, recv_splits = ctx.splits
        return _all_to_all_rows(grad, recv_splits, send_splits, ctx.group), None, None, None


def exchange_rows(x: Tensor, send_splits: list[int], recv_splits: list[int], group) -> Tensor:
    """Send the rows of x in order, send_splits[j] of them to rank j of `group`; returns the rows
    received, recv_splits[i] from rank i, in rank order. Differentiable."""
    return _ExchangeRows.apply(x, send_splits, recv_splits, group)


def gather_rows(t: Tensor, shard: ExpertShard) -> Tensor:
    """Every rank's `t` (equal shapes) concatenated along dim 0 in rank order. Differentiable: the
    gradient of a rank's block is summed over the ranks back onto that rank."""
    n, size = t.shape[0], shard.size
    copies = t.unsqueeze(0).expand(size, *t.shape).reshape(size * n, *t.shape[1:])
    return exchange_rows(copies, [n] * size, [n] * size, shard.group)


def gather_expert_weights(
    experts: Experts, shard: ExpertShard, dtype: torch.dtype | None = None
) -> ExpertWeights:
    """The stacked weights of all the layer's experts, gathered from their owners (cast to `dtype`
    before the exchange when given). Differentiable."""
    return ExpertWeights(
        *(None if t is None else gather_rows(t, shard) for t in experts.weights(dtype))
    )


# --------------------------------------------------------------------------- the dispatcher


class AllToAllDispatcher(LocalDispatcher):
    """The dispatcher of a layer whose experts are spread over an expert-parallel group (module
    docstring): `shard_experts` gives it to the layer, whose `experts` then hold this rank's
    `shard.count` experts (`num_experts` stays the layer's E)."""

    collective = True

    def __init__(self, shard: ExpertShard) -> None:
        self.shard = shard

    def any_rank(self, flag: bool, device: torch.device) -> bool:
        value = torch.tensor([int(flag)], device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.shard.group)
        return bool(value.item())

    def expert_weights(self, experts: Experts, dtype: torch.dtype | None = None) -> ExpertWeights:
        """Every expert's weights, gathered from their owners (a differentiable collective)."""
        return gather_expert_weights(experts, self.shard, dtype)

    def capacity_keep(
        self,
        ids_TK: Tensor,
        keep_TK: Tensor | None,
        num_experts: int,
        top_k: int,
        capacity_factor: float,
    ) -> Tensor:
        """The keep mask of this rank's pairs under a capacity counted over the whole group, in
        the priority order of the group's tokens concatenated in rank order."""
        shard = self.shard
        num_tokens, slots = ids_TK.shape
        shape = torch.tensor([num_tokens, slots], device=ids_TK.device)
        shapes = [torch.empty_like(shape) for _ in range(shard.size)]
        dist.all_gather(shapes, shape, group=shard.group)
        sizes = torch.stack(shapes).tolist()
        max_tokens = max(1, max(t for t, _ in sizes))
        max_slots = max(1, max(k for _, k in sizes))
        kept_TK = ids_TK if keep_TK is None else torch.where(keep_TK, ids_TK, num_experts)
        padded = ids_TK.new_full((max_tokens, max_slots), num_experts, dtype=torch.int32)
        padded[:num_tokens, :slots] = kept_TK
        gathered = [torch.empty_like(padded) for _ in range(shard.size)]
        dist.all_gather(gathered, padded, group=shard.group)
        ids_NK = torch.cat([g[:t] for g, (t, _) in zip(gathered, sizes)]).long()
        capacity = expert_capacity(ids_NK.shape[0], num_experts, top_k, capacity_factor)
        keep_NK = capacity_keep_mask(ids_NK, num_experts, capacity, ids_NK < num_experts)
        start = sum(t for t, _ in sizes[: shard.rank])
        return keep_NK[start : start + num_tokens, :slots]

    def tokens(self, experts: Experts, routed: Routed) -> Tensor:
        """Kept pairs' rows to their experts' owners, computed there, back and combined here."""
        shard, x_TD, keep_TK = self.shard, routed.x_TD, routed.keep_TK
        ids_TK = routed.routing.expert_ids
        flat_ids = ids_TK.reshape(-1)
        rows = torch.argsort(flat_ids, stable=True)  # expert order, hence owner order
        if keep_TK is not None:
            rows = rows[keep_TK.reshape(-1).index_select(0, rows)]
        counts_E = torch.bincount(flat_ids.index_select(0, rows), minlength=shard.num_experts)
        recv_counts = torch.empty_like(counts_E)  # [size * count]: rows per local expert per rank
        dist.all_to_all_single(recv_counts, counts_E, group=shard.group)
        send_splits = counts_E.view(shard.size, shard.count).sum(1).tolist()
        recv_splits = recv_counts.view(shard.size, shard.count).sum(1).tolist()
        tokens = torch.div(rows, ids_TK.shape[1], rounding_mode="floor")
        weights = experts.weights(routed.weights_dtype)
        with torch.autocast(x_TD.device.type, enabled=False):  # the backends cast explicitly
            x_rows = x_TD.to(routed.compute_dtype).index_select(0, tokens)
            x_ND = exchange_rows(x_rows, send_splits, recv_splits, shard.group)
            num_rows = x_ND.shape[0]
            if num_rows == 0:  # still in the graph, so the backward runs the reverse exchanges
                y_ND = x_ND + sum(w.sum() * 0 for w in weights if w is not None)
            else:
                local_ids = torch.arange(shard.count, device=x_ND.device).repeat(shard.size)
                ids_N1 = local_ids.repeat_interleave(recv_counts, output_size=num_rows)
                backend = "grouped" if routed.backend == "dense" else routed.backend
                ones = x_ND.new_ones(num_rows, 1)
                y_ND = BACKEND_FUNCTIONS[backend](
                    experts, weights, x_ND, ids_N1.unsqueeze(1), ones, None
                )
            y_RD = exchange_rows(y_ND, recv_splits, send_splits, shard.group)
            w_R1 = routed.routing.weights.reshape(-1).index_select(0, rows).unsqueeze(1)
            y_TD = y_RD.new_zeros(x_TD.shape[0], x_TD.shape[1])
            return y_TD.index_add(0, tokens, y_RD * w_R1.to(y_RD.dtype))


def shard_experts(model: nn.Module, ep_group: Any) -> nn.Module:
    """Make every MoE layer of `model` (or `model` itself, a layer) expert-parallel over
    `ep_group`, in place: each layer keeps its experts' shard and gets an `AllToAllDispatcher`.
    Returns `model`. A group of one rank (or None) changes nothing.

    Every rank of the group must call it on an identical model (the same seed or checkpoint).
    """
    if ep_group is None or dist.get_world_size(ep_group) == 1:
        return model
    size, rank = dist.get_world_size(ep_group), dist.get_rank(ep_group)
    if rank < 0:
        raise HyperRouterError("shard_experts: this process is not a member of the ep_group")
    named = [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]
    for name, layer in named:
        where = f"MoE layer {name!r}" if name else "the MoE layer"
        if layer.shard is not None:
            raise HyperRouterError(f"{where} is already expert-parallel")
        if layer.ffn_experts % size:
            raise HyperRouterError(
                f"{where} has E={layer.ffn_experts} experts, not divisible by the "
                f"expert-parallel size P={size}: use a multiple of {size} experts"
            )
    for _, layer in named:
        shard = ExpertShard(ep_group, size, rank, layer.ffn_experts)
        layer.experts = _local_experts(layer.experts, shard.first, shard.count)
        layer.dispatcher = AllToAllDispatcher(shard)
    return model


def _local_experts(full: Experts, first: int, count: int) -> Experts:
    """An `Experts` holding copies of the experts [first, first + count) of `full`."""
    with torch.device("meta"):  # no allocation, no random draws for an initialisation
        local = Experts(
            count,
            full.d_model,
            full.d_hidden,
            activation=full.activation,
            bias=full.b_in is not None,
            dropout=full.dropout,
        )
    for name, p in full.named_parameters():
        part = p.detach()[first : first + count].clone()
        setattr(local, name, nn.Parameter(part, requires_grad=p.requires_grad))
    return local.train(full.training)


# --------------------------------------------------------------------------- trainer helpers


def _sharded_layers(model: nn.Module) -> Iterator[tuple[str, MoE]]:
    """(name prefix of its parameters, layer) for every expert-parallel layer."""
    for name, module in model.named_modules():
        if isinstance(module, MoE) and module.shard is not None:
            yield (f"{name}." if name else ""), module


def expert_parameter_names(model: nn.Module) -> set[str]:
    """Names (as in model.named_parameters()) of the sharded expert parameters: the parameters
    the world-wide gradient average must leave out (`reduce_expert_grads` averages them)."""
    return {
        f"{prefix}experts.{name}"
        for prefix, layer in _sharded_layers(model)
        for name, _ in layer.experts.named_parameters()
    }


def reduce_expert_grads(model: nn.Module, expert_dp_group: Any, world_size: int) -> None:
    """After backward: sum each sharded expert parameter's gradient over the expert-data-parallel
    group (None: this rank alone), then divide it by `world_size`.

    With the other parameters averaged over the world, the update then
    equals single-process training on the global batch (the mean of the ranks' losses). A
    parameter without a gradient on every rank of the world is left alone; one that has a
    gradient somewhere gets a zero gradient where it had none (as a slice of the unsharded stacked
    parameter would), so every replica takes the same optimizer step.
    """
    layers = [layer for _, layer in _sharded_layers(model)]
    params = [p for layer in layers for p in layer.experts.parameters() if p.requires_grad]
    if not params:
        return
    groups: list[Any] = []
    for group in [layer.shard.group for layer in layers] + [expert_dp_group]:
        if group is not None and not any(group is g for g in groups):
            groups.append(group)
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.int32)
    present = present.to(params[0].device)
    for group in groups:  # the ep groups times the expert-dp group: the world
        dist.all_reduce(present, op=dist.ReduceOp.MAX, group=group)
    reduce = expert_dp_group is not None and dist.get_world_size(expert_dp_group) > 1
    for p, anywhere in zip(params, present.tolist()):
        if not anywhere:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        if reduce:
            dist.all_reduce(p.grad, group=expert_dp_group)
        p.grad.div_(world_size)


def _check_group(model: nn.Module, ep_group: Any) -> list[tuple[str, MoE]]:
    """The expert-parallel layers, checked to be sharded over `ep_group`."""
    layers = list(_sharded_layers(model))
    size = 1 if ep_group is None else dist.get_world_size(ep_group)
    rank = 0 if ep_group is None else dist.get_rank(ep_group)
    for _, layer in layers:
        if (layer.shard.size, layer.shard.rank) != (size, rank):
            raise HyperRouterError(
                f"ep_group (size {size}, rank {rank} here) is not the group the experts were "
                f"sharded over (size {layer.shard.size}, rank {layer.shard.rank}): pass the "
                f"group given to shard_experts"
            )
    return layers


@torch.no_grad()
def full_state_dict(model: nn.Module, ep_group: Any) -> dict[str, Tensor]:
    """model.state_dict() in the unsharded layout (every expert of every layer), the same on every
    rank of the group: checkpoints that load on any number of ranks. A collective."""
    state = model.state_dict()
    for prefix, layer in _check_group(model, ep_group):
        for name, _ in layer.experts.named_parameters():
            key = f"{prefix}experts.{name}"
            state[key] = gather_rows(state[key], layer.shard)
    return state


def load_full_state_dict(model: nn.Module, state: dict[str, Tensor], ep_group: Any) -> None:
    """Load an unsharded state dict (`full_state_dict`, or a single-process model's) into a
    sharded model: each rank takes its experts' slices (strict, like load_state_dict)."""
    local = dict(state)
    for prefix, layer in _check_group(model, ep_group):
        shard = layer.shard
        for name, _ in layer.experts.named_parameters():
            key = f"{prefix}experts.{name}"
            if key in state:
                local[key] = _expert_slice(state[key], key, shard)
    model.load_state_dict(local)


def _expert_slice(full: Tensor, key: str, shard: ExpertShard) -> Tensor:
    if full.dim() == 0 or full.shape[0] != shard.num_experts:
        raise HyperRouterError(
            f"{key} has shape {tuple(full.shape)}, expected {shard.num_experts} experts in dim 0 "
            f"(an unsharded state)"
        )
    return full[shard.first : shard.first + shard.count]


def _expert_params_by_index(
    model: nn.Module, optimizer: torch.optim.Optimizer, packed_groups: list[dict]
) -> list[tuple[int, nn.Parameter, ExpertShard]]:
    """(index in the optimizer's state dict, parameter, shard) of every sharded expert parameter
    the optimizer holds, in model order."""
    index: dict[int, int] = {}
    for group, packed in zip(optimizer.param_groups, packed_groups):
        index.update({id(p): i for p, i in zip(group["params"], packed["params"])})
    return [
        (index[id(p)], p, layer.shard)
        for _, layer in _sharded_layers(model)
        for p in layer.experts.parameters()
        if id(p) in index
    ]


def _is_expert_state(value: Any, param: nn.Parameter, rows: int) -> bool:
    """A per-parameter state tensor laid out like the parameter (Adam's moments), with `rows`
    experts in dim 0; scalars such as Adam's step are not."""
    return (
        torch.is_tensor(value)
        and value.dim() == param.dim()
        and value.shape[0] == rows
        and value.shape[1:] == param.shape[1:]
    )


@torch.no_grad()
def full_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, ep_group: Any
) -> dict[str, Any]:
    """optimizer.state_dict() in the unsharded layout: every per-parameter state tensor shaped
    like a sharded expert parameter (Adam's exp_avg, exp_avg_sq) gathered over the group, scalars
    (Adam's step) as they are. Loads into the single-process model's optimizer too. A collective."""
    _check_group(model, ep_group)
    state = optimizer.state_dict()
    full = {**state, "state": dict(state["state"])}
    entries = _expert_params_by_index(model, optimizer, state["param_groups"])
    if not entries:
        return full
    present = torch.tensor([i in state["state"] for i, _, _ in entries], dtype=torch.int32)
    present = present.to(entries[0][1].device)
    low, high = present.clone(), present.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN, group=ep_group)
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=ep_group)
    if not torch.equal(low, high):
        raise HyperRouterError(
            "optimizer state exists for the experts of some ranks only: call reduce_expert_grads "
            "before every optimizer step"
        )
    for i, p, shard in entries:
        if i not in state["state"]:
            continue
        full["state"][i] = {
            key: gather_rows(value, shard) if _is_expert_state(value, p, shard.count) else value
            for key, value in state["state"][i].items()
        }
    return full


def load_full_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], ep_group: Any
) -> None:
    """Load an unsharded optimizer state (`full_optimizer_state`, or a single-process model's
    optimizer's) into the optimizer of a sharded model: each rank takes its experts' slices."""
    _check_group(model, ep_group)
    local = {**state, "state": dict(state["state"])}
    for i, p, shard in _expert_params_by_index(model, optimizer, state["param_groups"]):
        if i not in state["state"]:
            continue
        local["state"][i] = {
            key: value[shard.first : shard.first + shard.count]
            if _is_expert_state(value, p, shard.num_experts)
            else value
            for key, value in state["state"][i].items()
        }
    optimizer.load_state_dict(local)
