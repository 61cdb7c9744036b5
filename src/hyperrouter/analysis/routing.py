"""Routing statistics as pure functions of tensors, so each can be checked on constructed cases.

- entropy of the full router softmax per token (nats; 0 = one expert certain, ln E = uniform);
- expert load (assignments per expert) and its coefficient of variation std/mean (0 = balanced,
  sqrt(E - 1) when every token goes to one expert);
- expert diversity: mean pairwise cosine similarity of different experts' outputs on the same
  tokens (1 = identical experts, the representation-collapse end);
- routing agreement between two checkpoints on the same tokens.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor


def entropy_per_token(logits_TE: Tensor) -> Tensor:
    """Entropy (nats) of softmax(logits) for each token: [T]."""
    log_p = torch.log_softmax(logits_TE.double(), dim=-1)
    return -(log_p.exp() * log_p).sum(-1).float()


def expert_load(ids_TK: Tensor, num_experts: int) -> Tensor:
    """Number of (token, slot) assignments each expert received: [E]."""
    return torch.bincount(ids_TK.reshape(-1), minlength=num_experts)


def coefficient_of_variation(counts_E: Tensor) -> float:
    """std / mean of the per-expert load (population std)."""
    counts = counts_E.double()
    mean = counts.mean()
    if mean == 0:
        return 0.0
    return float(counts.std(unbiased=False) / mean)


def expert_similarity(outputs_END: Tensor) -> float:
    """Mean over tokens and over pairs e < f of cos(expert_e(x), expert_f(x)); outputs [E, N, D]."""
    num_experts = outputs_END.shape[0]
    if num_experts < 2:
        return 1.0
    unit = torch.nn.functional.normalize(outputs_END.double(), dim=-1)
    sims = [
        (unit[e] * unit[f]).sum(-1).mean() for e, f in itertools.combinations(range(num_experts), 2)
    ]
    return float(torch.stack(sims).mean())


def routing_agreement(logits_a_TE: Tensor, logits_b_TE: Tensor, top_k: int) -> dict[str, float]:
    """How two routers (e.g. two checkpoints) route the same tokens differently: the share of
    tokens whose top-1 expert changed and the mean Jaccard overlap of their top-k expert sets."""
    changed = (logits_a_TE.argmax(-1) != logits_b_TE.argmax(-1)).double().mean()
    set_a = torch.zeros_like(logits_a_TE, dtype=torch.bool).scatter_(
        1, logits_a_TE.topk(top_k, -1).indices, True
    )
    set_b = torch.zeros_like(logits_b_TE, dtype=torch.bool).scatter_(
        1, logits_b_TE.topk(top_k, -1).indices, True
    )
    inter = (set_a & set_b).sum(-1).double()
    union = (set_a | set_b).sum(-1).double()
    return {"top1_changed": float(changed), "topk_jaccard": float((inter / union).mean())}


def histogram(values: Tensor, bins: int, low: float, high: float) -> dict[str, list[float]]:
    """Counts of `values` in `bins` equal bins over [low, high] (JSON-friendly)."""
    counts = torch.histc(values.float(), bins=bins, min=low, max=high)
    edges = torch.linspace(low, high, bins + 1)
    return {"edges": [round(float(e), 6) for e in edges], "counts": [int(c) for c in counts]}
