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

from hyperrouter.routers import Routing


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


def off_node_fraction(
    routing: Routing, sequence_ids: Tensor | None, num_experts: int, num_nodes: int
) -> float:
    """Share of the kept (token, slot) pairs whose expert sits on another (virtual) node than the
    token: experts placed contiguously, node(e) = e * nodes // E; a token's home node is its
    sequence id mod nodes (its position mod nodes without sequence ids). The communication an
    expert-parallel layer over `num_nodes` nodes would pay, as LocMoE counts it."""
    ids = routing.expert_ids
    if ids.numel() == 0:
        return 0.0
    keep = routing.keep if routing.keep is not None else torch.ones_like(ids, dtype=torch.bool)
    if sequence_ids is None:
        sequence_ids = torch.arange(ids.shape[0])
    home = torch.remainder(sequence_ids.long(), num_nodes).unsqueeze(1)
    node = torch.div(ids * num_nodes, num_experts, rounding_mode="floor")
    off = (node != home) & keep
    return float(off.sum()) / max(int(keep.sum()), 1)


def first_choice(routing: Routing) -> Tensor:
    """Each token's first choice: the expert of its highest-weight slot (kept or not): [T]."""
    if routing.expert_ids.shape[0] == 0:
        return routing.expert_ids.new_zeros(0)
    slot = routing.weights.argmax(-1, keepdim=True)
    return routing.expert_ids.gather(1, slot).squeeze(1)


def expert_sets(routing: Routing, num_experts: int) -> Tensor:
    """[T, E] bool: the experts each token really used (kept slots only)."""
    keep = routing.keep
    if keep is None:
        keep = torch.ones_like(routing.expert_ids, dtype=torch.bool)
    sets = torch.zeros(routing.expert_ids.shape[0], num_experts, dtype=torch.long)
    sets.scatter_add_(1, routing.expert_ids.cpu(), keep.long().cpu())
    return sets > 0


def routing_agreement(a: Routing, b: Routing, num_experts: int) -> dict[str, float]:
    """How two routings of the same tokens differ (e.g. two checkpoints' routers): the share of
    tokens whose first choice changed and the mean Jaccard overlap of the expert sets they used
    (tokens that used no expert in either count as agreeing)."""
    changed = (first_choice(a) != first_choice(b)).double().mean()
    set_a, set_b = expert_sets(a, num_experts), expert_sets(b, num_experts)
    inter = (set_a & set_b).sum(-1).double()
    union = (set_a | set_b).sum(-1).double()
    jaccard = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
    return {"top1_changed": float(changed), "topk_jaccard": float(jaccard.mean())}


def histogram(values: Tensor, bins: int, low: float, high: float) -> dict[str, list[float]]:
    """Counts of `values` in `bins` equal bins over [low, high] (JSON-friendly)."""
    counts = torch.histc(values.float(), bins=bins, min=low, max=high)
    edges = torch.linspace(low, high, bins + 1)
    return {"edges": [round(float(e), 6) for e in edges], "counts": [int(c) for c in counts]}
