"""Adaptive input embeddings and adaptive softmax (Baevski & Auli 2019; Grave et al. 2017), with
the weight tying Transformer-XL uses. Without cutoffs both reduce to a tied embedding / softmax.

Token ids must be sorted by descending frequency (our word vocabularies are) so that the frequent
head of the vocabulary gets the full-width embedding and the rare tail clusters narrower ones.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from hyperrouter.errors import HyperRouterError


def check_cutoffs(cutoffs: list[int], n_token: int) -> list[int]:
    """Validated cutoffs: strictly increasing, positive and below the vocabulary size."""
    cutoffs = [int(c) for c in cutoffs]
    if (
        any(c <= 0 for c in cutoffs)
        or cutoffs != sorted(set(cutoffs))
        or (cutoffs and cutoffs[-1] >= n_token)
    ):
        raise HyperRouterError(
            f"model.cutoffs must be strictly increasing positive ids below the vocabulary size "
            f"{n_token}, got {cutoffs}"
        )
    return cutoffs


class AdaptiveEmbedding(nn.Module):
    """Token embedding scaled by sqrt(d_proj); cluster i has width d_embed // div_val**i and a
    projection to d_proj (none when the widths already match)."""

    def __init__(
        self, n_token: int, d_embed: int, d_proj: int, cutoffs: list[int], div_val: int = 1
    ) -> None:
        super().__init__()
        self.n_token = n_token
        self.d_embed = d_embed
        self.d_proj = d_proj
        self.div_val = div_val
        self.cutoff_ends = [0, *check_cutoffs(cutoffs, n_token), n_token]
        self.emb_scale = d_proj**0.5
        self.emb_layers = nn.ModuleList()
        self.emb_projs = nn.ParameterList()
        if div_val == 1:
            self.emb_layers.append(nn.Embedding(n_token, d_embed))
            if d_proj != d_embed:
                self.emb_projs.append(nn.Parameter(torch.empty(d_proj, d_embed)))
        else:
            for i in range(len(self.cutoff_ends) - 1):
                lo, hi = self.cutoff_ends[i], self.cutoff_ends[i + 1]
                d_emb_i = d_embed // (div_val**i)
                self.emb_layers.append(nn.Embedding(hi - lo, d_emb_i))
                self.emb_projs.append(nn.Parameter(torch.empty(d_proj, d_emb_i)))

    def forward(self, tokens: Tensor) -> Tensor:
        if self.div_val == 1:
            embed = self.emb_layers[0](tokens)
            if len(self.emb_projs) > 0:
                embed = F.linear(embed, self.emb_projs[0])
            return embed * self.emb_scale
        flat = tokens.reshape(-1)
        out = self.emb_projs[0].new_zeros(flat.shape[0], self.d_proj)
        for i in range(len(self.cutoff_ends) - 1):
            lo, hi = self.cutoff_ends[i], self.cutoff_ends[i + 1]
            index = ((flat >= lo) & (flat < hi)).nonzero(as_tuple=True)[0]
            if index.numel() == 0:
                continue
            embed = F.linear(self.emb_layers[i](flat[index] - lo), self.emb_projs[i])
            out = out.index_copy(0, index, embed.to(out.dtype))
        return out.view(*tokens.shape, self.d_proj) * self.emb_scale


class ProjectedAdaptiveLogSoftmax(nn.Module):
    """Negative log-likelihood of targets under a (possibly adaptive) softmax.

    Without cutoffs: one tied output layer. With cutoffs: a head over the shortlist plus one
    logit per tail cluster, and a softmax inside each cluster.
    """

    def __init__(
        self, n_token: int, d_embed: int, d_proj: int, cutoffs: list[int], div_val: int = 1
    ) -> None:
        super().__init__()
        self.n_token = n_token
        self.d_embed = d_embed
        self.d_proj = d_proj
        self.div_val = div_val
        self.cutoffs = [*check_cutoffs(cutoffs, n_token), n_token]
        self.cutoff_ends = [0, *self.cutoffs]
        self.shortlist_size = self.cutoffs[0]
        self.n_clusters = len(self.cutoffs) - 1
        self.head_size = self.shortlist_size + self.n_clusters
        if self.n_clusters > 0:
            self.cluster_weight = nn.Parameter(torch.zeros(self.n_clusters, d_embed))
            self.cluster_bias = nn.Parameter(torch.zeros(self.n_clusters))
        self.out_layers = nn.ModuleList()
        self.out_projs = nn.ParameterList()
        if div_val == 1:
            self.out_layers.append(nn.Linear(d_embed, n_token))
            if d_proj != d_embed:
                self.out_projs.append(nn.Parameter(torch.empty(d_proj, d_embed)))
        else:
            for i in range(len(self.cutoffs)):
                lo, hi = self.cutoff_ends[i], self.cutoff_ends[i + 1]
                d_emb_i = d_embed // (div_val**i)
                self.out_projs.append(nn.Parameter(torch.empty(d_proj, d_emb_i)))
                self.out_layers.append(nn.Linear(d_emb_i, hi - lo))

    def tie_to(self, embedding: AdaptiveEmbedding, tie_projs: bool = True) -> None:
        """Share output weights (and projections) with the input embedding."""
        for out_layer, emb_layer in zip(self.out_layers, embedding.emb_layers):
            out_layer.weight = emb_layer.weight
        if tie_projs:
            for i in range(len(self.out_projs)):
                self.out_projs[i] = embedding.emb_projs[i]

    def _proj(self, i: int) -> Tensor | None:
        return self.out_projs[i] if len(self.out_projs) > i else None

    def _cluster_params(self, i: int) -> tuple[Tensor, Tensor, Tensor | None]:
        if self.div_val == 1:
            lo, hi = self.cutoff_ends[i], self.cutoff_ends[i + 1]
            weight = self.out_layers[0].weight[lo:hi]
            bias = self.out_layers[0].bias[lo:hi]
            proj = self._proj(0)
        else:
            weight, bias, proj = self.out_layers[i].weight, self.out_layers[i].bias, self._proj(i)
        if i == 0 and self.n_clusters > 0:
            weight = torch.cat([weight, self.cluster_weight], dim=0)
            bias = torch.cat([bias, self.cluster_bias], dim=0)
        return weight, bias, proj

    @staticmethod
    def _logit(hidden: Tensor, weight: Tensor, bias: Tensor, proj: Tensor | None) -> Tensor:
        if proj is not None:
            hidden = F.linear(hidden, proj.t())
        return F.linear(hidden, weight, bias)

    def forward(self, hidden: Tensor, target: Tensor) -> Tensor:
        """hidden [N, d_proj], target [N] -> negative log-likelihood [N] (fp32)."""
        if self.n_clusters == 0:
            logit = self._logit(hidden, *self._cluster_params(0)).float()
            return F.cross_entropy(logit, target, reduction="none")
        head_logprob = F.log_softmax(self._logit(hidden, *self._cluster_params(0)).float(), -1)
        nll = hidden.new_zeros(target.shape[0], dtype=torch.float32)
        for i in range(len(self.cutoffs)):
            lo, hi = self.cutoff_ends[i], self.cutoff_ends[i + 1]
            index = ((target >= lo) & (target < hi)).nonzero(as_tuple=True)[0]
            if index.numel() == 0:
                continue
            target_i = target.index_select(0, index) - lo
            head_i = head_logprob.index_select(0, index)
            if i == 0:
                logprob = head_i.gather(1, target_i[:, None]).squeeze(1)
            else:
                hidden_i = hidden.index_select(0, index)
                tail = F.log_softmax(self._logit(hidden_i, *self._cluster_params(i)).float(), -1)
                logprob = head_i[:, -i] + tail.gather(1, target_i[:, None]).squeeze(1)
            nll = nll.index_copy(0, index, -logprob)
        return nll

    def log_prob(self, hidden: Tensor) -> Tensor:
        """Full log-probabilities [N, n_token] (fp32), for analysis and tests."""
        head_logprob = F.log_softmax(self._logit(hidden, *self._cluster_params(0)).float(), -1)
        if self.n_clusters == 0:
            return head_logprob
        parts = [head_logprob[:, : self.shortlist_size]]
        for i in range(1, len(self.cutoffs)):
            tail = F.log_softmax(self._logit(hidden, *self._cluster_params(i)).float(), -1)
            parts.append(head_logprob[:, -i, None] + tail)
        return torch.cat(parts, dim=1)
