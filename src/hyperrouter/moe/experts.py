"""Expert weights stacked as [E, ...] tensors and the backends that compute with them.

Every backend takes the same weights and the same routing and returns the same result:

    out[t] = sum_k weights[t, k] * expert_{ids[t, k]}(x[t])

- `reference`: a readable loop over experts with boolean masks, plain autograd. The yardstick.
- `grouped`:   stable argsort of the (token, slot) pairs by expert, one gather, a grouped matmul
               per linear layer (torch._grouped_mm where it is fast, else one GEMM per expert with
               a hand-written backward), a gather back and a weighted sum over the k slots. Every
               step is a gather (no scatter-add), so results are deterministic on every device.
- `grouped_mm`: the grouped path forced onto torch._grouped_mm (for comparison).
- `dense`:     every expert on every token as two big GEMMs with the [T, E] combine weights (zero
               for unselected experts) applied in between; no gather at all. Best when k is E.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from hyperrouter.errors import HyperRouterError

ACTIVATIONS = ("relu", "gelu", "swiglu")
BACKENDS = ("auto", "reference", "grouped", "grouped_mm", "dense")


class Experts(nn.Module):
    """E feed-forward experts d_model -> d_hidden -> d_model stored as stacked tensors.

    w_in [E, d_model, d_hidden * g] (g = 2 for SwiGLU: gate columns then up columns), b_in
    [E, d_hidden * g], w_out [E, d_hidden, d_model], b_out [E, d_model]. Weights are initialised
    N(0, init_std) and biases 0, as Transformer-XL initialises its Linear layers.
    """

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_hidden: int,
        *,
        activation: str = "relu",
        bias: bool = True,
        dropout: float = 0.0,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise HyperRouterError(
                f"unknown activation {activation!r}; valid: {', '.join(ACTIVATIONS)}"
            )
        if not 0.0 <= dropout < 1.0:
            raise HyperRouterError(f"dropout must be in [0, 1), got {dropout}")
        self.num_experts = num_experts
        self.d_model = d_model
        self.d_hidden = d_hidden
        self.activation = activation
        self.dropout = float(dropout)
        width = 2 * d_hidden if activation == "swiglu" else d_hidden
        self.w_in = nn.Parameter(torch.empty(num_experts, d_model, width))
        self.w_out = nn.Parameter(torch.empty(num_experts, d_hidden, d_model))
        self.b_in = nn.Parameter(torch.zeros(num_experts, width)) if bias else None
        self.b_out = nn.Parameter(torch.zeros(num_experts, d_model)) if bias else None
        nn.init.normal_(self.w_in, 0.0, init_std)
        nn.init.normal_(self.w_out, 0.0, init_std)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, d_model={self.d_model}, d_hidden={self.d_hidden}, "
            f"activation={self.activation}, bias={self.b_in is not None}, dropout={self.dropout}"
        )

    def hidden(self, h: Tensor) -> Tensor:
        """Activation (and dropout in training) applied to the first layer's output."""
        if self.activation == "relu":
            a = F.relu(h)
        elif self.activation == "gelu":
            a = F.gelu(h)
        else:
            gate, up = h.chunk(2, dim=-1)
            a = F.silu(gate) * up
        return F.dropout(a, self.dropout, self.training) if self.dropout > 0 else a

    def expert_forward(self, e: int, x_ND: Tensor) -> Tensor:
        """Expert e applied to rows x_ND, written the obvious way (used by `reference`)."""
        h = x_ND @ self.w_in[e]
        if self.b_in is not None:
            h = h + self.b_in[e]
        y = self.hidden(h) @ self.w_out[e]
        if self.b_out is not None:
            y = y + self.b_out[e]
        return y


# --------------------------------------------------------------------------- reference


