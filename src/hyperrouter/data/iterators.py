"""Transformer-XL batching: one ordered token stream cut into `batch_size` contiguous parts."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from hyperrouter.errors import HyperRouterError


class LMOrderedIterator:
    """Segments of a token stream, in order, for training and evaluation with recurrence memory.

    The stream is trimmed to a multiple of batch_size and reshaped so that column b is the b-th
    contiguous part ([n_step, batch_size]); batch i covers rows [i * tgt_len, (i + 1) * tgt_len),
    its target is the same window shifted by one token, and with `ext_len` the input also carries
    up to ext_len earlier rows of extra context. The last batch may be shorter. Batch i is a pure
    function of i, so a run resumed at step s continues with `batch_at_step(s)`, i.e.
    `get_batch(s % len(it))`, exactly where it stopped.
    """

    def __init__(
        self,
        data: Tensor,
        batch_size: int,
        tgt_len: int,
        device: str | torch.device = "cpu",
        ext_len: int = 0,
        *,
        name: str = "the data",
    ) -> None:
        for arg, value, low in (("batch_size", batch_size, 1), ("tgt_len", tgt_len, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise HyperRouterError(f"{arg} must be an integer >= {low}, got {value!r}")
        if isinstance(ext_len, bool) or not isinstance(ext_len, int) or ext_len < 0:
            raise HyperRouterError(f"ext_len must be an integer >= 0, got {ext_len!r}")
        if data.dim() != 1 or data.dtype.is_floating_point or data.dtype == torch.bool:
            raise HyperRouterError(
                f"{name} must be a 1-D tensor of token ids, got shape {tuple(data.shape)} "
                f"of {data.dtype}"
            )
        needed = batch_size * (tgt_len + 1)
        if data.numel() < needed:
            raise HyperRouterError(
                f"{name} has {data.numel():,} tokens, fewer than one batch needs (batch_size "
                f"{batch_size} x (tgt_len {tgt_len} + 1) = {needed:,}); use a smaller batch_size "
                f"or tgt_len"
            )
        self.batch_size = batch_size
        self.tgt_len = tgt_len
        self.ext_len = ext_len
        self.device = torch.device(device)
        self.n_step = data.numel() // batch_size
        trimmed = data[: self.n_step * batch_size].long()
        self.data = trimmed.reshape(batch_size, self.n_step).t().contiguous().to(self.device)

    @property
    def num_tokens(self) -> int:
        """Target tokens covered by one pass over all batches."""
        return (self.n_step - 1) * self.batch_size

    def __len__(self) -> int:
        return -(-(self.n_step - 1) // self.tgt_len)

    def get_batch(self, i: int) -> tuple[Tensor, Tensor, int]:
        """(input [ext + seq_len, B], target [seq_len, B], seq_len) of batch i."""
        if not 0 <= i < len(self):
            raise IndexError(f"batch {i} out of range [0, {len(self)})")
        start = i * self.tgt_len
        seq_len = min(self.tgt_len, self.n_step - 1 - start)
        begin = max(0, start - self.ext_len)
        return (
            self.data[begin : start + seq_len],
            self.data[start + 1 : start + 1 + seq_len],
            seq_len,
        )

    def batch_at_step(self, step: int) -> tuple[Tensor, Tensor, int]:
        """The batch a training run uses at global step `step` (passes repeat in order)."""
        return self.get_batch(step % len(self))

    def iter_from(self, start: int = 0) -> Iterator[tuple[Tensor, Tensor, int]]:
        """Batches start, start + 1, ... to the end of the pass (to resume mid-pass)."""
        if not 0 <= start <= len(self):
            raise IndexError(f"start batch {start} out of range [0, {len(self)}]")
        return (self.get_batch(i) for i in range(start, len(self)))

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, int]]:
        return self.iter_from(0)
