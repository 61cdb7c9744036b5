"""Vocabularies: byte values for character-level corpora, frequency-ordered words for word corpora.

A `Vocab` is a list of symbols with their counts; a symbol's id is its position. It is saved with
every checkpoint (`to_dict`, plain JSON) so a model is always read back with the ids it was
trained on.

- kind "char": the symbols are byte values (ints 0..255) in increasing order, then `<unk>` for
  bytes the corpus never contained (a fine-tuning task encoded with a pretrained vocabulary can
  hold such bytes). Counts are occurrences in the whole corpus.
- kind "word": whitespace tokens ordered by descending training frequency, ties broken by first
  appearance (adaptive softmax cutoffs rely on frequent words having small ids). `<eos>` is counted
  like a word (one per line) and `<unk>` is always present: corpora such as WikiText contain literal
  `<unk>` tokens, which share its id with every out-of-vocabulary word.
- kind "bpe": the symbols of a byte-level BPE tokenizer in id order (`hyperrouter.data.bpe`), with
  the tokenizer's JSON (`tokenizer`, saved with the vocabulary) that encodes and decodes; counts are
  occurrences in the training split. Every byte is a symbol: there is no `<unk>` (`unk_id` None).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from hyperrouter.errors import HyperRouterError

UNK = "<unk>"
EOS = "<eos>"
SPECIALS = (UNK, EOS)
KINDS = ("char", "word", "bpe")
_NEWLINE = re.compile(r"\r\n|\r|\n")
_REPLACEMENT = "\ufffd".encode()  # how <unk> is shown when char ids are decoded


def split_lines(text: str) -> list[str]:
    """Lines as reading a text file yields them: \\n, \\r\\n and \\r end a line, nothing else."""
    lines = _NEWLINE.split(text)
    if lines and lines[-1] == "":
        lines.pop()
    return lines


class Vocab:
    """Symbols with counts; `stoi` maps a symbol to its id (see the module docstring)."""

    def __init__(
        self,
        kind: str,
        symbols: Sequence[Any],
        counts: Sequence[int],
        tokenizer: str | None = None,
    ) -> None:
        if kind not in KINDS:
            raise HyperRouterError(f"vocabulary kind {kind!r} is not valid; use char, word or bpe")
        if len(symbols) != len(counts):
            raise HyperRouterError(
                f"vocabulary has {len(symbols)} symbols but {len(counts)} counts; they must match"
            )
        self.kind = kind
        self.symbols = list(symbols)
        self.counts = [int(c) for c in counts]
        self.stoi: dict[Any, int] = {s: i for i, s in enumerate(self.symbols)}
        if len(self.stoi) != len(self.symbols):
            raise HyperRouterError("vocabulary has duplicate symbols; each symbol must occur once")
        if UNK not in self.stoi and kind != "bpe":
            raise HyperRouterError(f"vocabulary has no {UNK} symbol; every vocabulary needs one")
        self.unk_id: int | None = self.stoi.get(UNK)
        self.eos_id: int | None = self.stoi.get(EOS)
        self.tokenizer = tokenizer
        self._tokenizer = None  # the loaded tokenizers.Tokenizer (bpe), made on first use
        if kind == "bpe":
            if not isinstance(tokenizer, str) or not all(isinstance(s, str) for s in self.symbols):
                raise HyperRouterError(
                    "a bpe vocabulary needs string symbols and its tokenizer's JSON text"
                )
        elif kind == "char":
            bad = [s for s in self.symbols if s != UNK and not (type(s) is int and 0 <= s < 256)]
            if bad:
                raise HyperRouterError(
                    f"character vocabulary symbol {bad[0]!r} is not valid; use byte values 0..255"
                )
            table = np.full(256, self.unk_id, dtype=np.int64)
            for i, s in enumerate(self.symbols):
                if s != UNK:
                    table[s] = i
            self.byte_table = table  # byte value -> id, for vectorised encoding
        elif not all(isinstance(s, str) for s in self.symbols):
            raise HyperRouterError("word vocabulary symbols must all be strings")

    def __len__(self) -> int:
        return len(self.symbols)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and (self.kind, self.symbols, self.tokenizer) == (
            other.kind,
            other.symbols,
            other.tokenizer,
        )

    @property
    def token_bytes(self) -> np.ndarray | None:
        """UTF-8 bytes each id stands for (bpe; int64 [V]); None for char and word vocabularies
        (a char id is one byte, a word has no fixed byte length)."""
        if self.kind != "bpe":
            return None
        from hyperrouter.data.bpe import symbol_bytes

        return np.array([len(symbol_bytes(s)) for s in self.symbols], dtype=np.int64)

    def _bpe(self):
        if self._tokenizer is None:
            from hyperrouter.data.bpe import load

            self._tokenizer = load(self.tokenizer)
        return self._tokenizer

    def __repr__(self) -> str:
        head = ", ".join(repr(s) for s in self.symbols[:5])
        return f"Vocab(kind={self.kind!r}, size={len(self)}, symbols=[{head}, ...])"

    # ------------------------------------------------------------------ building
    @classmethod
    def from_bytes(cls, chunks: Iterable[bytes]) -> Vocab:
        """Character vocabulary of every byte value occurring in `chunks`, plus `<unk>`."""
        counts = np.zeros(256, dtype=np.int64)
        for chunk in chunks:
            counts += np.bincount(np.frombuffer(chunk, dtype=np.uint8), minlength=256)
        values = np.flatnonzero(counts).tolist()
        return cls("char", [*values, UNK], [int(counts[v]) for v in values] + [0])

    @classmethod
    def from_counts(
        cls,
        words: Sequence[str],
        counts: Sequence[int],
        *,
        min_freq: int = 1,
        max_size: int | None = None,
    ) -> Vocab:
        """Word vocabulary from words in first-appearance order and their counts.

        Words are ranked by count (ties keep their order); words seen fewer than `min_freq`
        times, or beyond `max_size` symbols in all, are left out and later map to `<unk>`.
        `<unk>` and `<eos>` are always kept (added with count 0 if absent).
        """
        if isinstance(min_freq, bool) or not isinstance(min_freq, int) or min_freq < 1:
            raise HyperRouterError(f"min_freq must be an integer >= 1, got {min_freq!r}")
        if max_size is not None and (
            isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 3
        ):
            raise HyperRouterError(
                f"max_size must be an integer >= 3 (it includes {UNK} and {EOS}) or None, "
                f"got {max_size!r}"
            )
        order = sorted(range(len(words)), key=lambda i: -counts[i])  # stable: ties by appearance
        ranked = [words[i] for i in order if counts[i] >= min_freq or words[i] in SPECIALS]
        if max_size is not None:
            budget = max_size - len(SPECIALS)
            kept = {w for w in ranked if w not in SPECIALS}
            if len(kept) > budget:
                kept = set([w for w in ranked if w not in SPECIALS][:budget])
            ranked = [w for w in ranked if w in SPECIALS or w in kept]
        symbols = ranked + [s for s in (EOS, UNK) if s not in ranked]
        count_of = dict(zip(words, counts))
        return cls("word", symbols, [count_of.get(s, 0) for s in symbols])

    @classmethod
    def from_words(
        cls, lines: Iterable[str], *, min_freq: int = 1, max_size: int | None = None
    ) -> Vocab:
        """Word vocabulary of whitespace tokens in `lines`, counting one `<eos>` per line."""
        counter: Counter[str] = Counter()
        for line in lines:
            counter.update(line.split())
            counter[EOS] += 1
        return cls.from_counts(
            list(counter), list(counter.values()), min_freq=min_freq, max_size=max_size
        )

    # ------------------------------------------------------------------ encoding
    def encode(self, text: str | bytes, add_eos: bool = False) -> list[int]:
        """Ids of `text`: its UTF-8 bytes (char), whitespace words (word) or BPE tokens (bpe).

        For word vocabularies `add_eos=True` ends every line with `<eos>`, exactly as corpora
        are tokenized; the default encodes the words only (e.g. a classification example).
        """
        if self.kind == "char":
            data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
            return self.byte_table[np.frombuffer(data, dtype=np.uint8)].tolist()
        if self.kind == "bpe":
            from hyperrouter.data.bpe import encode, text_of

            text = text_of(bytes(text)) if isinstance(text, (bytes, bytearray)) else text
            return encode(self._bpe(), text).tolist()
        text = text.decode("utf-8") if isinstance(text, bytes) else text
        if not add_eos:
            return self.encode_line(text, add_eos=False)
        return [i for line in split_lines(text) for i in self.encode_line(line)]

    def encode_line(self, line: str, add_eos: bool = True) -> list[int]:
        """Word ids of one line, unknown words as `<unk>`, then `<eos>` unless add_eos is False."""
        get, unk = self.stoi.get, self.unk_id
        ids = [get(w, unk) for w in line.split()]
        if add_eos:
            if self.eos_id is None:
                raise HyperRouterError(f"this vocabulary has no {EOS} symbol to end lines with")
            ids.append(self.eos_id)
        return ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes of character or BPE ids; `<unk>` becomes U+FFFD (the replacement character)."""
        if self.kind == "bpe":
            from hyperrouter.data.bpe import symbol_bytes

            return b"".join(symbol_bytes(self.symbols[int(i)]) for i in ids)
        if self.kind != "char":
            raise HyperRouterError("decode_bytes needs a character or bpe vocabulary; use decode")
        pieces = [bytes([s]) if s != UNK else _REPLACEMENT for s in self.symbols]
        return b"".join(pieces[int(i)] for i in ids)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`: bytes decoded as UTF-8 (char, bpe) or words joined by spaces (word)."""
        if self.kind in ("char", "bpe"):
            return self.decode_bytes(ids).decode("utf-8", errors="replace")
        return " ".join(self.symbols[int(i)] for i in ids)

    # ------------------------------------------------------------------ saving
    def to_dict(self) -> dict[str, Any]:
        """A JSON-able form, saved next to checkpoints (with the tokenizer of a bpe vocabulary)."""
        out = {"kind": self.kind, "symbols": list(self.symbols), "counts": list(self.counts)}
        if self.kind == "bpe":
            out["tokenizer"] = self.tokenizer
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Vocab:
        """Inverse of `to_dict`."""
        try:
            return cls(data["kind"], data["symbols"], data["counts"], data.get("tokenizer"))
        except (KeyError, TypeError) as err:
            raise HyperRouterError(
                f"vocabulary data is malformed ({err!r}); expected keys kind, symbols, counts"
            ) from None
