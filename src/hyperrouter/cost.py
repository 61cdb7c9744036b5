"""Analytic inference cost of a Transformer-XL (+ MoE) forward: multiply-adds per token, by part.

For an evaluation segment of `qlen` tokens per column with `mlen` tokens of memory (klen = mlen +
qlen keys), `batch` columns and k experts per token, per target token:

    attention projections  L (2 d H Dh klen / qlen + 2 d H Dh) + d H Dh klen / (qlen batch)
                           (k and v of every key row, memory included; q of the segment's own
                           rows only; the output projection; the positional projection r_net of
                           the klen relative positions, once per segment)
    attention scores       L 3 H Dh klen      (q.k, q.r, and prob.v: the relative-position term
                                              costs as much as the content term)
    experts                per MoE layer: k (d h g + h d) (g = 2 for SwiGLU's gate and up
                           columns), plus the shared experts; fine-grained experts have h / m
    router                 per MoE layer: d E for a linear gate (X-MoE: d low + low E;
                           HyperRouter adds its hypernetwork, run once per call)
    dense FFN              per dense layer: 2 d d_inner
    softmax                the output layer over the vocabulary: d V (d_embed projections added;
                           an adaptive softmax counts its head and each tail cluster weighted by
                           the cluster's share of the vocabulary, an approximation: the real
                           cost follows the targets' frequencies)

Element-wise work (softmax exponentials, LayerNorm, masking, the relative shift's copies) is not
a multiply-add and is not counted, although it costs time: `hyperrouter bench model --profile`
shows where the time goes. `macs_per_token` is checked against torch's FlopCounterMode on the
same forward (tests/test_cost.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from hyperrouter.models.transformer_xl import TransformerXL

PARTS = (
    "attention_projections",
    "attention_scores",
    "experts",
    "router",
    "dense_ffn",
    "softmax",
)


@dataclass(frozen=True)
class Shape:
    """The evaluation segment the cost is for: tokens per column, memory, columns."""

    qlen: int
    mlen: int
    batch: int


def _router_macs(moe, tokens_per_call: int) -> float:
    router = moe.router
    d, num_experts = moe.d_model, moe.num_experts
    if hasattr(router, "hypernet"):  # the generated gate, plus the hypernetwork once per call
        first, second = router.hypernet[0], router.hypernet[2]
        hyper = first.in_features * first.out_features + second.in_features * second.out_features
        return d * num_experts + hyper / tokens_per_call
    if hasattr(router, "reduction"):  # X-MoE: projection to low_dim, then cosine to E embeddings
        low = router.reduction.out_features
        return d * low + low * num_experts
    if getattr(router, "uses_all_experts", False) and not hasattr(router, "gate"):
        return 0.0
    if hasattr(router, "gate") or hasattr(router, "hypernet"):
        return float(d * num_experts)
    return 0.0  # routers without a gate (hash, ...)


def _expert_macs(moe, k: float) -> float:
    ex = moe.experts
    per = ex.d_model * ex.w_in.shape[-1] + ex.d_hidden * ex.d_model
    k_eff = moe.num_experts if moe.router.uses_all_experts else k
    total = k_eff * per
    if moe.shared is not None:
        sh = moe.shared
        total += sh.num_experts * (sh.d_model * sh.w_in.shape[-1] + sh.d_hidden * sh.d_model)
    return float(total)


def _softmax_macs(model: TransformerXL) -> float:
    crit = model.crit
    d_proj = model.config.d_model
    ends = list(getattr(crit, "cutoff_ends", [0, model.n_token]))
    n_token = model.n_token
    if len(ends) <= 2:  # one cluster: the full softmax
        d_embed = model.config.d_embed or d_proj
        projection = d_proj * d_embed if d_embed != d_proj else 0
        return float(projection + d_embed * n_token)
    # adaptive: the head (shortlist + one logit per tail cluster), tails by vocabulary share
    div_val = model.config.div_val
    d_embed = model.config.d_embed or d_proj
    total = 0.0
    for i in range(len(ends) - 1):
        d_i = d_embed // (div_val**i)
        size = ends[i + 1] - ends[i]
        projection = d_proj * d_i if d_i != d_proj else 0
        if i == 0:
            total += projection + d_i * (size + len(ends) - 2)
        else:
            total += (projection + d_i * size) * size / n_token
    return total


def moe_layer_k(moe, k: float | Sequence[float] | None, index: int) -> float:
    """The k of the `index`-th MoE layer `moe` for `macs_per_token`'s `k` argument (None: the
    layer's own k; a number: every layer's; a sequence: one per MoE layer)."""
    if k is None:
        return moe.top_k
    if isinstance(k, (int, float)):
        return k
    return k[index]


def macs_per_token(
    model: TransformerXL, shape: Shape, k: float | Sequence[float] | None = None
) -> dict[str, float]:
    """Multiply-adds per target token of one evaluation forward, by part (`PARTS`), at k experts
    per token (default: the model's current k): one number for every MoE layer, or one per MoE
    layer; a mean over tokens (a per-token policy's `mean_k`) may be fractional."""
    c = model.config
    d, heads, d_head = c.d_model, c.n_head, c.d_head
    klen = shape.mlen + shape.qlen
    out = dict.fromkeys(PARTS, 0.0)
    moe_index = 0
    for layer in model.layers:
        out["attention_projections"] += (
            2 * d * heads * d_head * klen / shape.qlen
            + d * heads * d_head
            + heads * d_head * d
            + d * heads * d_head * klen / (shape.qlen * shape.batch)
        )
        out["attention_scores"] += 3 * heads * d_head * klen
        moe = layer.ff.moe
        if moe is None:
            out["dense_ffn"] += 2 * d * layer.ff.core[0].out_features
        else:
            layer_k = moe_layer_k(moe, k, moe_index)
            moe_index += 1
            out["experts"] += _expert_macs(moe, layer_k)
            out["router"] += _router_macs(moe, shape.qlen * shape.batch)
    out["softmax"] = _softmax_macs(model)
    return out
