"""A Qwen3-MoE-style decoder whose MoE layers are `hyperrouter.MoE` (`model.arch: qwen3`).

The body is transformers' dense Qwen3 model (`Qwen3Model`, built from a random-init
`Qwen3Config`; nothing is downloaded): token embedding, pre-RMSNorm blocks of grouped-query
attention with RoPE and q/k RMSNorm, a final RMSNorm. In the layers listed in moe.layers the MLP
module is replaced by `MoEMLP`, which calls a `hyperrouter.MoE` (any registered router, experts
without biases, moe.activation: the presets use swiglu, as Qwen3-MoE); the decoder layer's own
forward and residual stay transformers' (the MoE output is the MLP output). The other layers keep
Qwen3's dense SwiGLU MLP of width model.d_inner. The LM head is a linear layer, tied to the
embedding when model.tie_weight.

It offers the trainer and evaluation the interface of `TransformerXL`: forward(data [qlen, B],
target [qlen, B], mems) -> LMOutput (per-token NLL [qlen, B], the MoE layers' auxiliary losses
summed, each MoE layer's `MoEOutput`), set_top_k, set_token_policy, moe_layers, num_experts,
top_k, mem_len. There is no recurrence memory: `mems` stay empty and every segment (of training
or evaluation) is read on its own from position 0, so a token sees at most the earlier tokens of
its own segment (train with train.mem_len 0 and evaluate with eval.tgt_len = train.tgt_len).

Shapes follow Transformer-XL ([time, batch, ...]) outside; transformers' blocks run [batch, time,
d] inside. A MoE layer sees its input as [time, batch, d] with the token ids and each token's
batch column as sequence id, so its tokens are in the order of the targets (routers such as RL-R
match their routing to the per-token loss) and token-id routers (hash) work as in Transformer-XL.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from hyperrouter.errors import HyperRouterError
from hyperrouter.models.transformer_xl import LMOutput, ModelConfig, MoEConfig, moe_layer
from hyperrouter.moe import MoE, MoEOutput

MISSING = "model.arch qwen3 needs transformers (the hf extra): bash scripts/setup.sh hf"


def _qwen3() -> tuple[Any, Any]:
    """transformers' Qwen3Config and Qwen3Model, imported on first use."""
    try:
        from transformers import Qwen3Config
        from transformers.models.qwen3.modeling_qwen3 import Qwen3Model
    except ImportError:
        raise HyperRouterError(MISSING) from None
    return Qwen3Config, Qwen3Model


@dataclass
class _Call:
    """What the MoE layers of one forward share: the routing ids and their outputs so far."""

    routing_ids: dict[str, Tensor]
    token_mask: Tensor | None = None
    outputs: list[MoEOutput] = field(default_factory=list)


class MoEMLP(nn.Module):
    """The MLP slot of a transformers decoder layer, filled by a `hyperrouter.MoE`.

    transformers calls `mlp(hidden)` alone, so the model hands the call's routing ids to every
    MoEMLP just before its forward (`call`) and takes them back after it; each MoEMLP appends its
    `MoEOutput` there (and reads the previous one's logits for MoE++'s gating residual)."""

    def __init__(self, moe: MoE) -> None:
        super().__init__()
        self.moe = moe
        self.call: _Call | None = None

    def forward(self, x_BTD: Tensor) -> Tensor:
        call = self.call
        if call is None:
            raise HyperRouterError("MoEMLP runs inside Qwen3Decoder's forward only")
        kwargs = dict(call.routing_ids)
        if self.moe.gate_map is not None and call.outputs:
            kwargs["previous_logits"] = call.outputs[-1].routing.logits
        out = self.moe(x_BTD.transpose(0, 1), mask=call.token_mask, return_details=True, **kwargs)
        call.outputs.append(out)
        return out.output.transpose(0, 1)


