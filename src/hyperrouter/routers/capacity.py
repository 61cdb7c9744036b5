"""Expert capacity: how many (token, slot) pairs an expert may take, and which pairs fit.

Routing functions (routers with a capacity of their own, such as Switch, use them; the MoE layer's
generic `capacity_factor` too), so they live with the routers.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def capacity_keep_mask(
    ids_TK: Tensor, num_experts: int, capacity: int, keep_TK: Tensor | None = None
) -> Tensor:
    """[T, K] bool: which (token, slot) pairs fit their expert's capacity.

    Priority is GShard's and Switch's: every token's first slot before anyone's second slot, and
    within a slot earlier tokens first. Pairs already dropped (`keep_TK` False) take no capacity
    and stay dropped. Slots are in the router's order: routers whose slot order is not by score
    (the reference's unsorted top-k) get slot order, not score order, as priority.
    """
    num_tokens, top_k = ids_TK.shape
    flat_ids = ids_TK.t().reshape(-1)  # slot-major: all first slots, then all second slots...
    if keep_TK is not None:
        flat_ids = torch.where(keep_TK.t().reshape(-1), flat_ids, num_experts)
    order = torch.argsort(flat_ids, stable=True)
    counts_E = torch.bincount(flat_ids, minlength=num_experts + 1)
    starts_E = counts_E.cumsum(0) - counts_E
    sorted_ids = flat_ids.index_select(0, order)
    rank = torch.arange(order.numel(), device=ids_TK.device) - starts_E.index_select(0, sorted_ids)
    keep = torch.empty_like(flat_ids, dtype=torch.bool)
    keep[order] = (rank < capacity) & (sorted_ids < num_experts)
    return keep.view(top_k, num_tokens).t()


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Assignments each expert may take: ceil(T * k / E * capacity_factor) (Switch, generalised)."""
    return max(1, math.ceil(num_tokens * top_k / num_experts * capacity_factor))
