"""Transformer-XL (Dai et al. 2019) with MoE feed-forward layers, as in the HyperRouter paper.

Relative positional attention with learnable u/v biases shared by all layers, segment-level
recurrence (each layer attends to a detached memory of the previous segments' hidden states),
post-LayerNorm blocks, tied (adaptive) input/output embeddings. Each layer's FFN is dense (d_inner)
or a `hyperrouter.MoE`, chosen per layer. Shapes are [time, batch, ...] as in the original.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from hyperrouter.errors import HyperRouterError
from hyperrouter.models.adaptive import AdaptiveEmbedding, ProjectedAdaptiveLogSoftmax
from hyperrouter.moe import MoE, MoEOutput, RoutingStats


@dataclass
class MoEConfig:
    """The MoE feed-forward layers. `layers` lists the layer indices that are MoE (empty: none,
    which gives the dense baselines); every other layer has a dense FFN of width d_inner.

    k is not set here: the training schedule (train.top_k_*) decides it at every step and the
    evaluation sets it per call. granularity, shared_experts, shared_mix: DeepSeekMoE options of
    `hyperrouter.MoE` (the experts are num_experts * granularity of width d_expert / granularity,
    and the schedule's k counts those). second_router (+ options, k): a second routing of the same
    experts mixed by a learned gate (VQMoE's layer: second_router "vqmoe").
    """

    layers: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    num_experts: int = 16
    d_expert: int = 512
    router: str = "hyperrouter"
    router_options: dict = field(default_factory=dict)
    activation: str = "relu"
    backend: str = "auto"
    capacity_factor: float | None = None
    granularity: int = 1
    shared_experts: int = 0
    shared_mix: str = "sum"
    second_router: str | None = None
    second_router_options: dict = field(default_factory=dict)
    second_top_k: int = 1
    # MoE++ (hyperrouter.moe.zero_computation): zero-computation experts beside the FFN experts,
    # their heterogeneous balance loss, and the gating residual between MoE layers
    constant_experts: int = 0
    copy_experts: int = 0
    zero_experts: int = 0
    gating_residual: bool = False
    zc_balance_loss_weight: float = 0.01
    zc_tau: float = 0.75

    @property
    def total_experts(self) -> int:
        """The router's choices per MoE layer (FFN experts after fine-grained segmentation, plus
        zero-computation experts): the largest valid k."""
        zc = self.constant_experts + self.copy_experts + self.zero_experts
        return self.num_experts * self.granularity + zc


ARCHS = ("transformer_xl", "qwen3")


@dataclass
class ModelConfig:
    """The model: its architecture and sizes; defaults are the paper's 4-layer enwik8
    Transformer-XL.

    `arch`: transformer_xl (this module) or qwen3 (`hyperrouter.models.decoder`: a Qwen3-style
    pre-RMSNorm decoder with RoPE, grouped-query attention and SwiGLU MLPs from transformers). Both
    read n_layer, n_head, d_head (head_dim), d_model (hidden size), d_inner (the dense MLP width of
    the layers that are not MoE), dropout, dropatt, tie_weight and init_std; qwen3 reads also
    n_kv_head (key/value heads; None: n_head), rope_theta and rms_norm_eps; the other keys are
    Transformer-XL's.
    """

    arch: str = "transformer_xl"
    n_layer: int = 4
    n_head: int = 8
    d_head: int = 64
    d_model: int = 256
    d_inner: int = 512
    d_embed: int | None = None
    dropout: float = 0.1
    dropatt: float = 0.0
    tie_weight: bool = True
    adaptive: bool = False
    cutoffs: list[int] = field(default_factory=list)
    div_val: int = 1
    tie_projs: bool = True
    same_length: bool = False
    clamp_len: int = -1
    init_std: float = 0.02
    proj_init_std: float = 0.01
    n_kv_head: int | None = None
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6


def moe_layer(
    d_model: int,
    moe: MoEConfig,
    top_k: int | None,
    *,
    dropout: float,
    init_std: float,
    bias: bool = True,
) -> MoE:
    """The `hyperrouter.MoE` of one MoE layer as `moe` describes it (k: `top_k`, or every expert
    when None), for a model of width d_model."""
    return MoE(
        d_model,
        moe.num_experts,
        moe.d_expert,
        moe.total_experts if top_k is None else top_k,
        router=moe.router,
        router_options=moe.router_options,
        activation=moe.activation,
        bias=bias,
        dropout=dropout,
        backend=moe.backend,
        capacity_factor=moe.capacity_factor,
        init_std=init_std,
        granularity=moe.granularity,
        shared_experts=moe.shared_experts,
        shared_mix=moe.shared_mix,
        second_router=moe.second_router,
        second_router_options=moe.second_router_options,
        second_top_k=moe.second_top_k,
        constant_experts=moe.constant_experts,
        copy_experts=moe.copy_experts,
        zero_experts=moe.zero_experts,
        gating_residual=moe.gating_residual,
        zc_balance_loss_weight=moe.zc_balance_loss_weight,
        zc_tau=moe.zc_tau,
    )


@dataclass
class LMOutput:
    """What one forward pass returns to the trainer."""

    loss: Tensor | None  # mean NLL over target tokens (nats)
    nll: Tensor | None  # [tgt_len, batch] per-token NLL
    mems: list[Tensor]  # detached memory for the next segment
    aux_loss: Tensor  # sum of the MoE layers' (weighted) auxiliary losses
    hidden: Tensor | None = None  # last layer's output [qlen, batch, d_model]
    moe_outputs: list[MoEOutput] = field(default_factory=list)  # per MoE layer: losses, routing

    @property
    def moe_stats(self) -> list[RoutingStats]:
        """One per MoE layer, in layer order (computed when first read)."""
        return [o.stats for o in self.moe_outputs]


_COMPILE_STATUS: dict[str, str | None] = {}


def can_compile() -> bool:
    """Whether torch.compile works here (tried once on a tiny function; the reason it does not
    is printed once on stderr)."""
    if "error" not in _COMPILE_STATUS:
        try:
            fn = torch.compile(lambda t: torch.softmax(t * 2.0, -1), dynamic=False)
            fn(torch.randn(2, 3))
            _COMPILE_STATUS["error"] = None
        except Exception as err:  # noqa: BLE001 (any failure of the toolchain means: stay eager)
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            _COMPILE_STATUS["error"] = reason
            print(
                f"note: torch.compile is not available here ({reason}); running eager",
                file=sys.stderr,
            )
    return _COMPILE_STATUS["error"] is None


class PositionalEmbedding(nn.Module):
    """Sinusoid embedding of relative distances, as in Transformer-XL."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        inv_freq = 1.0 / (10000 ** (torch.arange(0.0, dim, 2.0) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, pos_seq: Tensor) -> Tensor:
        sinusoid = torch.outer(pos_seq, self.inv_freq)
        return torch.cat([sinusoid.sin(), sinusoid.cos()], dim=-1)[:, None, :]


class RelPartialLearnableAttention(nn.Module):
    """Multi-head attention with relative positions and learnable biases u (r_w_bias), v (r_r_bias).

    score(i, j) = (q_i + u) . k_j + (q_i + v) . r_{i-j}, computed with the "relative shift" trick.
    Post-LayerNorm: out = LN(x + dropout(attn(x))).
    """

    def __init__(self, n_head: int, d_model: int, d_head: int, dropout: float, dropatt: float):
        super().__init__()
        self.n_head = n_head
        self.d_head = d_head
        self.qkv_net = nn.Linear(d_model, 3 * n_head * d_head, bias=False)
        self.r_net = nn.Linear(d_model, n_head * d_head, bias=False)
        self.o_net = nn.Linear(n_head * d_head, d_model, bias=False)
        self.drop = nn.Dropout(dropout)
        self.dropatt = nn.Dropout(dropatt)
        self.layer_norm = nn.LayerNorm(d_model)
        self.scale = 1.0 / math.sqrt(d_head)

    @staticmethod
    def _rel_shift(x: Tensor) -> Tensor:
        """x [..., qlen, rlen] indexed by relative position -> indexed by key position.

        Row i of the result is row i of x shifted left by qlen - 1 - i (Transformer-XL's trick:
        pad a zero column, reinterpret the buffer, drop the first row). Entries j > i + mlen
        hold garbage and must be masked.
        """
        *lead, qlen, rlen = x.shape
        eager = not torch.compiler.is_compiling()  # (the compiler fuses the copies itself)
        if eager and not (torch.is_grad_enabled() and x.requires_grad) and x.is_contiguous():
            # without autograd, the same entries as a strided view (no copy): row i starts
            # qlen - 1 - i entries into row i of x; entry (i, j) is x[i, j + qlen - 1 - i], which
            # for the masked j > i + mlen runs into the next row (still inside x)
            return x.as_strided(
                (*lead, qlen, rlen), (*x.stride()[:-2], rlen - 1, 1), x.storage_offset() + qlen - 1
            )
        padded = torch.cat([x.new_zeros(*lead, qlen, 1), x], dim=-1)
        return padded.view(*lead, rlen + 1, qlen)[..., 1:, :].reshape(*lead, qlen, rlen)

    def forward(
        self,
        w: Tensor,
        r: Tensor,
        r_w_bias: Tensor,
        r_r_bias: Tensor,
        attn_mask: Tensor,
        mems: Tensor | None,
        kv_memory: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """The attention block's output; with `kv_memory`, `mems` holds the memory rows' keys
        and values already projected ([mlen, B, 2 n_head d_head], as this returns them for the
        next call) and the output comes with the keys and values of memory + segment."""
        qlen, bsz = w.shape[0], w.shape[1]
        n_head, d_head = self.n_head, self.d_head
        no_memory = mems is None or mems.numel() == 0
        # (built before q as it always was: autograd sums w's gradients in creation order, and
        # the stored routing fixtures are bit-exact)
        cat = None if kv_memory else (w if no_memory else torch.cat([mems, w], 0))
        # q only for the current segment (memory rows are keys and values, never queries): the
        # q rows and the k, v rows of qkv_net's weight as views, the parameters unchanged
        width = n_head * d_head
        weight = self.qkv_net.weight
        q = F.linear(w, weight[:width]).view(qlen, bsz, n_head, d_head)
        if cat is None:  # the memory's projections are reused, only the segment's are new
            rows = F.linear(w, weight[width:])
            kv_rows = rows if no_memory else torch.cat([mems, rows], 0)
        else:
            kv_rows = F.linear(cat, weight[width:])
        klen = kv_rows.shape[0]
        kv = kv_rows.view(klen, bsz, 2, n_head, d_head)
        q_BHQD = q.permute(1, 2, 0, 3)
        k_BHKD = kv[:, :, 0].permute(1, 2, 0, 3)
        v_BHKD = kv[:, :, 1].permute(1, 2, 0, 3)
        r_HDR = self.r_net(r).view(r.shape[0], n_head, d_head).permute(1, 2, 0)
        bd = self._rel_shift(torch.matmul(q_BHQD + r_r_bias[:, None, :], r_HDR))
        q_content = q_BHQD + r_w_bias[:, None, :]
        if not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            # inference: the fused kernel, the positional term as an additive bias (the same
            # scores up to float rounding; 7-9 % faster at the Table 1 size on CPU)
            # (bd may be a view with overlapping rows: scaled out of place, then masked in place)
            bias = (bd * self.scale).masked_fill_(attn_mask, float("-inf")).to(q_BHQD.dtype)
            vec = F.scaled_dot_product_attention(
                q_content, k_BHKD, v_BHKD, attn_mask=bias, scale=self.scale
            )
        else:
            ac = torch.matmul(q_content, k_BHKD.transpose(-1, -2))
            # in place (ac is this call's own buffer): the same values as ((ac + bd) * scale),
            # without three more score-sized tensors
            score = ac.add_(bd).mul_(self.scale).float().masked_fill_(attn_mask, float("-inf"))
            prob = self.dropatt(torch.softmax(score, dim=-1).to(v_BHKD.dtype))
            vec = torch.matmul(prob, v_BHKD)
        vec = vec.permute(2, 0, 1, 3).reshape(qlen, bsz, n_head * d_head)
        out = self.layer_norm(w + self.drop(self.o_net(vec)))
        return (out, kv_rows) if kv_memory else out


class FeedForward(nn.Module):
    """Post-LN FFN block: LN(x + dropout(ffn(x))), ffn dense or MoE."""

    def __init__(self, d_model: int, d_inner: int, dropout: float, moe: MoE | None) -> None:
        super().__init__()
        self.moe = moe
        if moe is None:
            self.core = nn.Sequential(
                nn.Linear(d_model, d_inner),
                nn.ReLU(inplace=True),
                nn.Dropout(dropout),
                nn.Linear(d_inner, d_model),
            )
        self.drop = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(d_model)

    def forward(self, x: Tensor, token_mask: Tensor | None, routing_ids: dict[str, Tensor]):
        if self.moe is None:
            return self.layer_norm(x + self.drop(self.core(x))), None
        out = self.moe(x, mask=token_mask, return_details=True, **routing_ids)
        return self.layer_norm(x + self.drop(out.output)), out


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, moe: MoE | None) -> None:
        super().__init__()
        c = config
        self.attn = RelPartialLearnableAttention(
            c.n_head, c.d_model, c.d_head, c.dropout, c.dropatt
        )
        self.ff = FeedForward(c.d_model, c.d_inner, c.dropout, moe)

    def forward(
        self, x, r, r_w_bias, r_r_bias, attn_mask, mems, token_mask, routing_ids, kv_memory=False
    ):
        if kv_memory:
            x, kv = self.attn(x, r, r_w_bias, r_r_bias, attn_mask, mems, kv_memory=True)
            return (*self.ff(x, token_mask, routing_ids), kv)
        x = self.attn(x, r, r_w_bias, r_r_bias, attn_mask, mems)
        return self.ff(x, token_mask, routing_ids)


class TransformerXL(nn.Module):
    """Transformer-XL language model whose FFNs are dense or MoE, per layer.

    forward(data [qlen, B], target [qlen, B] | None, mems) -> LMOutput. `set_top_k(k)` changes k
    in every MoE layer at once. Routers see each token's id and its batch column (the stream it
    belongs to) as the sequence id.
    """

    def __init__(
        self,
        n_token: int,
        config: ModelConfig,
        moe: MoEConfig | None = None,
        tgt_len: int = 512,
        mem_len: int = 512,
        top_k: int | None = None,
    ) -> None:
        super().__init__()
        c = config
        if n_token < 2:
            raise HyperRouterError(f"the vocabulary must have at least 2 tokens, got {n_token}")
        moe = moe or MoEConfig(layers=[])
        bad = [i for i in moe.layers if not 0 <= i < c.n_layer]
        if bad:
            raise HyperRouterError(
                f"moe.layers must be layer indices in [0, {c.n_layer - 1}], got {moe.layers}"
            )
        self.config = c
        self.moe_config = moe
        self.n_token = n_token
        self.tgt_len = tgt_len
        self.mem_len = mem_len
        d_embed = c.d_embed or c.d_model
        cutoffs = list(c.cutoffs) if c.adaptive else []
        div_val = c.div_val if c.adaptive else 1
        self.word_emb = AdaptiveEmbedding(n_token, d_embed, c.d_model, cutoffs, div_val)
        self.drop = nn.Dropout(c.dropout)
        self.pos_emb = PositionalEmbedding(c.d_model)
        self.r_w_bias = nn.Parameter(torch.empty(c.n_head, c.d_head))
        self.r_r_bias = nn.Parameter(torch.empty(c.n_head, c.d_head))
        self.layers = nn.ModuleList()
        for i in range(c.n_layer):
            layer_moe = None
            if i in moe.layers:
                layer_moe = moe_layer(c.d_model, moe, top_k, dropout=c.dropout, init_std=c.init_std)
            self.layers.append(DecoderLayer(c, layer_moe))
        self.crit = ProjectedAdaptiveLogSoftmax(n_token, d_embed, c.d_model, cutoffs, div_val)
        self._init_weights()
        if c.tie_weight:
            self.crit.tie_to(self.word_emb, tie_projs=c.tie_projs)

    # ------------------------------------------------------------------ init
    def _init_weights(self) -> None:
        """Transformer-XL's initialisation; routers keep their own (their module docstrings)."""
        c = self.config
        routers = {id(m) for layer in self.moe_layers() for m in layer.router.modules()}
        for module in self.modules():
            if id(module) in routers:
                continue
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, c.init_std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, c.init_std)
            elif isinstance(module, nn.LayerNorm):
                nn.init.normal_(module.weight, 1.0, c.init_std)
                nn.init.zeros_(module.bias)
        for proj in [*self.word_emb.emb_projs, *self.crit.out_projs]:
            nn.init.normal_(proj, 0.0, c.proj_init_std)
        if self.crit.n_clusters > 0:
            nn.init.normal_(self.crit.cluster_weight, 0.0, c.init_std)
            nn.init.zeros_(self.crit.cluster_bias)
        nn.init.normal_(self.r_w_bias, 0.0, c.init_std)
        nn.init.normal_(self.r_r_bias, 0.0, c.init_std)

    # ------------------------------------------------------------------ MoE control
    def moe_layers(self) -> list[MoE]:
        return [layer.ff.moe for layer in self.layers if layer.ff.moe is not None]

    @property
    def num_experts(self) -> int:
        """Experts per MoE layer, the largest valid k (1 for a model without MoE layers)."""
        return self.moe_config.total_experts if self.moe_layers() else 1

    def set_top_k(self, top_k: int | Sequence[int]) -> None:
        """Use k experts per token in every MoE layer (validated against E), or one k per MoE
        layer (a sequence with one entry per layer, in order)."""
        layers = self.moe_layers()
        if isinstance(top_k, Sequence):
            if len(top_k) != len(layers):
                raise HyperRouterError(
                    f"set_top_k needs one k per MoE layer ({len(layers)}), got {len(top_k)}"
                )
            for layer, k in zip(layers, top_k):
                layer.top_k = k
            return
        for layer in layers:
            layer.top_k = top_k

    def compile_attention(self) -> bool:
        """torch.compile every layer's attention block (the model's memory-bound part: the score
        tensor's add, scale, mask and softmax fuse into fewer passes); the MoE layers stay eager
        (their dispatch has data-dependent shapes). The parameters and state_dict are unchanged.
        False, with one line on stderr, where this torch cannot compile (no C++ compiler, an
        unsupported platform): the model then stays eager."""
        if not can_compile():
            return False
        for layer in self.layers:
            layer.attn.forward = torch.compile(layer.attn.forward, dynamic=False)
        return True

    def set_token_policy(self, policy) -> None:
        """Choose k per token in every MoE layer (`hyperrouter.moe.policies`; None: static k)."""
        for layer in self.moe_layers():
            layer.token_policy = policy

    @property
    def top_k(self) -> int | None:
        layers = self.moe_layers()
        return layers[0].top_k if layers else None

    # ------------------------------------------------------------------ memory
    def init_mems(self) -> list[Tensor]:
        return []

    def _update_mems(self, hids: list[Tensor], mems: list[Tensor], qlen: int) -> list[Tensor]:
        if self.mem_len <= 0:
            return []
        with torch.no_grad():
            new = []
            for i, h in enumerate(hids):
                cat = h if not mems else torch.cat([mems[i], h], dim=0)
                new.append(cat[-self.mem_len :].detach())
        return new

    # ------------------------------------------------------------------ forward
    def body(
        self,
        data: Tensor,
        mems: list[Tensor] | None = None,
        token_mask: Tensor | None = None,
        mem_padding: Tensor | None = None,
        kv_memory: bool = False,
    ) -> tuple[Tensor, list[Tensor], Tensor, list[MoEOutput]]:
        """Hidden states [qlen, B, d_model] for tokens `data` [qlen, B] given memory `mems`.

        `token_mask` [qlen, B] (bool) marks real tokens for MoE routing (padding is not routed).
        `mem_padding` [B] (int) says how many leading memory rows of each column are padding
        (columns of different memory lengths batched together, as the server's steps do): no
        query attends to them, and the relative positions of the real rows are unchanged, so
        each column gets what it would get alone (up to float rounding).
        `kv_memory` keeps the memory as each layer's projected keys and values instead of its
        input hidden states (the same attention, without projecting the memory rows again at
        every call: what generation one token at a time wants); `mems` and the returned memory
        are then one [mlen, B, 2 n_head d_head] tensor per layer.
        Returns (hidden, new_mems, aux_loss, moe_outputs): the summed auxiliary losses and, per
        MoE layer, its output (named losses, statistics, routing).
        """
        if data.dim() != 2:
            raise HyperRouterError(f"data must be [qlen, batch] token ids, got {tuple(data.shape)}")
        mems = mems or []
        qlen = data.shape[0]
        mlen = mems[0].shape[0] if mems else 0
        klen = mlen + qlen
        word_emb = self.word_emb(data)
        ones = torch.ones(qlen, klen, dtype=torch.bool, device=data.device)
        attn_mask = torch.triu(ones, diagonal=1 + mlen)
        if self.config.same_length:
            attn_mask = attn_mask | torch.tril(ones, diagonal=-max(qlen, self.mem_len) + mlen)
        if mem_padding is not None:  # [B, 1, qlen, klen]: also the padded memory rows
            keys = torch.arange(klen, device=data.device)
            padded = keys[None, :] < mem_padding.to(data.device)[:, None]
            attn_mask = attn_mask[None, None] | padded[:, None, None, :]
        pos_seq = torch.arange(klen - 1, -1, -1.0, device=data.device, dtype=word_emb.dtype)
        if self.config.clamp_len > 0:
            pos_seq = pos_seq.clamp(max=self.config.clamp_len)
        core = self.drop(word_emb)
        pos = self.drop(self.pos_emb(pos_seq).to(word_emb.dtype))
        hids = [core]
        kvs: list[Tensor] = []
        aux = word_emb.new_zeros((), dtype=torch.float32)
        moe_outs: list[MoEOutput] = []
        routing_ids = {}
        if self.moe_layers():
            columns = torch.arange(data.shape[1], device=data.device)
            routing_ids = {"token_ids": data, "sequence_ids": columns.expand_as(data)}
        for i, layer in enumerate(self.layers):
            layer_ids = routing_ids
            moe = layer.ff.moe
            if moe is not None and moe.gate_map is not None and moe_outs:
                # MoE++'s gating residual: the previous MoE layer's logits
                layer_ids = {**routing_ids, "previous_logits": moe_outs[-1].routing.logits}
            out = layer(
                core,
                pos,
                self.r_w_bias,
                self.r_r_bias,
                attn_mask,
                mems[i] if mems else None,
                token_mask,
                layer_ids,
                kv_memory,
            )
            core, moe_out = out[0], out[1]
            if kv_memory:
                kvs.append(out[2])
            if moe_out is not None:
                for value in moe_out.aux_losses.values():
                    aux = aux + value
                moe_outs.append(moe_out)
            hids.append(core)
        if kv_memory:
            new_mems = [kv[-self.mem_len :].detach() for kv in kvs] if self.mem_len > 0 else []
        else:
            new_mems = self._update_mems(hids, mems, qlen)
        return self.drop(core), new_mems, aux, moe_outs

    def features(
        self, data: Tensor, token_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor, list[MoEOutput]]:
        """(hidden [qlen, B, d_model], aux loss, MoE outputs) of `data` read on its own (no
        memory), padding marked by `token_mask` not routed: what a classifier head reads."""
        hidden, _, aux, outs = self.body(data, None, token_mask=token_mask)
        return hidden, aux, outs

    def drop_lm_head(self) -> None:
        """Forget the LM softmax (a classifier does not use it; it would keep tied weights)."""
        self.crit = None

    def replace_embedding(self, n_token: int) -> None:
        """A freshly initialised input embedding of `n_token` symbols (a task vocabulary)."""
        d_model = self.config.d_model
        self.word_emb = AdaptiveEmbedding(n_token, d_model, d_model, [])
        nn.init.normal_(self.word_emb.emb_layers[0].weight, 0.0, self.config.init_std)

    def forward(
        self, data: Tensor, target: Tensor | None = None, mems: list[Tensor] | None = None
    ) -> LMOutput:
        hidden, new_mems, aux, outs = self.body(data, mems)
        if target is None:
            return LMOutput(None, None, new_mems, aux, hidden, outs)
        tgt_len = target.shape[0]
        pred = hidden[-tgt_len:]
        nll = self.crit(pred.reshape(-1, pred.shape[-1]), target.reshape(-1)).view(tgt_len, -1)
        return LMOutput(nll.mean(), nll, new_mems, aux, None, outs)

    def log_probs(self, data: Tensor, mems: list[Tensor] | None = None) -> Tensor:
        """Next-token log-probabilities [qlen, B, n_token] (fp32)."""
        hidden, _, _, _ = self.body(data, mems)
        return self.crit.log_prob(hidden.reshape(-1, hidden.shape[-1])).view(*hidden.shape[:2], -1)
