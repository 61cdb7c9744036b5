"""Hash layers: each token's expert is a fixed function of its token id; nothing is learned.

Roller, Sukhbaatar, Szlam, Weston: "Hash Layers For Large Sparse Models", NeurIPS 2021,
arXiv 2106.04426; one of the three routers of Clark et al., "Unified Scaling Laws for Routed
Language Models", ICML 2022, arXiv 2202.01169 (HASH).

    e_j(t) = table[token_id_t mod V, j],   j = 0 .. k-1,   y_t = (1/k) sum_j E_{e_j(t)}(x_t)

`table` [V, C] is a persistent buffer (saved in checkpoints): row v lists C distinct experts for
token id v, column j being the j-th hash. At k = 1 the output is E_{e_0(t)}(x_t) with weight 1:
hash outputs are not gate-weighted (Roller et al.).

Tables (`table`):
- "random" (default): each row is a seeded random permutation of the E experts, so column 0 is a
  uniform random vocab -> expert hash (Roller et al.'s "Random Hash"). `seed` None draws the seed
  from torch's global generator when the router is built (so the model's seed decides and
  layers get different tables); an int fixes the table.
- "balanced": built from token frequencies so that each expert receives about the same number
  of training tokens (Roller et al.'s "Balanced assignment"): tokens in decreasing frequency go
  to the least-loaded expert (greedy longest-processing-time), column by column, each column
  avoiding the experts the token already has. Build it with `fit_table(counts)` (counts per
  token id over the training corpus; `token_counts(token_ids, vocab_size)` counts a tensor of
  ids). Routing with an unfitted balanced table is an error. A token more frequent than 1/E of
  the corpus cannot be split, so no table balances beyond that.

Options (defaults): table "random", vocab_size 65536 (covers byte/character vocabularies and
BPE vocabularies up to 64k; set the model's vocabulary size for larger ones), seed None,
num_tables None (= E columns, so every k up to E works; fewer columns save memory, and a k
larger than num_tables is an error).

Differences from the paper / reference code, and why:
- Token ids >= vocab_size are hashed modulo vocab_size (robust for any id, at the price of
  collisions: ids v and v + V share experts); negative ids are an error.
- k > 1 (Roller et al. and Clark et al. route top-1): k distinct experts per token from the first
  k columns, weights 1/k each so the output scale does not depend on k. This is "MultiHash-like"
  only in that several hashes are combined: Roller et al.'s MultiHash splits the hidden state
  into segments and hashes each; here every expert sees the whole token.
- The balanced table is built greedily from counts of the training tokens (Roller et al. build
  theirs from training-set frequencies too); the exact hash Clark et al. used is not known.
- Needs token ids: a model that passes none gets an error, never a silent fallback.
"""

from __future__ import annotations

import heapq

import torch
from torch import Tensor

from hyperrouter.errors import HyperRouterError
from hyperrouter.routers.base import Router, Routing, RoutingContext, check_option, register_router
from hyperrouter.routers.losses import at_least_fp32

HASH_TABLES = ("random", "balanced")
DEFAULT_VOCAB_SIZE = 65536


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def token_counts(token_ids: Tensor, vocab_size: int) -> Tensor:
    """Occurrences [vocab_size] of each token id (ids >= vocab_size counted modulo vocab_size)."""
    ids = token_ids.reshape(-1).long()
    if ids.numel() and int(ids.min()) < 0:
        raise HyperRouterError(f"token ids must be >= 0, got {int(ids.min())}")
    return torch.bincount(ids % vocab_size, minlength=vocab_size)


def random_hash_table(
    vocab_size: int, num_experts: int, num_tables: int | None = None, seed: int = 0
) -> Tensor:
    """[vocab_size, num_tables] int32: each row the first num_tables of a seeded random
    permutation of the experts (column 0 is a uniform random token -> expert hash)."""
    columns = num_experts if num_tables is None else num_tables
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.rand(vocab_size, num_experts, generator=gen).argsort(dim=1)
    return perm[:, :columns].to(torch.int32).contiguous()


