"""Per-token k: which of a token's routed slots an MoE layer keeps, chosen token by token.

A layer with a token policy (`MoE.token_policy`, `TransformerXL.set_token_policy`) routes every
token to its k_max best experts as usual, then keeps, per token, a prefix of them by decreasing
routing probability; the experts compute only the kept pairs (every backend skips dropped pairs;
the dense backend, which computes every expert anyway, zeroes their weights):

- `TopP(p)` (Huang et al. 2024, "Harder Tasks Need More Experts: Dynamic Routing in MoE
  Models", arXiv 2403.07652): the fewest experts whose cumulative routing probability reaches p,
  P = softmax(logits) over all E experts, experts sorted by P:
  keep expert j  <=>  sum of the P of the experts ranked before j < p  (the first always kept).
  p = 1 keeps all k_max slots.
- `WeightRatio(r)` (the dynamic expert skipping of Lu et al. 2024, "Not All Experts are Equal:
  Efficient Expert Pruning and Skipping for Mixture-of-Experts LLMs", arXiv 2402.14800, there
  for Mixtral's second expert with a threshold beta; here for every slot): keep slot j  <=>
  w_j >= r * max_i w_i, with w the router's combine weights. r = 0 keeps every slot.

Combine weights of the kept slots: with `renormalize=True` (default) they are rescaled so that
their sum is the sum the router gave all k_max slots: for routers that normalise over their
top-k (softmax over the selected logits: smoe, hyperrouter, smoe_dropout, mixtral-style) a token
that keeps m experts then gets exactly the weights static k = m would give it, so a policy is
"static k chosen per token". With `renormalize=False` the kept weights stay as the router gave
them (Huang et al.'s formulation, where the weights are the full-softmax probabilities P; Lu et
al. leave the remaining expert's weight unchanged as well).

The number of experts per token is reported by the layer's statistics (`RoutingStats.mean_k`).
Policies act at inference and in training alike (the keep mask carries no gradient; the
renormalised weights do). They need a router with scores (`Routing.logits`) for top-p, and a
router that picks experts per token (not one that uses or merges every expert).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from hyperrouter.errors import HyperRouterError


@dataclass(frozen=True)
class TokenPolicy:
    """Base of the per-token policies: `k_max` caps the slots a token may keep (None: every
    expert of the layer); `renormalize` as in the module docstring."""

    k_max: int | None = None
    renormalize: bool = True
    kind: ClassVar[str] = ""

    def __post_init__(self) -> None:
        k_max = self.k_max
        if k_max is not None and (isinstance(k_max, bool) or not isinstance(k_max, int)):
            raise HyperRouterError(f"k_max must be a positive integer, got {k_max!r}")
        if k_max is not None and k_max < 1:
            raise HyperRouterError(f"k_max must be >= 1, got {k_max}")

    def slots(self, num_experts: int) -> int:
        """How many experts the router picks per token before the policy keeps a prefix."""
        return num_experts if self.k_max is None else min(self.k_max, num_experts)

    @property
    def label(self) -> str:
        raise NotImplementedError

    def keep(self, logits_TE: Tensor | None, ids_TK: Tensor, weights_TK: Tensor) -> Tensor:
        """The slots [T, K] (bool) each token keeps."""
        raise NotImplementedError


@dataclass(frozen=True)
class TopP(TokenPolicy):
    """Top-p routing: the fewest experts whose cumulative probability reaches p (0 < p <= 1)."""

    p: float = 1.0
    kind: ClassVar[str] = "top_p"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.p, bool) or not isinstance(self.p, (int, float)):
            raise HyperRouterError(f"top-p p must be a number in (0, 1], got {self.p!r}")
        if not 0.0 < self.p <= 1.0:
            raise HyperRouterError(f"top-p p must be in (0, 1], got {self.p}")

    @property
    def label(self) -> str:
        return f"top_p={self.p:g}"

    def keep(self, logits_TE: Tensor | None, ids_TK: Tensor, weights_TK: Tensor) -> Tensor:
        if logits_TE is None:
            raise HyperRouterError(
                "top-p needs a router with scores (Routing.logits); this router has none"
            )
        if self.p >= 1.0:
            return torch.ones_like(ids_TK, dtype=torch.bool)
        probs_TE = torch.softmax(logits_TE.float(), dim=-1)
        probs_TK = probs_TE.gather(1, ids_TK)
        order_TK = probs_TK.argsort(dim=1, descending=True, stable=True)
        sorted_TK = probs_TK.gather(1, order_TK)
        before_TK = sorted_TK.cumsum(1) - sorted_TK  # mass of the experts ranked before
        keep_sorted = before_TK < self.p
        keep_sorted[:, :1] = True
        return torch.zeros_like(keep_sorted).scatter(1, order_TK, keep_sorted)


@dataclass(frozen=True)
class WeightRatio(TokenPolicy):
    """Weight-ratio skipping: drop a slot whose weight is below r times the token's largest."""

    r: float = 0.0
    kind: ClassVar[str] = "ratio"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.r, bool) or not isinstance(self.r, (int, float)):
            raise HyperRouterError(f"weight ratio r must be a number in [0, 1], got {self.r!r}")
        if not 0.0 <= self.r <= 1.0:
            raise HyperRouterError(f"weight ratio r must be in [0, 1], got {self.r}")

    @property
    def label(self) -> str:
        return f"ratio={self.r:g}"

    def keep(self, logits_TE: Tensor | None, ids_TK: Tensor, weights_TK: Tensor) -> Tensor:
        w_TK = weights_TK.float()
        return w_TK >= self.r * w_TK.max(dim=1, keepdim=True).values


POLICIES = {"top_p": TopP, "ratio": WeightRatio}


def parse_token_policy(
    spec: str, k_max: int | None = None, renormalize: bool = True
) -> TokenPolicy:
    """`top_p=0.7` or `ratio=0.3` -> the policy (one-line error naming the valid forms)."""
    kind, sep, value = spec.partition("=")
    kind = kind.strip()
    if not sep or kind not in POLICIES:
        raise HyperRouterError(
            f"bad token policy {spec!r}: expected top_p=P (0 < P <= 1) or ratio=R (0 <= R <= 1)"
        )
    try:
        number = float(value)
    except ValueError:
        raise HyperRouterError(f"bad token policy {spec!r}: {value!r} is not a number") from None
    if kind == "top_p":
        return TopP(k_max=k_max, renormalize=renormalize, p=number)
    return WeightRatio(k_max=k_max, renormalize=renormalize, r=number)


def apply_policy(
    policy: TokenPolicy,
    logits_TE: Tensor | None,
    ids_TK: Tensor,
    weights_TK: Tensor,
    keep_TK: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """(keep [T, K], weights [T, K]): the policy's slots and'ed with the router's own keep mask,
    and the combine weights (renormalised over the kept slots when the policy says so)."""
    with torch.no_grad():
        keep = policy.keep(logits_TE, ids_TK, weights_TK)
        if keep_TK is not None:
            keep = keep & keep_TK
    if not policy.renormalize:
        return keep, weights_TK
    # the sum the router gave the slots it kept itself (a capacity drop is not the policy's)
    total = (weights_TK if keep_TK is None else weights_TK * keep_TK).sum(1, keepdim=True)
    kept = (weights_TK * keep).sum(1, keepdim=True)
    scale = torch.where(kept > 0, total / kept.clamp_min(torch.finfo(kept.dtype).tiny), 1.0)
    return keep, weights_TK * scale
