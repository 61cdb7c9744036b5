"""Language-model corpora: character level (bytes) and word level, tokenized once and cached.

- A single file is a character-level corpus split by bytes: the last 5% test, the 5% before it
  valid, the rest train. For the 100,000,000-byte enwik8 that is exactly the standard first 90M
  train / next 5M valid / last 5M test split.
- A directory holds train/valid/test files (`train.txt`, `wiki.train.tokens`, `ptb.train.txt`,
  `dev` for valid, ...); several files of one split (`ptb.train.part1.txt`, `...part2.txt`) are
  concatenated in name order. WikiText (`wiki.*.tokens`) and PTB word files (`ptb.*.txt`, not
  `ptb.char.*`) are word level; anything else character level, unless `kind` says otherwise.
- Word level: whitespace tokens with `<eos>` at the end of every line (blank lines included, as
  Transformer-XL does), vocabulary from the training split ordered by frequency, unknown words
  in valid/test map to `<unk>`.
- `path=None` is the built-in corpus (hyperrouter.data.builtin).

Tokenized splits are cached under the content hash of the inputs (env HYPERROUTER_CACHE, else
$XDG_CACHE_HOME/hyperrouter or ~/.cache/hyperrouter), written atomically and rebuilt if unreadable.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from hyperrouter.data import builtin
from hyperrouter.data.vocab import Vocab
from hyperrouter.errors import HyperRouterError

TOKENIZER_VERSION = 1
SPLITS = ("train", "valid", "test")
KINDS = ("auto", "char", "word")
_SPLIT_WORDS = {"train": ("train",), "valid": ("valid", "dev"), "test": ("test",)}


@dataclass
class Corpus:
    name: str
    kind: str
    vocab: Vocab
    train: Tensor
    valid: Tensor
    test: Tensor
    source: str
    content_hash: str


def split_sizes(n: int) -> tuple[int, int, int]:
    """(train, valid, test) byte counts of a single-file corpus: 90/5/5, integer arithmetic."""
    n_valid = n_test = n * 5 // 100
    return n - n_valid - n_test, n_valid, n_test


def default_cache_dir() -> Path:
    if os.environ.get("HYPERROUTER_CACHE"):
        return Path(os.environ["HYPERROUTER_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hyperrouter"


# --------------------------------------------------------------------------- discovering files


def _split_of(name: str) -> str | None:
    lower = name.lower()
    if lower.startswith(".") or lower.startswith("readme"):
        return None
    tokens = set(re.split(r"[^a-z0-9]+", lower))
    for split, words in _SPLIT_WORDS.items():
        if tokens & set(words):
            return split
    return None


def find_split_files(directory: Path, kind: str = "auto") -> dict[str, list[Path]]:
    """Files of each split in `directory`, sorted by name; raises if a split is missing.

    A folder holding both PTB character files (`ptb.char.*`) and word files uses the word files
    for kind word or auto, and only the character files for kind char.
    """
    candidates = [p for p in sorted(directory.iterdir()) if p.is_file() and _split_of(p.name)]
    has_char = any(".char." in p.name for p in candidates)
    has_other = any(".char." not in p.name for p in candidates)
    if has_char and has_other:
        want_char = kind == "char"
        candidates = [p for p in candidates if (".char." in p.name) == want_char]
    found: dict[str, list[Path]] = {s: [] for s in SPLITS}
    for path in candidates:
        found[_split_of(path.name)].append(path)
    missing = [s for s in SPLITS if not found[s]]
    if missing:
        raise HyperRouterError(
            f"{directory} has no {'/'.join(missing)} file; expected train/valid/test files such "
            f"as train.txt valid.txt test.txt, wiki.train.tokens ..., ptb.train.txt ... "
            f"('dev' also names valid)"
        )
    return found


def _auto_kind(files: dict[str, list[Path]]) -> str:
    names = [p.name for paths in files.values() for p in paths]
    if all(n.startswith("wiki.") and n.endswith((".tokens", ".raw")) for n in names):
        return "word"
    if all(n.startswith("ptb.") and not n.startswith("ptb.char.") for n in names):
        return "word"
    return "char"


# --------------------------------------------------------------------------- loading


def load_corpus(
    path: str | os.PathLike | None,
    kind: str = "auto",
    cache_dir: str | os.PathLike | bool | None = None,
    *,
    min_freq: int = 1,
    max_size: int | None = None,
) -> Corpus:
    """Load (or read from cache) a tokenized corpus; see the module docstring for the rules.

    cache_dir: a folder, None for the default, or False to disable caching.
    """
    if kind not in KINDS:
        raise HyperRouterError(f"unknown corpus kind {kind!r}; valid: {', '.join(KINDS)}")
    if path is None:
        raw = {"all": builtin.builtin_corpus_bytes()}
        name, source = builtin.NAME, "built-in tiny Shakespeare (hyperrouter.data.builtin)"
        if kind == "word":
            raise HyperRouterError("the built-in corpus is character level; use data.kind=char")
        kind = "char"
        files: dict[str, list[Path]] | None = None
    else:
        p = Path(path).expanduser()
        if not p.exists():
            raise HyperRouterError(f"data path {p} does not exist")
        name, source = p.name, str(p.resolve())
        if p.is_dir():
            files = find_split_files(p, kind)
            if kind == "auto":
                kind = _auto_kind(files)
            raw = {s: b"".join(_read(f) for f in files[s]) for s in SPLITS}
        else:
            files = None
            if kind == "word":
                raise HyperRouterError(
                    f"{p} is a single file; a word-level corpus needs a directory with "
                    f"train/valid/test files"
                )
            kind = "char"
            raw = {"all": _read(p)}
    options = {"kind": kind, "min_freq": min_freq, "max_size": max_size, "v": TOKENIZER_VERSION}
    digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    for key in sorted(raw):
        digest.update(key.encode())
        digest.update(hashlib.sha256(raw[key]).digest())
    content_hash = digest.hexdigest()

    cache = None if cache_dir is False else Path(cache_dir or default_cache_dir()) / content_hash
    if cache is not None:
        cached = _read_cache(cache)
        if cached is not None:
            vocab, splits = cached
            return Corpus(name, kind, vocab, *splits, source, content_hash)

    if kind == "char":
        if "all" in raw:
            n_train, n_valid, _ = split_sizes(len(raw["all"]))
            data = raw["all"]
            raw = {
                "train": data[:n_train],
                "valid": data[n_train : n_train + n_valid],
                "test": data[n_train + n_valid :],
            }
        vocab = Vocab.from_bytes(raw[s] for s in SPLITS)
        table = np.array(vocab._byte_ids, dtype=np.int64)
        arrays = {s: table[np.frombuffer(raw[s], dtype=np.uint8)] for s in SPLITS}
    else:
        text = {s: _decode(raw[s], files[s] if files else [Path(name)]) for s in SPLITS}
        vocab = Vocab.from_words(text["train"].splitlines(), min_freq=min_freq, max_size=max_size)
        arrays = {
            s: np.array(
                [i for line in text[s].splitlines() for i in vocab.encode_line(line)],
                dtype=np.int64,
            )
            for s in SPLITS
        }
    for s in SPLITS:
        if arrays[s].size < 2:
            where = files[s][0] if files else source
            raise HyperRouterError(f"the {s} split of {where} has fewer than 2 tokens")
    splits = [torch.from_numpy(arrays[s]) for s in SPLITS]
    if cache is not None:
        _write_cache(cache, vocab, arrays)
    return Corpus(name, kind, vocab, *splits, source, content_hash)


def _read(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise HyperRouterError(f"cannot read {path}: {err.strerror}") from None
    if not data:
        raise HyperRouterError(f"{path} is empty")
    return data


def _decode(data: bytes, files: list[Path]) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        offset, where = err.start, files[0]
        for f in files:  # name the file that holds the bad byte
            size = f.stat().st_size
            if offset < size:
                where = f
                break
            offset -= size
        raise HyperRouterError(
            f"{where} is not valid UTF-8 text (byte offset {offset}); a word-level corpus "
            f"must be UTF-8"
        ) from None


# --------------------------------------------------------------------------- cache


def _read_cache(folder: Path) -> tuple[Vocab, list[Tensor]] | None:
    try:
        vocab = Vocab.from_dict(json.loads((folder / "vocab.json").read_text()))
        splits = [torch.from_numpy(np.load(folder / f"{s}.npy").astype(np.int64)) for s in SPLITS]
    except (OSError, ValueError, HyperRouterError):
        return None
    return vocab, splits


def _write_cache(folder: Path, vocab: Vocab, arrays: dict[str, np.ndarray]) -> None:
    """Write into a temp folder, then rename it into place (a killed run leaves no half entry)."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
        small = len(vocab) <= 256
        for s, arr in arrays.items():
            np.save(tmp / f"{s}.npy", arr.astype(np.uint8 if small else np.int32))
        (tmp / "vocab.json").write_text(json.dumps(vocab.to_dict()))
        if folder.exists():  # an unreadable entry: replace it
            import shutil

            shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    except OSError:
        pass  # caching is an optimisation; a read-only home must not break training
