"""Transformer-XL batching: one ordered token stream cut into `batch_size` contiguous parts."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from hyperrouter.errors import HyperRouterError


class LMOrderedIterator:
    """Segments [tgt_len, batch] of a token stream, in order, for recurrent training/evaluation.

    The stream is trimmed to a multiple of batch_size and reshaped so that column b is the b-th
    contiguous part; batch i covers rows [i * tgt_len, (i + 1) * tgt_len) and the target is the
    same window shifted by one token. The last batch may be shorter. Batch i is a pure function of
    i, so a resumed run continues exactly where it stopped (`get_batch(step % len(it))`).
    """

    def __init__(
        self, data: Tensor, batch_size: int, tgt_len: int, device: str | torch.device = "cpu"
    ) -> None:
        if batch_size < 1 or tgt_len < 1:
            raise HyperRouterError(
                f"batch_size and tgt_len must be >= 1, got {batch_size} and {tgt_len}"
            )
        needed = batch_size * (tgt_len + 1)
        if data.numel() < needed:
            raise HyperRouterError(
                f"the corpus split has {data.numel()} tokens, fewer than one batch needs "
                f"(batch_size {batch_size} x (tgt_len {tgt_len} + 1) = {needed}); "
                f"use a smaller batch_size or tgt_len"
            )
        self.batch_size = batch_size
        self.tgt_len = tgt_len
        n_step = data.numel() // batch_size
        self.data = data[: n_step * batch_size].view(batch_size, n_step).t().contiguous().to(device)
        self.n_step = n_step

    @property
    def num_tokens(self) -> int:
        """Target tokens covered by one pass."""
        return (self.n_step - 1) * self.batch_size

    def __len__(self) -> int:
        return (self.n_step - 1 + self.tgt_len - 1) // self.tgt_len

    def get_batch(self, i: int) -> tuple[Tensor, Tensor, int]:
        """(input [seq_len, B], target [seq_len, B], seq_len) of batch i."""
        if not 0 <= i < len(self):
            raise IndexError(f"batch {i} out of range [0, {len(self)})")
        start = i * self.tgt_len
        seq_len = min(self.tgt_len, self.n_step - 1 - start)
        return (
            self.data[start : start + seq_len],
            self.data[start + 1 : start + 1 + seq_len],
            seq_len,
        )

    def iter_from(self, start: int = 0) -> Iterator[tuple[Tensor, Tensor, int]]:
        for i in range(start, len(self)):
            yield self.get_batch(i)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, int]]:
        return self.iter_from(0)
