"""Language-model corpora: character level (raw bytes) or word level, tokenized once and cached.

Where the text comes from (`load_corpus(path)`):

- `None`: the built-in tiny Shakespeare (hyperrouter.data.builtin), character level.
- a single file: character level, split by bytes in order into 90% train, 5% valid, 5% test
  (`split_sizes`; integer arithmetic, so the 100,000,000-byte enwik8 gives exactly the standard
  first 90M train / next 5M valid / last 5M test).
- a directory with one train, one valid and one test file: `train.txt valid.txt test.txt`,
  WikiText `wiki.train.tokens ...` (or `.raw`), PTB `ptb.train.txt ...`; `dev` also names the
  valid split; several parts of one split (`ptb.train.part1.txt`, `ptb.train.part2.txt`) are
  concatenated in name order; README/LICENSE and hidden files are ignored. When a folder holds
  two sets (PTB's word `ptb.*.txt` and character `ptb.char.*.txt`), kind "char" takes the
  `.char.` set and the other kinds the other one.

Which tokenizer (`kind`): "auto" picks word level for WikiText token files (`wiki.*.tokens`) and PTB
word files (`ptb.*.txt`, not `ptb.char.*`), character level for everything else; "char", "word"
and "bpe" force it.

- Character level: the corpus is read as raw bytes (enwik8 is XML bytes, the convention of
  bits-per-character results); the vocabulary is every byte value occurring in any split, in byte
  order, plus `<unk>` (see hyperrouter.data.vocab).
- Word level (Transformer-XL's rules): files are UTF-8; a line ends at \\n, \\r\\n or \\r; each
  line is split on whitespace and gets `<eos>` appended, blank lines included (they are article
  breaks in WikiText); the vocabulary comes from the train split only, most frequent first;
  valid/test words missing from it become `<unk>`.
- Sub-word level ("bpe"): a byte-level BPE tokenizer of `vocab_size` symbols trained on the train
  split (cached; see hyperrouter.data.bpe), or the `tokenizer` given (a run's own tokenizer.json,
  so a run is evaluated and resumed with the tokenizer it was trained with); any layout.

Tokenized corpora are cached under `<cache>/corpora/<content_hash>/` (`.npy` token arrays + the
vocabulary as JSON), where the cache is `cache_dir`, else $HYPERROUTER_CACHE, else
$XDG_CACHE_HOME/hyperrouter or ~/.cache/hyperrouter. The hash covers the input bytes, the tokenizer
settings (for bpe: the tokenizer's JSON) and TOKENIZER_VERSION, so an edited file is never served
stale. Entries are written to a
temporary folder renamed into place (a killed run leaves none half-written); an unreadable entry
is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from hyperrouter.data import bpe, builtin
from hyperrouter.data.vocab import EOS, Vocab
from hyperrouter.errors import HyperRouterError

TOKENIZER_VERSION = 2  # bump whenever tokenization changes, so old cache entries are not reused
SPLITS = ("train", "valid", "test")
KINDS = ("auto", "char", "word", "bpe")
ACCEPTED_NAMES = (
    "train.txt valid.txt test.txt, wiki.train.tokens wiki.valid.tokens wiki.test.tokens (or .raw), "
    "ptb.train.txt ptb.valid.txt ptb.test.txt; 'dev' may name valid, parts like "
    "ptb.train.part1.txt are joined"
)
_SPLIT_WORDS = {"train": "train", "valid": "valid", "dev": "valid", "test": "test"}
_SEPARATORS = re.compile(r"([._-])")
_PART = re.compile(r"part\d+")
_IGNORED = ("readme", "license", "licence", "copying")


@dataclass(repr=False)
class Corpus:
    """A tokenized corpus: three 1-D int64 token streams sharing one vocabulary."""

    name: str
    kind: str  # "char", "word" or "bpe"
    vocab: Vocab
    train: Tensor
    valid: Tensor
    test: Tensor
    source: str  # where it came from, for logs and run records
    content_hash: str  # sha256 of the inputs and tokenizer settings

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={getattr(self, s).numel():,}" for s in SPLITS)
        return (
            f"Corpus(name={self.name!r}, kind={self.kind!r}, vocab={len(self.vocab)}, {sizes}, "
            f"hash={self.content_hash[:12]})"
        )


def split_sizes(n: int) -> tuple[int, int, int]:
    """(train, valid, test) sizes of an n-byte single-file corpus: 90% / 5% / 5%, exact integers."""
    n_valid = n_test = n * 5 // 100
    return n - n_valid - n_test, n_valid, n_test


def default_cache_dir() -> Path:
    """$HYPERROUTER_CACHE, else $XDG_CACHE_HOME/hyperrouter, else ~/.cache/hyperrouter."""
    if os.environ.get("HYPERROUTER_CACHE"):
        return Path(os.environ["HYPERROUTER_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "hyperrouter"


# --------------------------------------------------------------------------- finding split files


def _classify(name: str) -> tuple[str, str, str] | None:
    """(split, family, split word) of a file name, or None if it names no split.

    The family is the name with its split word and any `partN` piece taken out, so that
    `ptb.train.part1.txt` and `ptb.valid.txt` both belong to `ptb.{split}.txt`.
    """
    lower = name.lower()
    if lower.startswith(".") or lower.startswith(_IGNORED):
        return None
    split = word = None
    family: list[str] = []
    for piece in _SEPARATORS.split(name):
        low = piece.lower()
        if split is None and low in _SPLIT_WORDS:
            split, word = _SPLIT_WORDS[low], low
            family.append("{split}")
        elif _PART.fullmatch(low) and family and _SEPARATORS.fullmatch(family[-1]):
            family.pop()
        else:
            family.append(piece)
    if split is None:
        return None
    return split, "".join(family), word


def find_split_files(directory: str | os.PathLike, kind: str = "auto") -> dict[str, list[Path]]:
    """The train/valid/test files of a corpus directory (parts in name order).

    Raises HyperRouterError when a split is missing or the choice is ambiguous.
    """
    directory = Path(directory)
    families: dict[str, dict[str, list[Path]]] = {}
    words: dict[str, dict[str, set[str]]] = {}
    for path in sorted(directory.iterdir()):
        info = _classify(path.name) if path.is_file() else None
        if info is None:
            continue
        split, family, word = info
        families.setdefault(family, {s: [] for s in SPLITS})[split].append(path)
        words.setdefault(family, {s: set() for s in SPLITS})[split].add(word)
    complete = [f for f, found in families.items() if all(found[s] for s in SPLITS)]
    if not complete:
        if not families:
            raise HyperRouterError(
                f"{directory} holds no train/valid/test files; accepted names: {ACCEPTED_NAMES}"
            )
        best = max(families, key=lambda f: sum(bool(families[f][s]) for s in SPLITS))
        missing = [s for s in SPLITS if not families[best][s]]
        found = ", ".join(p.name for s in SPLITS for p in families[best][s])
        raise HyperRouterError(
            f"{directory} has no {'/'.join(missing)} file (found {found}); "
            f"accepted names: {ACCEPTED_NAMES}"
        )
    if len(complete) > 1:
        want_char = kind == "char"
        preferred = [f for f in complete if (".char." in f.lower()) == want_char]
        complete = preferred or complete
    if len(complete) > 1:
        raise HyperRouterError(
            f"{directory} holds several train/valid/test sets ({', '.join(complete)}); "
            f"keep one set per folder"
        )
    (family,) = complete
    if len(words[family]["valid"]) > 1:
        raise HyperRouterError(
            f"{directory} has both a 'valid' and a 'dev' file for {family}; keep only one"
        )
    return families[family]


def _auto_kind(files: dict[str, list[Path]]) -> str:
    names = [p.name.lower() for paths in files.values() for p in paths]
    if all(n.startswith("wiki.") and n.endswith(".tokens") for n in names):
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
    vocab_size: int = 1024,
    tokenizer: str | None = None,
) -> Corpus:
    """Load a corpus (see the module docstring for layouts, tokenizers and the cache).

    cache_dir: a folder; None or True for the default cache; False for no caching.
    min_freq, max_size: word-level vocabulary limits (ignored at character level).
    vocab_size: symbols of a BPE tokenizer trained for kind bpe; tokenizer: a tokenizer.json's
    text to use instead (kind bpe only).
    """
    if kind not in KINDS:
        raise HyperRouterError(f"corpus kind {kind!r} is not valid; use one of {', '.join(KINDS)}")
    files: dict[str, list[Path]] | None = None
    if path is None:
        if kind == "word":
            raise HyperRouterError(
                "the built-in corpus (data path None) is character level; use kind char, bpe or "
                "auto"
            )
        kind = "bpe" if kind == "bpe" else "char"
        name, source = builtin.NAME, builtin.SOURCE
        raw = _split_single(builtin.builtin_corpus_bytes(), builtin.NAME)
    else:
        p = Path(path).expanduser()
        if not p.exists():
            raise HyperRouterError(
                f"data path {p} does not exist; give a corpus file or a folder with "
                f"train/valid/test files"
            )
        name, source = p.name, str(p.resolve())
        if p.is_dir():
            files = find_split_files(p, kind)
            if kind == "auto":
                kind = _auto_kind(files)
            raw = {s: _read_split(files[s], s, p) for s in SPLITS}
        else:
            if kind == "word":
                raise HyperRouterError(
                    f"{p} is a single file, which is read as a character corpus; a word-level "
                    f"corpus needs a folder with train/valid/test files"
                )
            kind = "bpe" if kind == "bpe" else "char"
            raw = _split_single(_read_file(p), str(p))
    root = None
    if cache_dir is not False:
        root = default_cache_dir() if cache_dir in (None, True) else Path(cache_dir).expanduser()
    options = {"kind": kind, "version": TOKENIZER_VERSION}
    if kind == "word":
        options.update(min_freq=min_freq, max_size=max_size)
    if kind == "bpe":
        if tokenizer is None:
            tokenizer = bpe.cached_tokenizer(raw["train"], vocab_size, root)
        options["tokenizer"] = bpe.fingerprint(tokenizer)
    content_hash = _content_hash(raw, options)

    entry = None
    if root is not None:
        entry = root / "corpora" / content_hash
        cached = _read_cache(entry, content_hash)
        if cached is not None:
            return _corpus(name, kind, *cached, source, content_hash)

    if kind == "bpe":
        vocab, arrays = bpe.tokenize(tokenizer, raw)
    else:
        vocab, arrays = _tokenize(kind, raw, files, source, min_freq=min_freq, max_size=max_size)
    for s in SPLITS:
        if arrays[s].size < 2:
            where = ", ".join(str(f) for f in files[s]) if files else source
            raise HyperRouterError(
                f"the {s} split ({where}) has {arrays[s].size} token(s); every split needs at "
                f"least 2"
            )
    if entry is not None:
        _write_cache(entry, content_hash, vocab, arrays)
    return _corpus(name, kind, vocab, arrays, source, content_hash)


def _corpus(
    name: str,
    kind: str,
    vocab: Vocab,
    arrays: dict[str, np.ndarray],
    source: str,
    content_hash: str,
) -> Corpus:
    splits = [torch.from_numpy(arrays[s].astype(np.int64)) for s in SPLITS]
    return Corpus(name, kind, vocab, *splits, source, content_hash)


def _content_hash(raw: dict[str, bytes], options: dict) -> str:
    digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    for key in sorted(raw):
        digest.update(key.encode() + b"\0")
        digest.update(hashlib.sha256(raw[key]).digest())
    return digest.hexdigest()


def _read_file(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise HyperRouterError(f"cannot read {path}: {err.strerror or err}") from None
    if not data:
        raise HyperRouterError(f"{path} is empty; a corpus file needs text")
    return data


def _read_split(files: list[Path], split: str, directory: Path) -> bytes:
    try:
        data = b"".join(f.read_bytes() for f in files)
    except OSError as err:
        raise HyperRouterError(f"cannot read {err.filename}: {err.strerror or err}") from None
    if not data:
        names = ", ".join(f.name for f in files)
        raise HyperRouterError(f"the {split} split of {directory} ({names}) is empty")
    return data


def _split_single(data: bytes, where: str) -> dict[str, bytes]:
    n_train, n_valid, _ = split_sizes(len(data))
    if n_valid < 2:
        raise HyperRouterError(
            f"{where} has {len(data)} bytes; a single-file corpus needs at least 40 so that its "
            f"5% valid and test parts hold 2 bytes each"
        )
    return {
        "train": data[:n_train],
        "valid": data[n_train : n_train + n_valid],
        "test": data[n_train + n_valid :],
    }


# --------------------------------------------------------------------------- tokenizing


def _tokenize(
    kind: str,
    raw: dict[str, bytes],
    files: dict[str, list[Path]] | None,
    source: str,
    *,
    min_freq: int,
    max_size: int | None,
) -> tuple[Vocab, dict[str, np.ndarray]]:
    """Vocabulary and token arrays (uint8 or int32) of the three splits."""
    if kind == "char":
        vocab = Vocab.from_bytes(raw[s] for s in SPLITS)
        dtype = np.uint8 if len(vocab) <= 256 else np.int32
        table = vocab.byte_table.astype(dtype)
        return vocab, {s: table[np.frombuffer(raw[s], dtype=np.uint8)] for s in SPLITS}

    def where(split: str) -> list[Path]:
        return files[split] if files else [Path(source)]

    # train: one pass gives provisional ids in first-appearance order and counts; the final
    # frequency-ordered ids are then a table lookup
    index: dict[str, int] = {}
    provisional = array("i")
    for line in _decoded_lines(raw["train"], where("train")):
        provisional.extend([index.setdefault(w, len(index)) for w in line.split()])
        provisional.append(index.setdefault(EOS, len(index)))
    ids = np.frombuffer(provisional, dtype=np.int32)
    counts = np.bincount(ids, minlength=len(index)).tolist()
    vocab = Vocab.from_counts(list(index), counts, min_freq=min_freq, max_size=max_size)
    remap = np.array([vocab.stoi.get(w, vocab.unk_id) for w in index], dtype=np.int32)
    arrays = {"train": remap[ids]}
    for s in ("valid", "test"):
        out = array("i")
        for line in _decoded_lines(raw[s], where(s)):
            out.extend(vocab.encode_line(line))
        arrays[s] = np.frombuffer(out, dtype=np.int32).copy()
    return vocab, arrays


def _decoded_lines(data: bytes, files: list[Path]) -> Iterator[str]:
    """Lines of UTF-8 `data` as text-mode reading gives them; a clear error names a bad byte."""
    for line in data.splitlines():  # bytes.splitlines: only \n, \r\n and \r end a line
        try:
            yield line.decode("utf-8")
        except UnicodeDecodeError:
            _raise_decode_error(data, files)


def _raise_decode_error(data: bytes, files: list[Path]) -> None:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        offset, where = err.start, files[0]
        for f in files:  # the split may be several files joined: name the one with the byte
            size = f.stat().st_size
            if offset < size:
                where = f
                break
            offset -= size
        raise HyperRouterError(
            f"{where} is not valid UTF-8 (bad byte {data[err.start]:#04x} at byte offset "
            f"{offset}); word-level corpora must be UTF-8 text (use kind char for raw bytes)"
        ) from None


# --------------------------------------------------------------------------- cache


def _read_cache(entry: Path, content_hash: str) -> tuple[Vocab, dict[str, np.ndarray]] | None:
    """The cached vocabulary and arrays, or None if the entry is missing or unreadable."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
        if meta.get("content_hash") != content_hash:
            return None
        vocab = Vocab.from_dict(json.loads((entry / "vocab.json").read_text()))
        arrays = {}
        for s in SPLITS:
            arr = np.load(entry / f"{s}.npy", allow_pickle=False)
            if arr.ndim != 1 or arr.size != meta["lengths"][s]:
                return None
            if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= len(vocab)):
                return None
            arrays[s] = arr
    except (OSError, ValueError, KeyError, TypeError, EOFError, HyperRouterError):
        return None
    return vocab, arrays


def _write_cache(
    entry: Path, content_hash: str, vocab: Vocab, arrays: dict[str, np.ndarray]
) -> None:
    """Write the entry into a temporary folder beside it, then rename it into place."""
    tmp = None
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name[:16]}."))
        for s in SPLITS:
            np.save(tmp / f"{s}.npy", arrays[s], allow_pickle=False)
        (tmp / "vocab.json").write_text(json.dumps(vocab.to_dict()))
        meta = {
            "content_hash": content_hash,
            "tokenizer_version": TOKENIZER_VERSION,
            "lengths": {s: int(arrays[s].size) for s in SPLITS},
        }
        (tmp / "meta.json").write_text(json.dumps(meta))
        if entry.exists():  # an unreadable entry: move it aside, then delete it
            trash = Path(tempfile.mkdtemp(dir=entry.parent, prefix=".trash."))
            os.replace(entry, trash / "old")
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.replace(tmp, entry)
            tmp = None
        except OSError:
            if not entry.is_dir():  # else another process wrote the same entry meanwhile
                raise
    except OSError as err:  # the cache only saves time; a read-only home must not stop a run
        warnings.warn(f"could not write the corpus cache {entry}: {err}", stacklevel=3)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
