"""Expert weights stacked as [E, ...] tensors and the backends that compute with them.

Every backend takes the same weights and the same routing and returns the same result:

    out[t] = sum_k weights[t, k] * expert_{ids[t, k]}(x[t])

- `reference`:  a readable loop over experts with boolean masks and plain autograd. The yardstick.
- `grouped`:    a stable argsort of the (token, slot) pairs by expert, then for each expert its
                contiguous rows: gather the tokens, two GEMMs, scale by the combine weight and add
                into the output; the backward is written by hand in the same loop. Per-expert
                working sets stay small and nothing of size [T*k, d_hidden] is allocated besides
                the saved activations, which is what makes it fast on CPUs. On CUDA with bf16 and
                torch._grouped_mm (sm90+) it uses the `grouped_mm` path instead.
- `grouped_mm`: the sorted rows gathered once, torch._grouped_mm for both linear layers, autograd
                for the rest; combine by gathering back and a batched weighted sum (no atomics).
- `dense`:      every expert on every token (weights zero for unselected experts); the same loop
                with no gather at all. Costs E/k times the active compute, so it is for k = E.

All paths are deterministic: the only accumulations are per-token sums in a fixed expert order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from hyperrouter.errors import HyperRouterError
from hyperrouter.routers.capacity import capacity_keep_mask, expert_capacity  # noqa: F401

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "swiglu")
BACKENDS = ("auto", "reference", "grouped", "grouped_mm", "dense")


class ExpertWeights(NamedTuple):
    """The four stacked tensors a backend computes with (possibly cast for autocast)."""

    w_in: Tensor
    b_in: Tensor | None
    w_out: Tensor
    b_out: Tensor | None


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
        a = _activate(self.activation, h)
        return F.dropout(a, self.dropout, self.training) if self.dropout > 0 else a

    def weights(self, dtype: torch.dtype | None = None) -> ExpertWeights:
        """The parameters, cast to `dtype` (autocast) when given; the cast is differentiable."""

        def cast(t: Tensor | None) -> Tensor | None:
            return t if t is None or dtype is None or t.dtype == dtype else t.to(dtype)

        return ExpertWeights(cast(self.w_in), cast(self.b_in), cast(self.w_out), cast(self.b_out))

    def expert_forward(self, e: int, x_ND: Tensor, weights: ExpertWeights | None = None) -> Tensor:
        """Expert e applied to rows x_ND, written the obvious way (used by `reference`)."""
        w = weights or self.weights()
        h = x_ND @ w.w_in[e]
        if w.b_in is not None:
            h = h + w.b_in[e]
        y = self.hidden(h) @ w.w_out[e]
        if w.b_out is not None:
            y = y + w.b_out[e]
        return y


def _activate(activation: str, h: Tensor) -> Tensor:
    if activation == "relu":
        return F.relu(h)
    if activation == "gelu":
        return F.gelu(h)
    if activation == "gelu_tanh":  # GPT-2's gelu_new: the tanh approximation
        return F.gelu(h, approximate="tanh")
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


# --------------------------------------------------------------------------- reference


def reference_backend(
    experts: Experts,
    weights: ExpertWeights,
    x_TD: Tensor,
    ids_TK: Tensor,
    weights_TK: Tensor,
    keep_TK: Tensor | None,
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
        y_ND = experts.expert_forward(e, x_TD[token_idx], weights)
        w_N1 = weights_TK[token_idx, slot_idx].unsqueeze(-1).to(y_ND.dtype)
        out_TD = out_TD.index_add(0, token_idx, y_ND * w_N1)
    return out_TD


# --------------------------------------------------------------------------- the expert loop


@dataclass
class _LoopPlan:
    """Which rows each expert computes. `tokens` is None in dense mode (every expert, all tokens);
    otherwise expert e takes tokens[starts[e]:starts[e]+counts[e]] with weights `row_weights`."""

    counts: list[int]
    tokens: Tensor | None
    row_weights: Tensor  # [N] sorted mode, [T, E] dense mode


def _loop_forward(
    x_TD: Tensor,
    plan: _LoopPlan,
    w_in: Tensor,
    b_in: Tensor | None,
    w_out: Tensor,
    b_out: Tensor | None,
    activation: str,
    dropout: float,
    save: bool,
) -> tuple[Tensor, list[Tensor | None], list[Tensor | None], list[Tensor | None]]:
    """Run every expert on its rows and add its weighted output into out [T, D].

    With save=True also returns, per expert (None for an expert without rows), what the backward
    needs: the first layer's output (after ReLU for relu, before the activation otherwise), the
    dropout keep-mask and the expert's unweighted output (for the gradient of the combine
    weights). They are separate per-expert tensors rather than slices of one [T*k, width] buffer:
    on glibc a buffer that large is a fresh mmap on every call whose pages are zero-filled on
    first touch (~170 MB per SwiGLU training step at k = 8, see docs/PERFORMANCE.md); per-expert
    blocks are smaller and are recycled by the allocator.
    """
    dense = plan.tokens is None
    width, d_model = w_in.shape[-1], x_TD.shape[1]
    num_experts = len(plan.counts)
    hidden: list[Tensor | None] = [None] * num_experts
    keeps: list[Tensor | None] = [None] * num_experts
    outputs: list[Tensor | None] = [None] * num_experts
    out_TD = torch.zeros_like(x_TD)
    start = 0
    for e, n in enumerate(plan.counts):
        if n == 0:
            continue
        rows = slice(start, start + n)
        start += n
        x_e = x_TD if dense else x_TD.index_select(0, plan.tokens[rows])
        h_e = x_TD.new_empty(n, width)
        if save:
            hidden[e] = h_e
        _linear_into(h_e, x_e, w_in[e], None if b_in is None else b_in[e])
        if activation == "relu":
            a_e = h_e.relu_()
        elif activation == "swiglu":  # no autograd here, so in place is safe (one buffer less)
            gate, up = h_e.chunk(2, dim=-1)
            a_e = F.silu(gate).mul_(up)
        else:
            a_e = _activate(activation, h_e)
        if dropout > 0:
            keep = torch.rand_like(a_e) >= dropout  # faster than bernoulli_ on CPU
            if save:
                keeps[e] = keep
            a_e = a_e * keep * (1.0 / (1.0 - dropout))
        y_e = x_TD.new_empty(n, d_model)
        if save:
            outputs[e] = y_e
        _linear_into(y_e, a_e, w_out[e], None if b_out is None else b_out[e])
        if dense:
            out_TD.addcmul_(y_e, plan.row_weights[:, e : e + 1])
        else:
            weighted = (
                y_e * plan.row_weights[rows, None]
                if save
                else y_e.mul_(plan.row_weights[rows, None])
            )
            out_TD.index_add_(0, plan.tokens[rows], weighted)
    return out_TD, hidden, keeps, outputs


def _linear_into(out: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    if bias is None:
        torch.mm(x, weight, out=out)
    else:
        torch.addmm(bias, x, weight, out=out)


class _ExpertLoop(torch.autograd.Function):
    """The `grouped` (sorted rows) and `dense` (all tokens) expert computation with its backward."""

    @staticmethod
    def forward(ctx, x_TD, row_weights, w_in, b_in, w_out, b_out, plan, activation, dropout):
        plan = _LoopPlan(plan.counts, plan.tokens, row_weights)
        out_TD, hidden, keeps, outputs = _loop_forward(
            x_TD, plan, w_in, b_in, w_out, b_out, activation, dropout, save=True
        )
        ctx.save_for_backward(
            x_TD, row_weights, w_in, b_in, w_out, b_out, *hidden, *keeps, *outputs
        )
        ctx.plan = plan
        ctx.activation = activation
        ctx.dropout = dropout
        return out_TD

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_TD: Tensor):
        plan: _LoopPlan = ctx.plan
        num_experts = len(plan.counts)
        x_TD, row_weights, w_in, b_in, w_out, b_out, *per_expert_saved = ctx.saved_tensors
        hidden = per_expert_saved[:num_experts]
        keeps = per_expert_saved[num_experts : 2 * num_experts]
        outputs = per_expert_saved[2 * num_experts :]
        dense = plan.tokens is None
        needs = ctx.needs_input_grad
        grad_TD = grad_TD.contiguous()
        grad_x = torch.zeros_like(x_TD) if needs[0] else None
        # Every row of grad_rw and every expert's slice of the weight gradients is written by the
        # loop below, except the slices of experts that got no rows: only those are zeroed.
        grad_rw = torch.empty_like(row_weights) if needs[1] else None
        grad_w_in = torch.empty_like(w_in) if needs[2] else None
        grad_b_in = torch.empty_like(b_in) if b_in is not None and needs[3] else None
        grad_w_out = torch.empty_like(w_out) if needs[4] else None
        grad_b_out = torch.empty_like(b_out) if b_out is not None and needs[5] else None
        per_expert = [g for g in (grad_w_in, grad_b_in, grad_w_out, grad_b_out) if g is not None]
        scale = 1.0 / (1.0 - ctx.dropout) if ctx.dropout > 0 else 1.0
        start = 0
        for e, n in enumerate(plan.counts):
            if n == 0:
                for g in per_expert:
                    g[e].zero_()
                continue
            rows = slice(start, start + n)
            start += n
            tokens = None if dense else plan.tokens[rows]
            gy = grad_TD if dense else grad_TD.index_select(0, tokens)
            if grad_rw is not None:  # d out / d weight = the expert's unweighted output
                g_weight = (gy * outputs[e]).sum(1)
                if dense:
                    grad_rw[:, e] = g_weight
                else:
                    grad_rw[rows] = g_weight
            w_e = (row_weights[:, e] if dense else row_weights[rows]).unsqueeze(1)
            gy = gy * w_e if dense else gy.mul_(w_e)  # never scale grad_TD itself in place
            saved_h, keep = hidden[e], keeps[e]
            a_e, silu_gate = _activation_of_saved(ctx.activation, saved_h)
            if keep is not None:
                a_e = a_e * keep * scale
            if grad_w_out is not None:
                torch.mm(a_e.t(), gy, out=grad_w_out[e])
            if grad_b_out is not None:
                torch.sum(gy, 0, out=grad_b_out[e])
            ga = gy @ w_out[e].t()
            if keep is not None:
                ga.mul_(keep).mul_(scale)
            gh = _activation_backward(ctx.activation, ga, saved_h, silu_gate)
            x_e = x_TD if dense else x_TD.index_select(0, tokens)
            if grad_w_in is not None:
                torch.mm(x_e.t(), gh, out=grad_w_in[e])
            if grad_b_in is not None:
                torch.sum(gh, 0, out=grad_b_in[e])
            if grad_x is not None:
                if dense:
                    grad_x.addmm_(gh, w_in[e].t())
                else:
                    grad_x.index_add_(0, tokens, gh @ w_in[e].t())
        return grad_x, grad_rw, grad_w_in, grad_b_in, grad_w_out, grad_b_out, None, None, None


def _activation_of_saved(activation: str, saved_h: Tensor) -> tuple[Tensor, Tensor | None]:
    """The activation output recomputed from what the loop saved (relu(h) for relu, h otherwise),
    and for SwiGLU also silu(gate), which its backward needs too (computed once for both)."""
    if activation == "relu":
        return saved_h, None
    if activation == "swiglu":
        gate, up = saved_h.chunk(2, dim=-1)
        silu_gate = F.silu(gate)
        return silu_gate * up, silu_gate
    return _activate(activation, saved_h), None


def _activation_backward(
    activation: str, grad_a: Tensor, saved_h: Tensor, silu_gate: Tensor | None
) -> Tensor:
    """d loss / d h from d loss / d a; `saved_h` is relu(h) for relu and h otherwise, `silu_gate`
    is silu of the gate half for SwiGLU (from `_activation_of_saved`).

    For SwiGLU `grad_a` is overwritten and both halves are written straight into one
    [n, 2 * d_hidden] buffer.
    """
    if activation == "relu":
        return torch.ops.aten.threshold_backward(grad_a, saved_h, 0)
    if activation == "gelu":
        return torch.ops.aten.gelu_backward(grad_a, saved_h)
    if activation == "gelu_tanh":
        return torch.ops.aten.gelu_backward(grad_a, saved_h, approximate="tanh")
    gate, up = saved_h.chunk(2, dim=-1)
    width = gate.shape[-1]
    grad_h = torch.empty_like(saved_h)
    torch.mul(grad_a, silu_gate, out=grad_h[:, width:])
    torch.ops.aten.silu_backward.grad_input(grad_a.mul_(up), gate, grad_input=grad_h[:, :width])
    return grad_h


def _run_loop(experts: Experts, weights: ExpertWeights, x_TD: Tensor, plan: _LoopPlan) -> Tensor:
    dropout = experts.dropout if experts.training else 0.0
    args = tuple(weights)
    tensors = (x_TD, plan.row_weights, *args)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return _ExpertLoop.apply(x_TD, plan.row_weights, *args, plan, experts.activation, dropout)
    out, *_ = _loop_forward(x_TD, plan, *args, experts.activation, dropout, save=False)
    return out


def _sort_by_expert(
    ids_TK: Tensor, keep_TK: Tensor | None, num_experts: int
) -> tuple[Tensor, Tensor]:
    """Positions t*K+k of the (kept) pairs in expert order (stable), and the rows per expert."""
    flat_ids = ids_TK.reshape(-1)
    rows = torch.argsort(flat_ids, stable=True)
    if keep_TK is not None:
        rows = rows[keep_TK.reshape(-1).index_select(0, rows)]
    counts_E = torch.bincount(flat_ids.index_select(0, rows), minlength=num_experts)
    return rows, counts_E


def grouped_backend(
    experts: Experts,
    weights: ExpertWeights,
    x_TD: Tensor,
    ids_TK: Tensor,
    weights_TK: Tensor,
    keep_TK: Tensor | None,
) -> Tensor:
    """Sorted rows per expert through the expert loop (or torch._grouped_mm where that is fast)."""
    if grouped_mm_fast(x_TD.device, x_TD.dtype, experts):
        return grouped_mm_backend(experts, weights, x_TD, ids_TK, weights_TK, keep_TK)
    top_k = ids_TK.shape[1]
    rows, counts_E = _sort_by_expert(ids_TK, keep_TK, experts.num_experts)
    tokens = torch.div(rows, top_k, rounding_mode="floor")
    row_weights = weights_TK.reshape(-1).index_select(0, rows).to(x_TD.dtype)
    return _run_loop(experts, weights, x_TD, _LoopPlan(counts_E.tolist(), tokens, row_weights))


def dense_backend(
    experts: Experts,
    weights: ExpertWeights,
    x_TD: Tensor,
    ids_TK: Tensor,
    weights_TK: Tensor,
    keep_TK: Tensor | None,
) -> Tensor:
    """Every expert on every token with [T, E] combine weights (0 where not selected); no gather."""
    num_tokens, num_experts = x_TD.shape[0], experts.num_experts
    w_TK = weights_TK.to(x_TD.dtype)
    if keep_TK is not None:
        w_TK = w_TK * keep_TK
    # scatter_add: routers that pad their slots (expert choice) may repeat an expert in a token's
    # row with weight 0 there; a plain scatter would let either write win
    w_TE = x_TD.new_zeros(num_tokens, num_experts).scatter_add(1, ids_TK, w_TK)
    return _run_loop(experts, weights, x_TD, _LoopPlan([num_tokens] * num_experts, None, w_TE))


# --------------------------------------------------------------------------- torch._grouped_mm


class _PermuteRows(torch.autograd.Function):
    """out = src[index] for a permutation-like `index`; backward gathers with `back_index` or, when
    rows were dropped (back_index None), writes the gradient rows back into zeros."""

    @staticmethod
    def forward(ctx, src: Tensor, index: Tensor, back_index: Tensor | None) -> Tensor:
        ctx.save_for_backward(index, back_index)
        ctx.num_src_rows = src.shape[0]
        return src.index_select(0, index)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        index, back_index = ctx.saved_tensors
        if back_index is not None:
            return grad.index_select(0, back_index), None, None
        out = grad.new_zeros(ctx.num_src_rows, grad.shape[1])
        return out.index_copy_(0, index, grad), None, None


def grouped_mm_available() -> bool:
    """Whether this torch has torch._grouped_mm at all."""
    return hasattr(torch, "_grouped_mm")


def grouped_mm_fast(device: torch.device, dtype: torch.dtype, experts: Experts) -> bool:
    """Whether torch._grouped_mm is the fast choice: CUDA sm90+, bf16, 16-byte aligned widths.

    On CPU (torch 2.13, fp32, 2 cores) the expert loop measured faster in every case
    (benchmarks/grouped_mm_cpu.py): 1.3-2.2x in training with glibc's default allocator, whose
    fresh mmaps for this path's [T*k, width] buffers are most of the gap.
    """
    if not grouped_mm_available() or device.type != "cuda" or dtype != torch.bfloat16:
        return False
    if torch.cuda.get_device_capability(device) < (9, 0):
        return False
    return all(d % 8 == 0 for d in (experts.d_model, experts.d_hidden))


def grouped_mm_backend(
    experts: Experts,
    weights: ExpertWeights,
    x_TD: Tensor,
    ids_TK: Tensor,
    weights_TK: Tensor,
    keep_TK: Tensor | None,
) -> Tensor:
    """Sorted rows gathered once, torch._grouped_mm for both layers, gathered back, weighted sum."""
    if not grouped_mm_available():
        raise HyperRouterError("backend 'grouped_mm' needs torch._grouped_mm (torch >= 2.8)")
    num_tokens, d_model = x_TD.shape
    top_k = ids_TK.shape[1]
    num_pairs = num_tokens * top_k
    rows, counts_E = _sort_by_expert(ids_TK, keep_TK, experts.num_experts)
    offsets = counts_E.cumsum(0).to(torch.int32)
    inverse = None
    if keep_TK is None:  # a full permutation: the way back is a gather too
        inverse = torch.empty_like(rows)
        inverse[rows] = torch.arange(num_pairs, device=rows.device)
    # dispatch: pair rows in (token, slot) order, then permuted into expert order
    x_PD = x_TD.unsqueeze(1).expand(num_tokens, top_k, d_model).reshape(num_pairs, d_model)
    x_ND = _PermuteRows.apply(x_PD, rows, inverse)
    expert_of_row = None
    if weights.b_in is not None or weights.b_out is not None:
        expert_of_row = torch.repeat_interleave(
            torch.arange(experts.num_experts, device=x_TD.device),
            counts_E,
            output_size=rows.numel(),
        )
    h = torch._grouped_mm(x_ND, weights.w_in, offs=offsets)
    if weights.b_in is not None:
        h = h + weights.b_in.index_select(0, expert_of_row)
    y_ND = torch._grouped_mm(experts.hidden(h), weights.w_out, offs=offsets)
    if weights.b_out is not None:
        y_ND = y_ND + weights.b_out.index_select(0, expert_of_row)
    if inverse is not None:
        y_PD = _PermuteRows.apply(y_ND, inverse, rows)
    else:
        y_PD = y_ND.new_zeros(num_pairs, d_model).index_copy(0, rows, y_ND)
    w_TK = weights_TK.to(y_PD.dtype)
    return torch.bmm(w_TK.unsqueeze(1), y_PD.view(num_tokens, top_k, d_model)).squeeze(1)


# --------------------------------------------------------------------------- choice and capacity

Backend = Callable[[Experts, ExpertWeights, Tensor, Tensor, Tensor, "Tensor | None"], Tensor]

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

    Calibrated with `hyperrouter bench layer`: the dense path costs E/k times the active compute,
    so it only pays when k = E, where it saves the sort and the gathers.
    """
    if top_k >= num_experts:
        return "dense"
    return "grouped"