def balanced_hash_table(
    counts: Tensor,
    num_experts: int,
    num_tables: int | None = None,
    vocab_size: int | None = None,
    seed: int = 0,
) -> Tensor:
    """[vocab_size, num_tables] int32 table balancing the token counts over the experts.

    `counts` [V'] are occurrences per token id (longer than vocab_size: folded modulo it). Tokens
    in decreasing count go, column by column, to the least-loaded expert they do not have yet
    (greedy LPT: every column's max load is at most the mean plus the largest token count).
    Tokens never seen keep a seeded random permutation (they add no load).
    """
    counts = counts.reshape(-1).detach().to("cpu", torch.long)
    vocab = counts.numel() if vocab_size is None else vocab_size
    if counts.numel() and int(counts.min()) < 0:
        raise HyperRouterError(f"token counts must be >= 0, got {int(counts.min())}")
    if counts.numel() != vocab:
        folded = torch.zeros(vocab, dtype=torch.long)
        counts = folded.index_add_(0, torch.arange(counts.numel()) % vocab, counts)
    columns = num_experts if num_tables is None else num_tables
    table = random_hash_table(vocab, num_experts, columns, seed)
    order = torch.sort(counts, descending=True, stable=True).indices
    seen = order[counts[order] > 0].tolist()
    weights = counts[seen].tolist()
    rows = table[seen] if seen else table[:0]
    taken = [0] * len(seen)  # bit mask of the experts each seen token already has
    for j in range(columns):
        heap = [(0, e) for e in range(num_experts)]
        chosen = []
        for i, count in enumerate(weights):
            skipped = []
            load, e = heapq.heappop(heap)
            while taken[i] >> e & 1:
                skipped.append((load, e))
                load, e = heapq.heappop(heap)
            chosen.append(e)
            taken[i] |= 1 << e
            heapq.heappush(heap, (load + count, e))
            for item in skipped:
                heapq.heappush(heap, item)
        if seen:
            rows[:, j] = torch.tensor(chosen, dtype=torch.int32)
    if seen:
        table[torch.tensor(seen)] = rows
    return table


@register_router("hash")
class HashRouter(Router):
    """Hash layers: experts = table[token_id], weight 1 (1/k each at k > 1), no parameters."""

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        *,
        table: str = "random",
        vocab_size: int = DEFAULT_VOCAB_SIZE,
        seed: int | None = None,
        num_tables: int | None = None,
    ) -> None:
        super().__init__(d_model, num_experts)
        check_option("table", table, table in HASH_TABLES, f"one of {', '.join(HASH_TABLES)}")
        check_option(
            "vocab_size", vocab_size, _is_int(vocab_size) and vocab_size >= 1, "an integer >= 1"
        )
        check_option("seed", seed, seed is None or _is_int(seed), "None or an integer")
        check_option(
            "num_tables",
            num_tables,
            num_tables is None or (_is_int(num_tables) and 1 <= num_tables <= num_experts),
            f"None or an integer in [1, num_experts={num_experts}]",
        )
        if seed is None:
            seed = int(torch.randint(0, 2**31 - 1, ()).item())
        self.table_kind = table
        self.vocab_size = vocab_size
        self.seed = seed
        self.num_tables = num_experts if num_tables is None else num_tables
        self.register_buffer(
            "table", random_hash_table(vocab_size, num_experts, self.num_tables, seed)
        )
        self.register_buffer("fitted", torch.tensor(table == "random"))

    @torch.no_grad()
    def fit_table(self, counts: Tensor) -> None:
        """Build the balanced table from per-token-id counts of the training tokens."""
        if self.table_kind != "balanced":
            raise HyperRouterError(
                f"fit_table needs router option table='balanced', got table={self.table_kind!r}"
            )
        built = balanced_hash_table(
            counts, self.num_experts, self.num_tables, self.vocab_size, self.seed
        )
        self.table.copy_(built.to(self.table.device))
        self.fitted.fill_(True)

    def fit_token_counts(self, counts_V: Tensor) -> None:
        """The trainer's hook before training from scratch: a balanced table is fitted to the
        training data's token counts; a random table ignores them."""
        if self.table_kind == "balanced":
            self.fit_table(counts_V)

    def forward(self, x_TD: Tensor, ctx: RoutingContext | int) -> Routing:
        ctx = self.context(ctx)
        if ctx.token_ids is None:
            raise HyperRouterError(
                "router 'hash' routes by token id: the model must pass token_ids to the MoE layer"
            )
        if ctx.top_k > self.num_tables:
            raise HyperRouterError(
                f"top_k must be <= the hash router's num_tables={self.num_tables}, got {ctx.top_k}"
            )
        if not bool(self.fitted):
            raise HyperRouterError(
                "hash router table='balanced' is not fitted: call fit_table(token counts of the "
                "training corpus) before routing"
            )
        ids_T = ctx.token_ids.reshape(-1).long()
        if ids_T.shape[0] != x_TD.shape[0]:
            raise HyperRouterError(
                f"token_ids must have one id per routed token ({x_TD.shape[0]}), "
                f"got {ids_T.shape[0]}"
            )
        if ids_T.numel() and int(ids_T.min()) < 0:
            raise HyperRouterError(f"token ids must be >= 0, got {int(ids_T.min())}")
        rows_T = (ids_T % self.vocab_size).to(self.table.device)
        ids_TK = self.table[rows_T, : ctx.top_k].long()
        weights_TK = torch.full(
            ids_TK.shape,
            1.0 / ctx.top_k,
            dtype=at_least_fp32(x_TD).dtype,
            device=x_TD.device,
        )
        return Routing(ids_TK, weights_TK)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, table={self.table_kind}, vocab_size={self.vocab_size}, "
            f"num_tables={self.num_tables}, seed={self.seed}"
        )