def reference_backend(
    experts: Experts, x_TD: Tensor, ids_TK: Tensor, weights_TK: Tensor, keep_TK: Tensor | None
) -> Tensor:
    """Loop over experts; each picks its (token, slot) pairs with a mask. Slow and obvious."""
    out_TD = torch.zeros_like(x_TD)
    for e in range(experts.num_experts):
        mask_TK = ids_TK == e
        if keep_TK is not None:
            mask_TK = mask_TK & keep_TK
        token_idx, slot_idx = mask_TK.nonzero(as_tuple=True)
        if token_idx.numel() == 0:
            continue
        y_ND = experts.expert_forward(e, x_TD[token_idx])
        w_N1 = weights_TK[token_idx, slot_idx].unsqueeze(-1).to(y_ND.dtype)
        out_TD = out_TD.index_add(0, token_idx, y_ND * w_N1)
    return out_TD


# --------------------------------------------------------------------------- dense


def dense_backend(
    experts: Experts, x_TD: Tensor, ids_TK: Tensor, weights_TK: Tensor, keep_TK: Tensor | None
) -> Tensor:
    """All experts as one wide FFN: [T, D] @ [D, E*H], activation, scale by weight, @ [E*H, D]."""
    num_tokens, d_model = x_TD.shape
    num_experts = experts.num_experts
    w_TK = weights_TK.to(x_TD.dtype)
    if keep_TK is not None:
        w_TK = w_TK * keep_TK
    if ids_TK.shape[1] == num_experts and _is_identity_order(ids_TK):
        w_TE = w_TK
    else:
        w_TE = x_TD.new_zeros(num_tokens, num_experts).scatter(1, ids_TK, w_TK)
    width = experts.w_in.shape[-1]
    w_in_DW = experts.w_in.permute(1, 0, 2).reshape(d_model, num_experts * width)
    if experts.b_in is not None:
        h = torch.addmm(experts.b_in.reshape(-1), x_TD, w_in_DW)
    else:
        h = x_TD @ w_in_DW
    a_TEH = experts.hidden(h.view(num_tokens, num_experts, width))
    a_TEH = a_TEH * w_TE.unsqueeze(-1)
    w_out_WD = experts.w_out.reshape(num_experts * experts.d_hidden, d_model)
    a_TW = a_TEH.reshape(num_tokens, num_experts * experts.d_hidden)
    if experts.b_out is not None:
        return torch.addmm(w_TE @ experts.b_out, a_TW, w_out_WD)
    return a_TW @ w_out_WD


def _is_identity_order(ids_TK: Tensor) -> bool:
    """True when every row of ids is 0..E-1 in order (the dense router's routing)."""
    if ids_TK.shape[0] == 0:
        return True
    expected = torch.arange(ids_TK.shape[1], device=ids_TK.device)
    return bool(ids_TK.stride(0) == 0 and torch.equal(ids_TK[0], expected))


# --------------------------------------------------------------------------- grouped


class _Dispatch(torch.autograd.Function):
    """x_TD -> x_ND with row n = x[rows_TK[n] // K]; backward gathers back and sums the k slots."""

    @staticmethod
    def forward(ctx, x_TD: Tensor, rows_TK: Tensor, inverse: Tensor | None, top_k: int) -> Tensor:
        ctx.save_for_backward(rows_TK, inverse)
        ctx.shape = (x_TD.shape[0], top_k, x_TD.shape[1])
        return x_TD.index_select(0, torch.div(rows_TK, top_k, rounding_mode="floor"))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_ND: Tensor):
        rows_TK, inverse = ctx.saved_tensors
        num_tokens, top_k, d_model = ctx.shape
        grad_TKD = _to_slot_order(grad_ND, rows_TK, inverse, num_tokens * top_k)
        return grad_TKD.view(num_tokens, top_k, d_model).sum(1), None, None, None


class _Undispatch(torch.autograd.Function):
    """y_ND (expert order) -> y_(TK)D in (token, slot) order, zero rows for dropped pairs."""

    @staticmethod
    def forward(ctx, y_ND: Tensor, rows_TK: Tensor, inverse: Tensor | None, size: int) -> Tensor:
        ctx.save_for_backward(rows_TK)
        return _to_slot_order(y_ND, rows_TK, inverse, size)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_TKD: Tensor):
        (rows_TK,) = ctx.saved_tensors
        return grad_TKD.index_select(0, rows_TK), None, None, None


