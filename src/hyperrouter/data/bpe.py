"""Byte-level BPE tokenizers for sub-word corpora (`data.kind: bpe`), trained offline.

The tokenizer is GPT-2's byte-level BPE built with HuggingFace `tokenizers` (an optional
dependency: `bash scripts/setup.sh hf`): no normalizer, the ByteLevel pre-tokenizer (GPT-2's
split regex, no prefix space) and decoder, the 256 byte symbols as the initial alphabet, merges of
pairs seen at least twice up to `vocab_size` symbols, no special tokens (every byte is a symbol,
so nothing is unknown). It is trained on the training split only, line by line (a line keeps its
end of line; merges never cross one), and the same line split is used to encode, so training and
encoding always see the same pieces. Training is deterministic (checked across processes in
tests/test_decoder.py): a run resumed or re-trained elsewhere gets the same tokenizer.

Text is the corpus bytes decoded as UTF-8; a byte that is not valid UTF-8 (for instance a character
cut in two by the 90/5/5 byte split of a single file) becomes U+FFFD, whose 3 UTF-8 bytes then count
as the text's bytes in bits per byte.

Trained tokenizers are cached as `<cache>/corpora/tokenizers/<key>.json`, the key covering the
training split's bytes and the tokenizer options (`cached_tokenizer`), so a second load of the
same corpus does not train again; the tokenized corpus itself is cached like any other
(`hyperrouter.data.corpus`), its content hash covering the tokenizer's JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from hyperrouter.errors import HyperRouterError

MISSING = "data.kind bpe needs the tokenizers package (the hf extra): bash scripts/setup.sh hf"
MIN_VOCAB_SIZE = 257  # the 256 byte symbols and at least one merge
MIN_FREQUENCY = 2
BPE_VERSION = 1  # bump when training or encoding changes, so cached tokenizers are not reused
_BATCH_LINES = 4096


def tokenizers_module() -> Any:
    """The `tokenizers` package, imported on first use; a one-line error when it is absent."""
    try:
        import tokenizers
    except ImportError:
        raise HyperRouterError(MISSING) from None
    return tokenizers


def text_of(data: bytes) -> str:
    """Corpus bytes as text (invalid UTF-8 becomes U+FFFD; see the module docstring)."""
    return data.decode("utf-8", errors="replace")


def _lines(text: str) -> list[str]:
    return text.splitlines(keepends=True)


def _batches(lines: list[str]) -> Iterator[list[str]]:
    for i in range(0, len(lines), _BATCH_LINES):
        yield lines[i : i + _BATCH_LINES]


def train_tokenizer(text: str, vocab_size: int) -> str:
    """A byte-level BPE tokenizer trained on `text`, as tokenizer.json text."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise HyperRouterError(
            f"data.vocab_size must be >= {MIN_VOCAB_SIZE} for data.kind bpe (the 256 byte "
            f"symbols and at least one merge), got {vocab_size}"
        )
    tk = tokenizers_module()
    tokenizer = tk.Tokenizer(tk.models.BPE())
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=MIN_FREQUENCY,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
    )
    lines = _lines(text)
    tokenizer.train_from_iterator(_batches(lines), trainer=trainer, length=len(lines))
    return tokenizer.to_str()


def fingerprint(tokenizer_json: str) -> str:
    """sha256 of a tokenizer's JSON text: what identifies it in corpus content hashes."""
    return hashlib.sha256(tokenizer_json.encode()).hexdigest()


def cached_tokenizer(train: bytes, vocab_size: int, cache_root: Path | None) -> str:
    """The tokenizer of a training split: read from the cache, or trained and cached there
    (`cache_root` None: trained, not cached)."""
    options = {"vocab_size": vocab_size, "min_frequency": MIN_FREQUENCY, "version": BPE_VERSION}
    digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    digest.update(hashlib.sha256(train).digest())
    path = None
    if cache_root is not None:
        path = cache_root / "corpora" / "tokenizers" / f"{digest.hexdigest()}.json"
        cached = _read(path)
        if cached is not None:
            return cached
    tokenizer_json = train_tokenizer(text_of(train), vocab_size)
    if path is not None:
        _write(path, tokenizer_json)
    return tokenizer_json


def _read(path: Path) -> str | None:
    try:
        text = path.read_text()
        load(text)
    except (OSError, ValueError):  # an unreadable entry is trained again
        return None
    return text


def _write(path: Path, text: str) -> None:
    """Write into a temporary file beside `path`, then rename it into place."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:16]}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as err:  # the cache only saves time; a read-only home must not stop a run
        warnings.warn(f"could not write the tokenizer cache {path}: {err}", stacklevel=3)


def load(tokenizer_json: str) -> Any:
    """A `tokenizers.Tokenizer` from its JSON text."""
    tk = tokenizers_module()
    try:
        return tk.Tokenizer.from_str(tokenizer_json)
    except Exception as err:  # noqa: BLE001 (the Rust side raises its own exception type)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise HyperRouterError(f"not a valid tokenizer.json ({first})") from None


def symbols(tokenizer) -> list[str]:
    """The tokenizer's symbols in id order (ids 0..V-1, as trained)."""
    vocab = tokenizer.get_vocab()
    ordered = sorted(vocab, key=vocab.get)
    if [vocab[s] for s in ordered] != list(range(len(ordered))):
        raise HyperRouterError("the tokenizer's ids are not 0..V-1; retrain it")
    return ordered


def encode(tokenizer, text: str) -> np.ndarray:
    """Token ids (int32) of `text`, line by line as the tokenizer was trained."""
    parts = [
        np.fromiter((i for e in encodings for i in e.ids), dtype=np.int32)
        for encodings in (
            tokenizer.encode_batch(batch, add_special_tokens=False)
            for batch in _batches(_lines(text))
        )
    ]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the character that stands for each byte value, inverted."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    values, chars = list(printable), list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            values.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(values, chars)}


_BYTE_OF = _byte_decoder()


def symbol_bytes(symbol: str) -> bytes:
    """The bytes a byte-level symbol stands for."""
    try:
        return bytes(_BYTE_OF[c] for c in symbol)
    except KeyError as err:
        raise HyperRouterError(
            f"symbol {symbol!r} is not byte-level BPE (character {err.args[0]!r})"
        ) from None


def tokenize(tokenizer_json: str, raw: dict[str, bytes]):
    """Vocabulary and int32 token arrays of every split (`hyperrouter.data.corpus`)."""
    from hyperrouter.data.vocab import Vocab

    tokenizer = load(tokenizer_json)
    arrays = {split: encode(tokenizer, text_of(data)) for split, data in raw.items()}
    names = symbols(tokenizer)
    counts = np.bincount(arrays["train"], minlength=len(names)).tolist()
    return Vocab("bpe", names, counts, tokenizer=tokenizer_json), arrays
