"""MoE++'s zero-computation experts and heterogeneous balance loss (layer options of `MoE`).

Jin, Zhu, Yan, Yuan 2025 (ICLR 2025), "MoE++: Accelerating Mixture-of-Experts Methods with
Zero-Computation Experts", arXiv 2410.07348 (code: SkyworkAI/MoE-plus-plus,
`moe_plus_plus_layer.py`). Beside the E FFN experts a layer has experts that cost (almost) nothing:
- zero expert: E(x) = 0 (the token "skips" that slot);
- copy expert: E(x) = x;
- constant expert j: E(x) = a_1 x + a_2 v_j, [a_1, a_2] = softmax(W_c^j x), with a trainable
  vector v_j ~ N(0, 1) and W_c^j in R^{2 x d} (no bias), as in the reference code.
The router scores all E + Z experts; a token's slots on zero-computation experts cost no FFN, so
the number of FFN experts per token varies (`RoutingStats.mean_k` counts FFN experts only).
Expert ids: [0, E) the FFN experts, then the constant, copy and zero experts, in that order.

Heterogeneous load balance (the paper's Eq. for L_b): L_b = beta * (E + Z) * sum_i eta_i f_i P_i,
f_i the share of the call's kept (token, slot) pairs on expert i, P_i the mean full-softmax router
probability of expert i, eta_i = 1 for FFN experts and tau for zero-computation experts (paper:
tau = 0.75, beta = 0.01); the factor E + Z (Switch's N) makes it 1 * beta at a uniform routing
when tau = 1. Differences from the reference code: (1) the reference zeroes the zero expert's
gate and renormalises the other slots' weights (so a slot on the zero expert gives the token's
other expert all the weight); we keep the paper's form, sum_j g_j E_j(x) with E_zero(x) = 0, and
the weights as the router gives them; (2) the reference multiplies the layer input by k before
the experts (`reshaped_input *= MOE_TOP_K`, off under Mixtral gating); we do not; (3) its router is
a two-layer tanh MLP by default; ours is whichever registered router the layer uses.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hyperrouter.errors import HyperRouterError
from hyperrouter.routers.losses import at_least_fp32

KINDS = ("constant", "copy", "zero")


class ZeroComputationExperts(nn.Module):
    """The layer's zero-computation experts; global ids start at `first` (the FFN expert count)."""

    def __init__(self, d_model: int, first: int, constant: int, copy: int, zero: int) -> None:
        super().__init__()
        for name, value in (("constant_experts", constant), ("copy_experts", copy),
                            ("zero_experts", zero)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise HyperRouterError(f"{name} must be an integer >= 0, got {value!r}")
        self.first = first
        self.counts = {"constant": constant, "copy": copy, "zero": zero}
        self.num_experts = constant + copy + zero
        self.constant = nn.Parameter(torch.randn(constant, d_model))
        self.constant_gate = nn.Parameter(torch.empty(constant, 2, d_model))
        bound = d_model**-0.5  # nn.Linear(d, 2, bias=False)'s default initialisation
        nn.init.uniform_(self.constant_gate, -bound, bound)

    def kind_ranges(self) -> dict[str, tuple[int, int]]:
        """Each kind's global id range [start, stop)."""
        ranges, start = {}, self.first
        for kind in KINDS:
            ranges[kind] = (start, start + self.counts[kind])
            start += self.counts[kind]
        return ranges

    def forward(
        self, x_TD: Tensor, ids_TK: Tensor, weights_TK: Tensor, keep_TK: Tensor | None
    ) -> Tensor:
        """sum over each token's kept slots on zero-computation experts of w * E(x): [T, d]."""
        y_TD = x_TD.new_zeros(x_TD.shape)
        ranges = self.kind_ranges()
        kept = ids_TK >= self.first
        if keep_TK is not None:
            kept = kept & keep_TK
        w_TK = weights_TK.to(x_TD.dtype) * kept
        lo, hi = ranges["copy"]
        copy_T = (w_TK * ((ids_TK >= lo) & (ids_TK < hi))).sum(1)
        y_TD = y_TD + copy_T[:, None] * x_TD
        lo, hi = ranges["constant"]
        if hi > lo:
            is_const = (ids_TK >= lo) & (ids_TK < hi)
            w_const = w_TK * is_const  # [T, K]
            token_P, slot_P = is_const.nonzero(as_tuple=True)
            if token_P.numel():
                j_P = ids_TK[token_P, slot_P] - lo
                x_PD = x_TD.index_select(0, token_P)
                gate = self.constant_gate.to(x_TD.dtype)
                a_P2 = torch.softmax(at_least_fp32(torch.einsum("pd,pcd->pc", x_PD, gate[j_P])), -1)
                a_P2 = a_P2.to(x_TD.dtype)
                out_PD = a_P2[:, :1] * x_PD + a_P2[:, 1:] * self.constant.to(x_TD.dtype)[j_P]
                out_PD = w_const[token_P, slot_P][:, None] * out_PD
                y_TD = y_TD.index_add(0, token_P, out_PD)
        return y_TD

    def balance_loss(
        self, logits_TE: Tensor, ids_TK: Tensor, keep_TK: Tensor | None, tau: float
    ) -> Tensor:
        """MoE++'s heterogeneous balance loss (without beta): (E + Z) sum_i eta_i f_i P_i."""
        num_choices = logits_TE.shape[1]
        probs_TE = torch.softmax(at_least_fp32(logits_TE), dim=-1)
        flat = ids_TK.reshape(-1) if keep_TK is None else ids_TK[keep_TK]
        counts = torch.bincount(flat, minlength=num_choices).to(probs_TE.dtype)
        f_E = counts / counts.sum().clamp_min(1.0)
        p_E = probs_TE.mean(0)
        eta_E = torch.ones(num_choices, dtype=probs_TE.dtype, device=probs_TE.device)
        eta_E[self.first :] = tau
        return num_choices * (eta_E * f_E * p_E).sum()

    def shares(self, ids_TK: Tensor, keep_TK: Tensor | None) -> dict[str, Tensor]:
        """The share of the call's kept slots on each kind of expert (ffn, constant, copy, zero)."""
        flat = ids_TK.reshape(-1) if keep_TK is None else ids_TK[keep_TK]
        total = max(flat.numel(), 1)
        out = {"ffn_share": (flat < self.first).sum().float() / total}
        for kind, (lo, hi) in self.kind_ranges().items():
            out[f"{kind}_share"] = ((flat >= lo) & (flat < hi)).sum().float() / total
        return out

    def extra_repr(self) -> str:
        return ", ".join(f"{kind}={n}" for kind, n in self.counts.items())