def _to_slot_order(y_ND: Tensor, rows_TK: Tensor, inverse: Tensor | None, size: int) -> Tensor:
    if inverse is not None:  # a full permutation: a gather
        return y_ND.index_select(0, inverse)
    out = y_ND.new_zeros(size, y_ND.shape[1])
    return out.index_copy_(0, rows_TK, y_ND)


class _GroupedLinearLoop(torch.autograd.Function):
    """y[rows of group e] = a[rows of group e] @ w[e] (+ b[e]): one GEMM per non-empty group."""

    @staticmethod
    def forward(ctx, a_NI: Tensor, w_EIO: Tensor, b_EO: Tensor | None, counts: list[int]):
        ctx.save_for_backward(a_NI, w_EIO)
        ctx.counts = counts
        ctx.has_bias = b_EO is not None
        out_NO = a_NI.new_empty(a_NI.shape[0], w_EIO.shape[-1])
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            end = start + n
            if b_EO is None:
                torch.mm(a_NI[start:end], w_EIO[e], out=out_NO[start:end])
            else:
                torch.addmm(b_EO[e], a_NI[start:end], w_EIO[e], out=out_NO[start:end])
            start = end
        return out_NO

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_NO: Tensor):
        a_NI, w_EIO = ctx.saved_tensors
        need_a, need_w, need_b = ctx.needs_input_grad[:3]
        grad_a = torch.empty_like(a_NI) if need_a else None
        grad_w = torch.zeros_like(w_EIO) if need_w else None
        grad_b = grad_NO.new_zeros(w_EIO.shape[0], w_EIO.shape[-1]) if need_b else None
        grad_NO = grad_NO.contiguous()
        start = 0
        for e, n in enumerate(ctx.counts):
            if n == 0:
                continue
            end = start + n
            g = grad_NO[start:end]
            if need_a:
                torch.mm(g, w_EIO[e].t(), out=grad_a[start:end])
            if need_w:
                torch.mm(a_NI[start:end].t(), g, out=grad_w[e])
            if need_b:
                torch.sum(g, dim=0, out=grad_b[e])
            start = end
        return grad_a, grad_w, grad_b, None


def grouped_mm_available() -> bool:
    """Whether this torch has torch._grouped_mm at all."""
    return hasattr(torch, "_grouped_mm")


def grouped_mm_fast(device: torch.device, dtype: torch.dtype, dims: tuple[int, ...]) -> bool:
    """Whether torch._grouped_mm is the fast choice: CUDA sm90+, bf16, 16-byte aligned dims.

    On CPU (any dtype) it measured ~3x slower than one GEMM per expert (torch 2.13, 2 cores).
    """
    if not grouped_mm_available() or device.type != "cuda" or dtype != torch.bfloat16:
        return False
    if torch.cuda.get_device_capability(device) < (9, 0):
        return False
    return all(d % 8 == 0 for d in dims)


def _grouped_linear(
    a_NI: Tensor,
    w_EIO: Tensor,
    b_EO: Tensor | None,
    counts: list[int] | None,
    offsets: Tensor,
    expert_of_row: Tensor | None,
    use_grouped_mm: bool,
) -> Tensor:
    if use_grouped_mm:
        y = torch._grouped_mm(a_NI, w_EIO, offs=offsets)
        return y if b_EO is None else y + b_EO.index_select(0, expert_of_row)
    return _GroupedLinearLoop.apply(a_NI, w_EIO, b_EO, counts)