class Qwen3Decoder(nn.Module):
    """Qwen3-style decoder LM whose MLPs are dense or `hyperrouter.MoE`, per layer (module
    docstring). forward(data [qlen, B], target [qlen, B] | None, mems) -> LMOutput."""

    def __init__(
        self,
        n_token: int,
        config: ModelConfig,
        moe: MoEConfig | None = None,
        max_len: int = 512,
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
        qwen3_config, qwen3_model = _qwen3()
        self.config = c
        self.moe_config = moe
        self.n_token = n_token
        self.hf_config = qwen3_config(
            vocab_size=n_token,
            hidden_size=c.d_model,
            intermediate_size=c.d_inner,
            num_hidden_layers=c.n_layer,
            num_attention_heads=c.n_head,
            num_key_value_heads=c.n_kv_head or c.n_head,
            head_dim=c.d_head,
            max_position_embeddings=max_len,
            rope_theta=c.rope_theta,
            rms_norm_eps=c.rms_norm_eps,
            attention_dropout=c.dropatt,
            initializer_range=c.init_std,
            tie_word_embeddings=c.tie_weight,
            use_cache=False,
            pad_token_id=None,
            attn_implementation="sdpa",
        )
        self.decoder = qwen3_model(self.hf_config)  # transformers' own initialisation
        for i in moe.layers:
            layer = moe_layer(
                c.d_model, moe, top_k, dropout=c.dropout, init_std=c.init_std, bias=False
            )
            self.decoder.layers[i].mlp = MoEMLP(layer)
        self.lm_head = nn.Linear(c.d_model, n_token, bias=False)
        if c.tie_weight:
            self.lm_head.weight = self.decoder.embed_tokens.weight
        else:
            nn.init.normal_(self.lm_head.weight, 0.0, c.init_std)

    # ------------------------------------------------------------------ MoE control
    def _moe_mlps(self) -> list[MoEMLP]:
        return [layer.mlp for layer in self.decoder.layers if isinstance(layer.mlp, MoEMLP)]

    def moe_layers(self) -> list[MoE]:
        return [mlp.moe for mlp in self._moe_mlps()]

    @property
    def num_experts(self) -> int:
        """Experts per MoE layer, the largest valid k (1 for a model without MoE layers)."""
        return self.moe_config.total_experts if self.moe_layers() else 1

    def set_top_k(self, top_k: int | Sequence[int]) -> None:
        """Use k experts per token in every MoE layer, or one k per MoE layer (in order)."""
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

    def set_token_policy(self, policy) -> None:
        """Choose k per token in every MoE layer (`hyperrouter.moe.policies`; None: static k)."""
        for layer in self.moe_layers():
            layer.token_policy = policy

    @property
    def top_k(self) -> int | None:
        layers = self.moe_layers()
        return layers[0].top_k if layers else None

    # ------------------------------------------------------------------ memory (none)
    @property
    def mem_len(self) -> int:
        """Always 0: this decoder keeps no recurrence memory."""
        return 0

    @mem_len.setter
    def mem_len(self, value: int) -> None:
        if value != 0:
            raise HyperRouterError(
                f"model.arch qwen3 keeps no recurrence memory: mem_len must be 0, got {value}"
            )

    # ------------------------------------------------------------------ forward
    def body(
        self, data: Tensor, token_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor, list[MoEOutput]]:
        """Hidden states [qlen, B, d_model] of tokens `data` [qlen, B] (positions from 0), the
        summed auxiliary losses and each MoE layer's output. `token_mask` [qlen, B] (bool)
        marks real tokens for MoE routing: right padding is not routed, and causal attention
        keeps it out of the real tokens' states."""
        if data.dim() != 2:
            raise HyperRouterError(f"data must be [qlen, batch] token ids, got {tuple(data.shape)}")
        mlps = self._moe_mlps()
        routing_ids = {}
        if mlps:
            columns = torch.arange(data.shape[1], device=data.device)
            routing_ids = {"token_ids": data, "sequence_ids": columns.expand_as(data)}
        call = _Call(routing_ids, token_mask)
        for mlp in mlps:
            mlp.call = call
        try:
            hidden_BTD = self.decoder(input_ids=data.t(), use_cache=False).last_hidden_state
        finally:
            for mlp in mlps:
                mlp.call = None
        aux = hidden_BTD.new_zeros((), dtype=torch.float32)
        for out in call.outputs:
            for value in out.aux_losses.values():
                aux = aux + value
        return hidden_BTD.transpose(0, 1), aux, call.outputs

    def features(
        self, data: Tensor, token_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor, list[MoEOutput]]:
        """(hidden, aux loss, MoE outputs) as `TransformerXL.features`: what a classifier reads."""
        return self.body(data, token_mask)

    def drop_lm_head(self) -> None:
        """Forget the LM head (a classifier does not use it)."""
        self.lm_head = None

    def replace_embedding(self, n_token: int) -> None:
        """A freshly initialised input embedding of `n_token` symbols (a task vocabulary)."""
        embedding = nn.Embedding(n_token, self.config.d_model)
        nn.init.normal_(embedding.weight, 0.0, self.config.init_std)
        self.decoder.embed_tokens = embedding
        self.n_token = n_token

    def forward(
        self, data: Tensor, target: Tensor | None = None, mems: list[Tensor] | None = None
    ) -> LMOutput:
        """LMOutput of one segment; `mems` is accepted for the trainer's sake and ignored."""
        hidden, aux, outs = self.body(data)
        if target is None:
            return LMOutput(None, None, [], aux, hidden, outs)
        tgt_len = target.shape[0]
        logits = self.lm_head(hidden[-tgt_len:])
        nll = F.cross_entropy(
            logits.reshape(-1, self.n_token).float(), target.reshape(-1), reduction="none"
        ).view(tgt_len, -1)
        return LMOutput(nll.mean(), nll, [], aux, None, outs)

    # ------------------------------------------------------------------ cost
    def macs_per_token(self, shape, k: float | Sequence[float] | None = None) -> dict[str, float]:
        """Multiply-adds per target token of one evaluation forward, by part
        (`hyperrouter.cost.PARTS`), as `hyperrouter.cost.macs_per_token` counts Transformer-XL's:
        projections q, k, v (n_kv_head heads) and o; scores q.k and p.v over the segment's qlen
        keys (the masked half included, as the kernels compute it); experts and router per MoE
        layer; the dense SwiGLU MLP (3 d d_inner); the LM head (d V). `shape.mlen` is 0 here."""
        from hyperrouter.cost import PARTS, _expert_macs, _router_macs, moe_layer_k

        c = self.config
        d, heads, d_head = c.d_model, c.n_head, c.d_head
        kv_heads = c.n_kv_head or c.n_head
        out = dict.fromkeys(PARTS, 0.0)
        moe_index = 0
        for layer in self.decoder.layers:
            out["attention_projections"] += 2 * d * heads * d_head + 2 * d * kv_heads * d_head
            out["attention_scores"] += 2 * heads * d_head * (shape.mlen + shape.qlen)
            if not isinstance(layer.mlp, MoEMLP):
                out["dense_ffn"] += 3 * d * layer.mlp.intermediate_size
                continue
            moe = layer.mlp.moe
            layer_k = moe_layer_k(moe, k, moe_index)
            moe_index += 1
            out["experts"] += _expert_macs(moe, layer_k)
            out["router"] += _router_macs(moe, shape.qlen * shape.batch)
        out["softmax"] = float(d * self.n_token)
        return out
