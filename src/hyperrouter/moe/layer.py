"""`MoE`: a drop-in replacement for a Transformer FFN (router -> dispatch -> experts -> combine)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from hyperrouter.errors import HyperRouterError
from hyperrouter.moe.experts import (
    BACKEND_FUNCTIONS,
    BACKENDS,
    Experts,
    capacity_keep_mask,
    choose_backend,
    expert_capacity,
)
from hyperrouter.moe.losses import at_least_fp32
from hyperrouter.routers import build_router


@dataclass
class RoutingStats:
    """Routing statistics of one call (detached tensors; call .item()/.tolist() when needed).

    tokens_per_expert: [E] (token, slot) assignments each expert computed (after dropping);
    entropy: mean over tokens of the entropy (nats) of the full router softmax over all E experts;
    dropped_fraction: fraction of assignments dropped by the capacity limit (0 without one);
    backend: the expert backend that ran; top_k: the k used.
    """

    tokens_per_expert: Tensor
    entropy: Tensor
    dropped_fraction: Tensor
    backend: str
    top_k: int


@dataclass
class MoEOutput:
    """Everything one MoE call produced: output [..., d_model], this call's auxiliary losses
    (already weighted; empty when the router has none) and routing statistics."""

    output: Tensor
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    stats: RoutingStats | None = None


class MoE(nn.Module):
    """Sparse Mixture-of-Experts FFN: input [..., d_model] -> output of the same shape.

    Args:
        d_model: model width. num_experts: E. d_hidden: hidden width of each expert.
        top_k: experts per token (1 <= k <= E); change it any time (`layer.top_k = 4`) or per call.
        router: registered router name (`hyperrouter.routers.ROUTERS`); router_options: its options.
        activation: relu (Transformer-XL default), gelu or swiglu. bias: expert biases.
        dropout: dropout on the expert hidden activations (as in the reference experts).
        backend: auto | reference | grouped | grouped_mm | dense (see hyperrouter.moe.experts).
        capacity_factor: None (default) drops no token; a float c caps each expert at
            ceil(T * k / E * c) assignments, first come first served.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        d_hidden: int,
        top_k: int = 2,
        *,
        router: str = "smoe",
        router_options: dict | None = None,
        activation: str = "relu",
        bias: bool = True,
        dropout: float = 0.0,
        backend: str = "auto",
        capacity_factor: float | None = None,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        for name, value in (("d_model", d_model), ("num_experts", num_experts)):
            if not isinstance(value, int) or value < 1:
                raise HyperRouterError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(d_hidden, int) or d_hidden < 1:
            raise HyperRouterError(f"d_hidden must be a positive integer, got {d_hidden!r}")
        if capacity_factor is not None and capacity_factor <= 0:
            raise HyperRouterError(f"capacity_factor must be > 0 or None, got {capacity_factor}")
        self.d_model = d_model
        self.num_experts = num_experts
        self.capacity_factor = capacity_factor
        self.router = build_router(router, d_model, num_experts, **(router_options or {}))
        self.router_name = router
        self.experts = Experts(
            num_experts,
            d_model,
            d_hidden,
            activation=activation,
            bias=bias,
            dropout=dropout,
            init_std=init_std,
        )
        self.top_k = top_k
        self.backend = backend

    @property
    def top_k(self) -> int:
        return self._top_k

    @top_k.setter
    def top_k(self, value: int) -> None:
        self._top_k = self._check_top_k(value)

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        self._backend = _check_backend(value)

    def extra_repr(self) -> str:
        return f"router={self.router_name}, top_k={self.top_k}, backend={self.backend}"

    def _check_top_k(self, value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise HyperRouterError(
                f"top_k must be an integer in [1, {self.num_experts}], got {value!r}"
            )
        if not 1 <= value <= self.num_experts:
            raise HyperRouterError(f"top_k must be in [1, {self.num_experts}], got {value}")
        return value

    def forward(
        self,
        x: Tensor,
        top_k: int | None = None,
        *,
        mask: Tensor | None = None,
        backend: str | None = None,
        return_details: bool = False,
    ) -> Tensor | MoEOutput:
        """Route and compute. Returns the output tensor, or a `MoEOutput` with return_details=True.

        `mask` (bool, x.shape[:-1]) marks real tokens: padding is not routed, not computed, adds
        nothing to the auxiliary losses or statistics, and gets output 0.
        """
        if not torch.is_floating_point(x):
            raise HyperRouterError(f"MoE input must be a floating-point tensor, got {x.dtype}")
        if x.dim() == 0 or x.shape[-1] != self.d_model:
            raise HyperRouterError(
                f"MoE input last dimension must be d_model={self.d_model}, got shape "
                f"{tuple(x.shape)}"
            )
        k = self.top_k if top_k is None else self._check_top_k(top_k)
        backend_name = self.backend if backend is None else _check_backend(backend)
        if self.router.uses_all_experts:
            k = self.num_experts

        device_type = x.device.type
        autocast = torch.is_autocast_enabled(device_type)
        compute_dtype = torch.get_autocast_dtype(device_type) if autocast else x.dtype
        x_TD = x.reshape(-1, self.d_model)
        token_idx = None
        if mask is not None:
            if mask.shape != x.shape[:-1]:
                raise HyperRouterError(
                    f"mask shape must be x.shape[:-1]={tuple(x.shape[:-1])}, "
                    f"got {tuple(mask.shape)}"
                )
            token_idx = mask.reshape(-1).nonzero(as_tuple=True)[0]
            x_TD = x_TD.index_select(0, token_idx)
        num_tokens = x_TD.shape[0]

        routing = self.router(x_TD, k)
        keep_TK = None
        if self.capacity_factor is not None and num_tokens > 0:
            capacity = expert_capacity(num_tokens, self.num_experts, k, self.capacity_factor)
            keep_TK = capacity_keep_mask(routing.expert_ids, self.num_experts, capacity)
        if backend_name == "auto":
            backend_name = choose_backend(num_tokens, self.num_experts, k, x.device, x.dtype)

        if num_tokens == 0:
            y_TD = x_TD.new_zeros(0, self.d_model, dtype=compute_dtype)
        else:
            run = BACKEND_FUNCTIONS[backend_name]
            weights = self.experts.weights(compute_dtype if autocast else None)
            with torch.autocast(device_type, enabled=False):  # the backends cast explicitly
                y_TD = run(
                    self.experts,
                    weights,
                    x_TD.to(compute_dtype),
                    routing.expert_ids,
                    routing.weights,
                    keep_TK,
                )

        if token_idx is not None:
            full = y_TD.new_zeros(x.shape[:-1].numel(), self.d_model)
            y_TD = full.index_copy(0, token_idx, y_TD)
        output = y_TD.view(*x.shape[:-1], self.d_model)
        if not return_details:
            return output
        return MoEOutput(
            output,
            routing.aux_losses,
            _routing_stats(routing.logits, routing.expert_ids, keep_TK, backend_name, k),
        )


def _check_backend(value: str) -> str:
    if value not in BACKENDS:
        raise HyperRouterError(f"unknown backend {value!r}; valid: {', '.join(BACKENDS)}")
    return value


@torch.no_grad()
def _routing_stats(
    logits_TE: Tensor, ids_TK: Tensor, keep_TK: Tensor | None, backend: str, top_k: int
) -> RoutingStats:
    num_experts = logits_TE.shape[-1]
    kept_ids = ids_TK.reshape(-1) if keep_TK is None else ids_TK[keep_TK]
    counts_E = torch.bincount(kept_ids, minlength=num_experts)
    if logits_TE.shape[0] > 0:
        log_p = torch.log_softmax(at_least_fp32(logits_TE), dim=-1)
        entropy = -(log_p.exp() * log_p).sum(-1).mean()
    else:
        entropy = logits_TE.new_zeros((), dtype=torch.float32)
    total = max(ids_TK.numel(), 1)
    dropped = (ids_TK.numel() - kept_ids.numel()) / total
    return RoutingStats(
        counts_E,
        entropy,
        torch.tensor(dropped, dtype=torch.float32, device=logits_TE.device),
        backend,
        top_k,
    )
