"""Vocabularies: bytes for character-level corpora, frequency-ordered words for word corpora."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from hyperrouter.errors import HyperRouterError

UNK = "<unk>"
EOS = "<eos>"


class Vocab:
    """Symbols with counts; `stoi` maps a symbol to its id.

    kind "char": symbols are byte values (ints 0..255), sorted by value, plus `<unk>` last for bytes
    never seen (e.g. a fine-tuning task encoded with a pretrained vocabulary).
    kind "word": symbols are strings ordered by descending training frequency (ties: first
    appearance), with `<unk>` and `<eos>` always present; adaptive softmax relies on the order.
    """

    def __init__(self, kind: str, symbols: Sequence[Any], counts: Sequence[int]) -> None:
        if kind not in ("char", "word"):
            raise HyperRouterError(f"vocabulary kind must be char or word, got {kind!r}")
        if len(symbols) != len(counts):
            raise HyperRouterError("vocabulary symbols and counts differ in length")
        self.kind = kind
        self.symbols = list(symbols)
        self.counts = [int(c) for c in counts]
        self.stoi = {s: i for i, s in enumerate(self.symbols)}
        self.unk_id = self.stoi[UNK]
        self.eos_id = self.stoi.get(EOS)
        if kind == "char":
            table = [self.unk_id] * 256
            for i, s in enumerate(self.symbols):
                if isinstance(s, int):
                    table[s] = i
            self._byte_table = bytes(table) if len(self.symbols) <= 256 else None
            self._byte_ids = table

    def __len__(self) -> int:
        return len(self.symbols)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and (self.kind, self.symbols) == (other.kind, other.symbols)

    # ------------------------------------------------------------------ building
    @classmethod
    def from_bytes(cls, chunks: Iterable[bytes]) -> Vocab:
        counter: Counter[int] = Counter()
        for chunk in chunks:
            counter.update(chunk)
        values = sorted(counter)
        return cls("char", [*values, UNK], [counter[v] for v in values] + [0])

    @classmethod
    def from_words(
        cls, lines: Iterable[str], *, min_freq: int = 1, max_size: int | None = None
    ) -> Vocab:
        counter: Counter[str] = Counter()
        for line in lines:
            counter.update(line.split())
            counter[EOS] += 1
        ordered = [w for w, c in counter.most_common() if c >= min_freq or w in (UNK, EOS)]
        if max_size is not None and len(ordered) > max_size:
            kept = ordered[:max_size]
            ordered = [w for w in kept if w not in (UNK, EOS)][: max_size - 2] + [UNK, EOS]
            ordered.sort(key=lambda w: -counter.get(w, 0))
        symbols = [*ordered] + [s for s in (EOS, UNK) if s not in ordered]
        return cls("word", symbols, [counter.get(s, 0) for s in symbols])

    # ------------------------------------------------------------------ encoding
    def encode_bytes(self, data: bytes) -> list[int]:
        return [self._byte_ids[b] for b in data]

    def encode_line(self, line: str, add_eos: bool = True) -> list[int]:
        ids = [self.stoi.get(w, self.unk_id) for w in line.split()]
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def encode(self, text: str | bytes) -> list[int]:
        """Ids for a text: bytes (char) or whitespace words (word; no <eos> added)."""
        if self.kind == "char":
            return self.encode_bytes(text.encode("utf-8") if isinstance(text, str) else text)
        text = text.decode("utf-8") if isinstance(text, bytes) else text
        return self.encode_line(text, add_eos=False)

    def decode(self, ids: Iterable[int]) -> str:
        if self.kind == "char":
            raw = bytes(s for s in (self.symbols[i] for i in ids) if isinstance(s, int))
            return raw.decode("utf-8", errors="replace")
        return " ".join(self.symbols[i] for i in ids)

    # ------------------------------------------------------------------ saving
    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "symbols": self.symbols, "counts": self.counts}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Vocab:
        try:
            return cls(data["kind"], data["symbols"], data["counts"])
        except (KeyError, TypeError):
            raise HyperRouterError("vocabulary file is malformed") from None