def grouped_backend(
    experts: Experts,
    x_TD: Tensor,
    ids_TK: Tensor,
    weights_TK: Tensor,
    keep_TK: Tensor | None,
    *,
    force_grouped_mm: bool = False,
) -> Tensor:
    """Sort (token, slot) pairs by expert, run each expert on its contiguous rows, gather back."""
    num_tokens, d_model = x_TD.shape
    top_k = ids_TK.shape[1]
    num_experts = experts.num_experts
    flat_ids = ids_TK.reshape(-1)
    rows_TK = torch.argsort(flat_ids, stable=True)
    inverse = None
    if keep_TK is not None:
        rows_TK = rows_TK[keep_TK.reshape(-1).index_select(0, rows_TK)]
        flat_ids = flat_ids.index_select(0, rows_TK)
    else:
        inverse = torch.empty_like(rows_TK)
        inverse[rows_TK] = torch.arange(rows_TK.numel(), device=rows_TK.device)
        flat_ids = flat_ids.index_select(0, rows_TK)
    counts_E = torch.bincount(flat_ids, minlength=num_experts)

    use_mm = force_grouped_mm or grouped_mm_fast(
        x_TD.device, x_TD.dtype, (d_model, experts.w_in.shape[-1], experts.d_hidden)
    )
    if use_mm:
        if not grouped_mm_available():
            raise HyperRouterError("backend 'grouped_mm' needs torch._grouped_mm (torch >= 2.8)")
        counts, offsets, expert_of_row = None, counts_E.cumsum(0).to(torch.int32), flat_ids
    else:
        counts, offsets, expert_of_row = counts_E.tolist(), None, None

    x_ND = _Dispatch.apply(x_TD, rows_TK, inverse, top_k)
    h = _grouped_linear(x_ND, experts.w_in, experts.b_in, counts, offsets, expert_of_row, use_mm)
    a = experts.hidden(h)
    y_ND = _grouped_linear(a, experts.w_out, experts.b_out, counts, offsets, expert_of_row, use_mm)
    y_TKD = _Undispatch.apply(y_ND, rows_TK, inverse, num_tokens * top_k)
    w_TK = weights_TK.to(y_TKD.dtype)
    if top_k == 1:
        return y_TKD * w_TK
    return torch.bmm(w_TK.unsqueeze(1), y_TKD.view(num_tokens, top_k, d_model)).squeeze(1)


def grouped_mm_backend(experts, x_TD, ids_TK, weights_TK, keep_TK) -> Tensor:
    """The grouped path with torch._grouped_mm forced for both linear layers."""
    return grouped_backend(experts, x_TD, ids_TK, weights_TK, keep_TK, force_grouped_mm=True)


Backend = Callable[[Experts, Tensor, Tensor, Tensor, "Tensor | None"], Tensor]

BACKEND_FUNCTIONS: dict[str, Backend] = {
    "reference": reference_backend,
    "grouped": grouped_backend,
    "grouped_mm": grouped_mm_backend,
    "dense": dense_backend,
}


def choose_backend(
    num_tokens: int, num_experts: int, top_k: int, device: torch.device, dtype: torch.dtype
) -> str:
    """The backend `auto` runs for a call: dense when every expert is used, else grouped.

    Calibrated by `hyperrouter bench layer`: the dense path costs E/k times the active compute,
    so it only pays when k = E; the grouped path stays within ~10% of the dense floor for k < E.
    """
    if top_k >= num_experts:
        return "dense"
    return "grouped"


def capacity_keep_mask(ids_TK: Tensor, num_experts: int, capacity: int) -> Tensor:
    """[T, K] bool: which (token, slot) pairs fit their expert's capacity, first come first served
    in token order (earlier tokens win; a token's slots are independent)."""
    flat_ids = ids_TK.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    counts_E = torch.bincount(flat_ids, minlength=num_experts)
    starts_E = counts_E.cumsum(0) - counts_E
    sorted_ids = flat_ids.index_select(0, order)
    rank = torch.arange(order.numel(), device=ids_TK.device) - starts_E.index_select(0, sorted_ids)
    keep = torch.empty_like(flat_ids, dtype=torch.bool)
    keep[order] = rank < capacity
    return keep.view_as(ids_TK)


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Assignments each expert may take: ceil(T * k / E * capacity_factor) (Switch, generalised)."""
    return max(1, math.ceil(num_tokens * top_k / num_experts * capacity_factor))
