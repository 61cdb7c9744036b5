"""Dispatchers: how the routed tokens reach the experts and come back.

A router decides, a dispatcher moves tokens, experts compute. The layer (`hyperrouter.moe.layer`)
holds one dispatcher object, chosen when the layer is built (`LocalDispatcher`: every expert on
this process) or sharded (`hyperrouter.moe.expert_parallel.AllToAllDispatcher`: the experts
spread over an expert-parallel group, rows exchanged with all-to-all). Everything the layer does
that depends on where the experts live goes through it, and only through it:

    run(strategy, experts, routed) -> y_TD   carry out one routing (`Routed`)
    capacity_keep(...)                       the keep mask under a capacity limit (counted over
                                             the tokens the experts see: this call's, or the
                                             expert-parallel group's)
    expert_weights(experts, dtype)           every expert's stacked weights (gathered when sharded)
    any_rank(flag)                           whether any rank of the group says yes
    collective                               whether every rank must call even without tokens
    shard                                    where the experts live (None: all here)

Strategies (the `strategy` of `run`; a router may require one, `Router.dispatch`):
- `tokens`: token dispatch, out[t] = sum_k keep[t,k] * weights[t,k] * expert_{ids[t,k]}(x[t]),
  through the expert backends (reference, grouped, grouped_mm, dense).
- `merge`: parameter merging (SMEAR): each token is processed by ONE expert whose parameters are
  the routing-weighted average of the experts' parameters, out[t] = f(x[t]; sum_e w[t,e] theta_e)
  with `routing.expert_ids` = every expert. Since each layer of an expert is linear in its
  parameters, x (sum_e w_e W_e) = sum_e w_e (x W_e): computed without materialising per-token
  merged weights, at the cost of running every expert's two GEMMs on every token (like the
  `dense` backend). The backends are not used.
A new strategy is a method of that name on the dispatchers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from hyperrouter.errors import HyperRouterError
from hyperrouter.moe.experts import (
    BACKEND_FUNCTIONS,
    Experts,
    ExpertWeights,
    capacity_keep_mask,
    expert_capacity,
)
from hyperrouter.routers import Routing

STRATEGIES = ("tokens", "merge")


def check_dispatch(name: str) -> str:
    if name not in STRATEGIES:
        raise HyperRouterError(f"unknown dispatch {name!r}; valid: {', '.join(STRATEGIES)}")
    return name


@dataclass
class Routed:
    """One routing to carry out: the layer's tokens x_TD, the router's `Routing`, the final keep
    mask (router drops and capacity; None keeps every pair), the expert backend, the compute dtype
    and whether autocast is on (the experts then cast their weights to it)."""

    x_TD: Tensor
    routing: Routing
    keep_TK: Tensor | None
    backend: str
    compute_dtype: torch.dtype
    autocast: bool

    @property
    def weights_dtype(self) -> torch.dtype | None:
        return self.compute_dtype if self.autocast else None


class LocalDispatcher:
    """Every expert on this process."""

    collective = False
    shard: Any = None

    def run(self, strategy: str, experts: Experts, routed: Routed) -> Tensor:
        """y_TD: the experts' combined output for `routed` through `strategy`."""
        return getattr(self, strategy)(experts, routed)

    def any_rank(self, flag: bool, device: torch.device) -> bool:
        return flag

    def capacity_keep(
        self,
        ids_TK: Tensor,
        keep_TK: Tensor | None,
        num_experts: int,
        top_k: int,
        capacity_factor: float,
    ) -> Tensor:
        """The keep mask [T, K] under `capacity_factor`, counted over this call's T tokens."""
        capacity = expert_capacity(ids_TK.shape[0], num_experts, top_k, capacity_factor)
        return capacity_keep_mask(ids_TK, num_experts, capacity, keep_TK)

    def expert_weights(self, experts: Experts, dtype: torch.dtype | None = None) -> ExpertWeights:
        """The stacked weights of all the layer's experts (cast to `dtype` when given)."""
        return experts.weights(dtype)

    def tokens(self, experts: Experts, routed: Routed) -> Tensor:
        """Each (token, slot) pair to its expert through the chosen backend, weighted and summed."""
        run = BACKEND_FUNCTIONS[routed.backend]
        weights = experts.weights(routed.weights_dtype)
        routing = routed.routing
        with torch.autocast(routed.x_TD.device.type, enabled=False):  # backends cast explicitly
            return run(
                experts,
                weights,
                routed.x_TD.to(routed.compute_dtype),
                routing.expert_ids,
                routing.weights,
                routed.keep_TK,
            )

    def merge(self, experts: Experts, routed: Routed) -> Tensor:
        """One merged expert per token: f(x_t; sum_e w_te theta_e) (SMEAR); no backend."""
        return merged_forward(experts, self.expert_weights(experts, routed.weights_dtype), routed)


def merged_forward(experts: Experts, p: ExpertWeights, routed: Routed) -> Tensor:
    """The `merge` computation with the stacked weights `p` of all the routing's experts
    (`experts` gives the activation and dropout; expert parallelism passes gathered weights)."""
    x_TD, routing, keep_TK = routed.x_TD, routed.routing, routed.keep_TK
    compute_dtype = routed.compute_dtype
    num_tokens, num_experts = x_TD.shape[0], p.w_in.shape[0]
    w_TK = routing.weights.to(compute_dtype)
    if keep_TK is not None:
        w_TK = w_TK * keep_TK
    w_TE = x_TD.new_zeros(num_tokens, num_experts, dtype=compute_dtype).scatter_add(
        1, routing.expert_ids, w_TK
    )
    with torch.autocast(x_TD.device.type, enabled=False):
        x = x_TD.to(compute_dtype)
        h_TEH = torch.einsum("td,edh->teh", x, p.w_in)
        h_TH = torch.einsum("te,teh->th", w_TE, h_TEH)
        if p.b_in is not None:
            h_TH = h_TH + w_TE @ p.b_in
        a_TH = experts.hidden(h_TH)
        y_TED = torch.einsum("th,ehd->ted", a_TH, p.w_out)
        y_TD = torch.einsum("te,ted->td", w_TE, y_TED)
        if p.b_out is not None:
            y_TD = y_TD + w_TE @ p.b_out
    return y_TD
