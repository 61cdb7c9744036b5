"""VQMoE (Do, Pham, Le, Tran 2024, "On the effectiveness of discrete representations in sparse
mixture of experts", arXiv 2411.19402; TMLR 2025): experts chosen through a discrete code.

The router holds a codebook {e_j}, j < K. A token x takes its nearest code by L2 distance,
j*(x) = argmin_j ||x - e_j||^2, and the expert j* mod E with weight 1. The codebook learns from
the vector-quantisation loss

    L_vq = ||sg(x) - e_j*||^2 + commitment * ||x - sg(e_j*)||^2      (means over tokens and dims)

reported as `vq_loss` = `vq_loss_weight` * L_vq (0.08 and 0.25 in the reference scripts), or, with
`ema_decay` set, by exponential moving averages of the tokens each code receives (VQ-VAE-2 style,
Laplace-smoothed counts; the codebook term then drops out of the loss), updated once per optimizer
step by the training step's hook, never in evaluation. With `dead_code_threshold` > 0, codes
whose EMA count falls below it are restarted at randomly chosen tokens of the last step.

The paper's full layer runs this discrete path beside a normal routed path and mixes the two with
a learned per-token 2-way softmax, in training and in inference: `MoE(router="smoe",
second_router="vqmoe")` (`moe.second_router: vqmoe` in a config). Alone, `router="vqmoe"` routes
every token by its code.

Options (defaults): codebook_size None (= E, as the scripts use K = E = 16), vq_loss_weight 0.08
(the scripts' beta_vq), commitment 0.25, ema_decay None (off: gradient codebook, as the
reference's base quantizer), dead_code_threshold 0.0 (off).

Differences from the paper / reference code, and why:
- top_k > 1 takes the k nearest codes; their experts repeat when K > E, and a repeated expert is
  dropped through `Routing.keep` (its nearest code stays). The weights are equal over the distinct
  experts kept (1/k without repeats, 1/2 each for a token whose 3 codes map to 2 experts), so
  every token's weights sum to 1. The reference is top-1.
- The reference feeds the experts z = (1 - c) x + c sg(q - x) (c = 0.05) through a LayerNorm, and
  applies the same LayerNorm to their output; we dispatch x itself and return the experts' output
  (the block's own LayerNorm follows), so the discrete path sees what the routed path sees.
- The codebook starts U(-1/K, 1/K) as in the reference. The EMA codebook (`ema_decay`) is VQ-VAE's
  EMA update (van den Oord et al. 2017), not the reference's: its `bl_vq` variant has no EMA
  codebook; it keeps an EMA of code usage, restarts rarely used codes and measures cosine
  distance. Our dead-code restart (`dead_code_threshold`) follows that restart idea, on squared
  Euclidean distance.
- No logits: statistics skip the router entropy.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch import distributed as dist

from hyperrouter.routers.base import Router, Routing, RoutingContext, check_option, register_router
from hyperrouter.routers.losses import at_least_fp32


@register_router("vqmoe")
class VQRouter(Router):
    """Nearest-code routing with a learned codebook; see the module docstring."""

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        *,
        codebook_size: int | None = None,
        vq_loss_weight: float = 0.08,
        commitment: float = 0.25,
        ema_decay: float | None = None,
        dead_code_threshold: float = 0.0,
    ) -> None:
        super().__init__(d_model, num_experts)
        size = num_experts if codebook_size is None else codebook_size
        check_option(
            "codebook_size",
            size,
            isinstance(size, int) and not isinstance(size, bool) and size >= num_experts,
            f"an integer >= num_experts={num_experts} (or None for num_experts)",
        )
        for name, value in (("vq_loss_weight", vq_loss_weight), ("commitment", commitment)):
            check_option(name, value, isinstance(value, (int, float)) and value >= 0, ">= 0")
        check_option(
            "ema_decay",
            ema_decay,
            ema_decay is None or (isinstance(ema_decay, (int, float)) and 0 < ema_decay < 1),
            "a number in (0, 1) or None (gradient codebook)",
        )
        check_option(
            "dead_code_threshold",
            dead_code_threshold,
            isinstance(dead_code_threshold, (int, float)) and dead_code_threshold >= 0,
            ">= 0",
        )
        self.codebook_size = size
        self.vq_loss_weight = float(vq_loss_weight)
        self.commitment = float(commitment)
        self.ema_decay = None if ema_decay is None else float(ema_decay)
        self.dead_code_threshold = float(dead_code_threshold)
        self.codebook = nn.Parameter(torch.empty(size, d_model).uniform_(-1.0 / size, 1.0 / size))
        if self.ema_decay is not None:
            self.codebook.requires_grad_(False)
            self.register_buffer("ema_count", torch.ones(size))
            self.register_buffer("ema_sum", self.codebook.detach().clone())
        self._step_sums: Tensor | None = None
        self._step_counts: Tensor | None = None
        self._step_sample: Tensor | None = None

    def nearest_codes(self, x_TD: Tensor, k: int) -> Tensor:
        """[T, k] indices of the k nearest codes by L2 distance (fp32), nearest first."""
        x = at_least_fp32(x_TD.detach())
        codes = self.codebook.detach().to(x.dtype)
        dist = (x * x).sum(-1, keepdim=True) - 2 * x @ codes.t() + (codes * codes).sum(-1)
        return torch.topk(dist, k, dim=-1, largest=False, sorted=True).indices

    def forward(self, x_TD: Tensor, ctx: RoutingContext | int) -> Routing:
        ctx = self.context(ctx)
        num_tokens, k = x_TD.shape[0], ctx.top_k
        codes_TK = self.nearest_codes(x_TD, min(k, self.codebook_size))
        ids_TK = codes_TK % self.num_experts
        keep_TK = None
        if ids_TK.shape[1] > 1:  # the same expert through two codes: keep its nearest code only
            same = ids_TK.unsqueeze(2) == ids_TK.unsqueeze(1)
            slots = ids_TK.shape[1]
            earlier = torch.ones(slots, slots, dtype=torch.bool, device=ids_TK.device).tril(-1)
            repeated = (same & earlier).any(-1)
            keep_TK = None if not bool(repeated.any()) else ~repeated
        if keep_TK is None:
            weights_TK = x_TD.new_full(ids_TK.shape, 1.0 / ids_TK.shape[1], dtype=torch.float32)
        else:  # equal weights over the distinct experts kept: each token's weights sum to 1
            kept_TK = keep_TK.float()
            weights_TK = kept_TK / kept_TK.sum(-1, keepdim=True)
        aux: dict[str, Tensor] = {}
        if num_tokens > 0:
            x = at_least_fp32(x_TD)
            q = self.codebook.to(x.dtype).index_select(0, codes_TK[:, 0])
            loss = self.commitment * (x - q.detach()).square().mean()
            if self.ema_decay is None:
                loss = loss + (x.detach() - q).square().mean()
            if self.vq_loss_weight > 0:
                aux["vq_loss"] = self.vq_loss_weight * loss
            if ctx.training and self.ema_decay is not None:
                self._accumulate(x.detach(), codes_TK[:, 0])
        return Routing(ids_TK, weights_TK, None, aux, keep=keep_TK)

    @torch.no_grad()
    def _accumulate(self, x_TD: Tensor, codes_T: Tensor) -> None:
        sums = torch.zeros_like(self.ema_sum).index_add(0, codes_T, x_TD.to(self.ema_sum.dtype))
        counts = torch.bincount(codes_T, minlength=self.codebook_size).to(self.ema_count.dtype)
        if self._step_sums is None:
            self._step_sums, self._step_counts = sums, counts
        else:
            self._step_sums += sums
            self._step_counts += counts
        self._step_sample = x_TD[torch.randperm(x_TD.shape[0], device=x_TD.device)[:256]]

    @torch.no_grad()
    def optimizer_step(self, load_E: Tensor, step: int) -> None:
        """EMA codebook update from the tokens each code received since the last step (on every
        rank of torch.distributed, summed over the ranks; dead-code restarts drawn on rank 0)."""
        if self.ema_decay is None:
            return
        ranks = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if ranks:  # every rank takes part, also one that routed no token since the last step
            if self._step_sums is None:
                self._step_sums = torch.zeros_like(self.ema_sum)
                self._step_counts = torch.zeros_like(self.ema_count)
            dist.all_reduce(self._step_sums)
            dist.all_reduce(self._step_counts)
        elif self._step_sums is None:
            return
        decay = self.ema_decay
        self.ema_count.mul_(decay).add_(self._step_counts, alpha=1 - decay)
        self.ema_sum.mul_(decay).add_(self._step_sums, alpha=1 - decay)
        total = self.ema_count.sum()
        smoothed = (self.ema_count + 1e-5) / (total + self.codebook_size * 1e-5) * total
        self.codebook.copy_(self.ema_sum / smoothed.unsqueeze(1))
        if self.dead_code_threshold > 0:
            dead = (self.ema_count < self.dead_code_threshold).nonzero(as_tuple=True)[0]
            sample = self._step_sample
            if ranks:  # every rank restarts the same codes at rank 0's tokens
                have = torch.tensor([0 if sample is None else sample.shape[0]], device=dead.device)
                dist.broadcast(have, src=0)
                if dead.numel() and int(have):
                    fresh = torch.empty(dead.numel(), self.codebook.shape[1], device=dead.device)
                    if dist.get_rank() == 0:
                        pick = torch.randint(sample.shape[0], (dead.numel(),), device=dead.device)
                        fresh = sample[pick].to(fresh.dtype)
                    dist.broadcast(fresh, src=0)
                    self._restart(dead, fresh)
            elif dead.numel() and sample is not None and sample.shape[0]:
                pick = torch.randint(sample.shape[0], (dead.numel(),), device=dead.device)
                self._restart(dead, sample[pick])
        self._step_sums = self._step_counts = self._step_sample = None

    def _restart(self, dead: Tensor, fresh: Tensor) -> None:
        fresh = fresh.to(self.codebook.dtype)
        self.codebook[dead] = fresh
        self.ema_sum[dead] = fresh
        self.ema_count[dead] = 1.0
