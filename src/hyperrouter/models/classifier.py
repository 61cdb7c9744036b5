"""A text classifier on top of a (pretrained) language-model body, as in the paper's Table 2.

The body is a `TransformerXL` or a `Qwen3Decoder` (model.arch qwen3): both offer
`features(tokens, token_mask)`, `drop_lm_head()` and `replace_embedding(n)`.

Each example is encoded on its own (no memory carried between unrelated examples), right-padded
within a batch. Causal attention means real tokens never see the padding after them, and the
padding is not routed by the MoE layers (so it adds nothing to router statistics or losses).
The head is the reference's Linear(d, d) -> Tanh -> Dropout -> Linear(d, classes) on the last
real token (`pooling="last"`) or on the mean of the real tokens (`pooling="mean"`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from hyperrouter.errors import HyperRouterError
from hyperrouter.models.transformer_xl import TransformerXL

if TYPE_CHECKING:
    from hyperrouter.models.decoder import Qwen3Decoder

POOLINGS = ("last", "mean")


class Classifier(nn.Module):
    """Language-model body (Transformer-XL or the Qwen3-style decoder) + classification head.
    `new_vocab_size` replaces the input embedding with a freshly initialised one (for a task
    vocabulary); the LM's output layer is dropped."""

    def __init__(
        self,
        body: TransformerXL | Qwen3Decoder,
        num_classes: int,
        *,
        pooling: str = "last",
        head_dropout: float = 0.1,
        new_vocab_size: int | None = None,
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise HyperRouterError(f"unknown pooling {pooling!r}; valid: {', '.join(POOLINGS)}")
        if num_classes < 2:
            raise HyperRouterError(f"a classifier needs at least 2 classes, got {num_classes}")
        body.drop_lm_head()  # not used (and would keep stale tied weights alive)
        body.mem_len = 0  # no memory between unrelated examples
        if new_vocab_size is not None:
            body.replace_embedding(new_vocab_size)
        self.body = body
        self.pooling = pooling
        d_model = body.config.d_model
        self.head = nn.Sequential(
            nn.Linear(d_model, d_model),
            nn.Tanh(),
            nn.Dropout(head_dropout),
            nn.Linear(d_model, num_classes),
        )
        for layer in (self.head[0], self.head[3]):
            nn.init.normal_(layer.weight, 0.0, body.config.init_std)
            nn.init.zeros_(layer.bias)

    def forward(self, tokens: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor, list]:
        """tokens [L, B] (right-padded), lengths [B] -> (logits [B, C], aux loss, MoE outputs).

        The MoE outputs (one per MoE layer) carry each layer's named losses, statistics and
        routing; routers see token ids and the example index as the sequence id."""
        max_len, batch = tokens.shape
        positions = torch.arange(max_len, device=tokens.device)[:, None]
        mask = positions < lengths[None, :]
        hidden, aux, outs = self.body.features(tokens, token_mask=mask)
        if self.pooling == "last":
            pooled = hidden[lengths - 1, torch.arange(batch, device=tokens.device)]
        else:
            weights = mask.to(hidden.dtype).unsqueeze(-1)
            pooled = (hidden * weights).sum(0) / lengths.to(hidden.dtype).unsqueeze(-1)
        return self.head(pooled), aux, outs
