"""Auxiliary router losses: Switch load balance and router z-loss.

Both take the routed tokens only (callers drop padding before routing), so padding never skews them.
"""

from __future__ import annotations

import torch
from torch import Tensor


def at_least_fp32(t: Tensor) -> Tensor:
    """Router math runs in fp32 (or fp64 when the input is fp64) whatever the model's dtype."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def switch_balance_loss(logits_TE: Tensor, expert_ids_TK: Tensor) -> Tensor:
    """Switch Transformer balance loss N * sum_i f_i * P_i (minimum 1 when perfectly balanced).

    f_i is the fraction of the T*K (token, slot) assignments that went to expert i and P_i the mean
    full-softmax probability of expert i over the T tokens. (The HyperRouter/SMoE-Dropout reference
    divides P_i by T*K instead of T, which scales the loss by 1/K; we use the Switch definition.)
    """
    num_experts = logits_TE.shape[-1]
    probs_TE = torch.softmax(at_least_fp32(logits_TE), dim=-1)
    counts_E = torch.bincount(expert_ids_TK.reshape(-1), minlength=num_experts)
    fraction_E = counts_E.to(probs_TE.dtype) / max(expert_ids_TK.numel(), 1)
    mean_prob_E = probs_TE.mean(dim=0)
    return num_experts * torch.dot(fraction_E, mean_prob_E)


def router_z_loss(logits_TE: Tensor) -> Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2; keeps logits small."""
    return torch.logsumexp(at_least_fp32(logits_TE), dim=-1).square().mean()
