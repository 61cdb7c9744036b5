"""Dispatch strategies: how the routed tokens reach the experts and come back.

A dispatcher takes the experts, the routed tokens x_TD, the router's `Routing`, the final keep mask
(router drops and capacity), the backend name and the compute dtype, and returns y_TD. The router
never sees how; the experts' math (`hyperrouter.moe.experts`) never sees the routing policy.

- `tokens`: token dispatch, out[t] = sum_k keep[t,k] * weights[t,k] * expert_{ids[t,k]}(x[t]),
  through the expert backends (reference, grouped, grouped_mm, dense).

- `merge`: parameter merging (SMEAR): each token is processed by ONE expert whose parameters are
  the routing-weighted average of the experts' parameters, out[t] = f(x[t]; sum_e w[t,e] theta_e)
  with `routing.expert_ids` = every expert. Since each layer of an expert is linear in its
  parameters, x (sum_e w_e W_e) = sum_e w_e (x W_e): computed without materialising per-token
  merged weights, at the cost of running every expert's two GEMMs on every token (like the
  `dense` backend). The backends are not used.

Other strategies register here with `register_dispatch`; the layer picks one by name
(`MoE(dispatch=...)`), and a router may require one (`Router.dispatch`). Expert parallelism
(`hyperrouter.moe.expert_parallel`) has its own versions of `tokens` and `merge`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from hyperrouter.errors import HyperRouterError
from hyperrouter.moe.experts import BACKEND_FUNCTIONS, Experts, ExpertWeights
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


@register_dispatch("merge")
def merge_dispatch(
    experts: Experts,
    x_TD: Tensor,
    routing: Routing,
    keep_TK: Tensor | None,
    backend: str,
    compute_dtype: torch.dtype,
    autocast: bool,
) -> Tensor:
    """One merged expert per token: f(x_t; sum_e w_te theta_e) (SMEAR); `backend` is unused."""
    p = experts.weights(compute_dtype if autocast else None)
    return merged_forward(experts, p, x_TD, routing, keep_TK, compute_dtype)


def merged_forward(
    experts: Experts,
    p: ExpertWeights,
    x_TD: Tensor,
    routing: Routing,
    keep_TK: Tensor | None,
    compute_dtype: torch.dtype,
) -> Tensor:
    """The `merge` computation with the stacked weights `p` of all the routing's experts
    (`experts` gives the activation and dropout; expert parallelism passes gathered weights)."""
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
