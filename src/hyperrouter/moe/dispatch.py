"""Dispatch strategies: how the routed tokens reach the experts and come back.

A dispatcher takes the experts, the routed tokens x_TD, the router's `Routing`, the final keep mask
(router drops and capacity), the backend name and the compute dtype, and returns y_TD. The router
never sees how; the experts' math (`hyperrouter.moe.experts`) never sees the routing policy.

- `tokens`: token dispatch, out[t] = sum_k keep[t,k] * weights[t,k] * expert_{ids[t,k]}(x[t]),
  through the expert backends (reference, grouped, grouped_mm, dense).

Other strategies register here with `register_dispatch` (parameter merging, where the routing
weights average the experts' parameters instead of moving tokens, is the next one); the layer picks
one by name (`MoE(dispatch=...)`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from hyperrouter.errors import HyperRouterError
from hyperrouter.moe.experts import BACKEND_FUNCTIONS, Experts
from hyperrouter.routers import Routing

Dispatcher = Callable[[Experts, Tensor, Routing, "Tensor | None", str, torch.dtype, bool], Tensor]
DISPATCHERS: dict[str, Dispatcher] = {}


def register_dispatch(name: str) -> Callable[[Dispatcher], Dispatcher]:
    """Function decorator adding a dispatch strategy under `name`."""

    def wrap(fn: Dispatcher) -> Dispatcher:
        if name in DISPATCHERS:
            raise ValueError(f"dispatch {name!r} is already registered")
        DISPATCHERS[name] = fn
        return fn

    return wrap


def check_dispatch(name: str) -> str:
    if name not in DISPATCHERS:
        raise HyperRouterError(f"unknown dispatch {name!r}; valid: {', '.join(DISPATCHERS)}")
    return name


@register_dispatch("tokens")
def token_dispatch(
    experts: Experts,
    x_TD: Tensor,
    routing: Routing,
    keep_TK: Tensor | None,
    backend: str,
    compute_dtype: torch.dtype,
    autocast: bool,
) -> Tensor:
    """Each (token, slot) pair to its expert through the chosen backend, weighted and summed."""
    run = BACKEND_FUNCTIONS[backend]
    weights = experts.weights(compute_dtype if autocast else None)
    with torch.autocast(x_TD.device.type, enabled=False):  # the backends cast explicitly
        return run(
            experts, weights, x_TD.to(compute_dtype), routing.expert_ids, routing.weights, keep_TK
        )
