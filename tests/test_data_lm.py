"""LM corpora, vocabularies, the corpus cache, batching and the built-in corpus (no network)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from hyperrouter.data import builtin, corpus
from hyperrouter.data.corpus import find_split_files, load_corpus, split_sizes
from hyperrouter.data.iterators import LMOrderedIterator
from hyperrouter.data.vocab import EOS, UNK, Vocab
from hyperrouter.errors import HyperRouterError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _error(match: str, fn, *args, **kwargs) -> str:
    """Call fn, expect a one-line HyperRouterError matching `match`; return its message."""
    with pytest.raises(HyperRouterError, match=match) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def _write(root: Path, files: dict[str, str | bytes]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        data = text.encode() if isinstance(text, str) else text
        (root / name).write_bytes(data)
    return root


# ----------------------------------------------------------------------------- splits


def test_split_arithmetic_gives_the_standard_enwik8_split() -> None:
    assert split_sizes(100_000_000) == (90_000_000, 5_000_000, 5_000_000)
    assert split_sizes(1_000_000) == (900_000, 50_000, 50_000)
    assert split_sizes(1_115_394) == (1_003_856, 55_769, 55_769)
    for n in (40, 99, 12_345, 10**9 + 7):
        train, valid, test = split_sizes(n)
        assert train + valid + test == n and valid == test == n * 5 // 100


def test_single_file_is_char_level_and_split_in_order(tmp_path: Path) -> None:
    text = "héllo wörld, ".encode() * 40 + bytes([0, 255])
    (tmp_path / "corpus.bin").write_bytes(text)
    c = load_corpus(tmp_path / "corpus.bin", cache_dir=False)
    assert c.kind == "char" and c.name == "corpus.bin"
    assert [c.train.numel(), c.valid.numel(), c.test.numel()] == list(split_sizes(len(text)))
    assert c.train.dtype == torch.int64
    joined = torch.cat([c.train, c.valid, c.test]).tolist()
    assert c.vocab.decode_bytes(joined) == text
    # the vocabulary covers bytes of every split (0 and 255 occur only in test)
    assert c.vocab.symbols[:2] == [0, 32] and c.vocab.symbols[-2:] == [255, UNK]
    _error("needs at least 40", load_corpus, _write(tmp_path, {"tiny": "x" * 39}) / "tiny")


def test_char_vocab_round_trip_and_unknown_bytes() -> None:
    vocab = Vocab.from_bytes([b"hello ", "wörld".encode()])
    assert vocab.kind == "char" and vocab.eos_id is None
    assert vocab.symbols[-1] == UNK and vocab.unk_id == len(vocab) - 1
    assert vocab.symbols[:-1] == sorted(vocab.symbols[:-1])
    assert vocab.counts[vocab.stoi[ord("l")]] == 3
    assert vocab.decode(vocab.encode("wörld hello")) == "wörld hello"
    assert vocab.encode("z") == [vocab.unk_id]
    assert vocab.decode(vocab.encode("hez")) == "he\ufffd"
    restored = Vocab.from_dict(json.loads(json.dumps(vocab.to_dict())))
    assert restored == vocab and restored.counts == vocab.counts
    _error("malformed", Vocab.from_dict, {"kind": "char"})
    _error("byte values", Vocab, "char", [300, UNK], [1, 0])
    _error("no <unk>", Vocab, "word", ["a"], [1])


# ----------------------------------------------------------------------------- word level


WORDS = {
    "wiki.train.tokens": "the cat sat\nthe dog sat\n\n the end <unk>\n",
    "wiki.valid.tokens": "the cat ran\n",
    "wiki.test.tokens": "a <unk> sat",  # no final newline: the last line still gets <eos>
}


def test_word_corpus_vocab_order_eos_and_unk(tmp_path: Path) -> None:
    c = load_corpus(_write(tmp_path / "wt", WORDS), cache_dir=False)
    assert c.kind == "word"
    v = c.vocab
    # by training frequency: <eos> x4 (blank line included), the x3, sat x2, then first appearance
    assert v.symbols == [EOS, "the", "sat", "cat", "dog", "end", UNK]
    assert v.counts == [4, 3, 2, 1, 1, 1, 1]
    assert v.eos_id == 0 and v.unk_id == 6
    assert v.decode(c.train.tolist()) == (
        "the cat sat <eos> the dog sat <eos> <eos> the end <unk> <eos>"
    )
    # 'ran' and 'a' are not in train -> <unk>; literal <unk> shares the id
    assert v.decode(c.valid.tolist()) == "the cat <unk> <eos>"
    assert c.test.tolist() == [v.unk_id, v.unk_id, v.stoi["sat"], v.eos_id]
    # encoding text with add_eos gives exactly the corpus tokens
    assert v.encode(WORDS["wiki.train.tokens"], add_eos=True) == c.train.tolist()
    assert v.encode("the cat") == [1, 3]


def test_word_vocab_limits_and_line_endings(tmp_path: Path) -> None:
    lines = ["b a a", "c b a", "d"]
    v = Vocab.from_words(lines)
    assert v.symbols == ["a", EOS, "b", "c", "d", UNK]
    assert Vocab.from_words(lines, min_freq=2).symbols == ["a", EOS, "b", UNK]
    small = Vocab.from_words(lines, max_size=4)
    assert small.symbols == ["a", EOS, "b", UNK] and len(small) == 4
    _error("min_freq", Vocab.from_words, lines, min_freq=0)
    _error("max_size", Vocab.from_words, lines, max_size=2)
    c = load_corpus(
        _write(
            tmp_path / "crlf",
            {
                "ptb.train.txt": "x y\r\nx\ry\n",
                "ptb.valid.txt": "x\u2028z\n",
                "ptb.test.txt": "y\n",
            },
        ),
        cache_dir=False,
        min_freq=2,
    )
    # \r\n and \r end lines; U+2028 is whitespace inside a line, as when reading a text file
    assert c.vocab.decode(c.train.tolist()) == "x y <eos> x <eos> y <eos>"
    assert c.vocab.decode(c.valid.tolist()) == "x <unk> <eos>"
    limited = load_corpus(tmp_path / "crlf", cache_dir=False, min_freq=3)
    assert limited.content_hash != c.content_hash and "y" not in limited.vocab.stoi


# ----------------------------------------------------------------------------- directories


def test_directory_layouts(tmp_path: Path) -> None:
    plain = _write(tmp_path / "plain", {"train.txt": "abcd", "dev.txt": "ab", "test.txt": "cd"})
    c = load_corpus(plain, cache_dir=False)
    assert c.kind == "char" and c.vocab.decode(c.valid.tolist()) == "ab"
    assert load_corpus(plain, kind="word", cache_dir=False).kind == "word"
    ptb = _write(
        tmp_path / "ptb",
        {
            "ptb.train.part2.txt": " c d\n",
            "ptb.train.part1.txt": " a b",  # parts are joined as bytes, in name order
            "ptb.valid.txt": " a\n",
            "ptb.test.txt": " b\n",
            "ptb.char.train.txt": "a _ b\n",
            "ptb.char.valid.txt": "a\n",
            "ptb.char.test.txt": "b\n",
            "README.txt": "train valid test",
            ".prepared.json": "{}",
        },
    )
    words = load_corpus(ptb, cache_dir=False)
    assert words.kind == "word"
    assert words.vocab.decode(words.train.tolist()) == "a b c d <eos>"
    assert [p.name for p in find_split_files(ptb)["train"]] == [
        "ptb.train.part1.txt",
        "ptb.train.part2.txt",
    ]
    chars = load_corpus(ptb, kind="char", cache_dir=False)
    assert chars.vocab.decode(chars.train.tolist()) == "a _ b\n"
    raw = _write(
        tmp_path / "raw",
        {"wiki.train.raw": "Hello\n", "wiki.valid.raw": "Hi\n", "wiki.test.raw": "Yo\n"},
    )
    assert load_corpus(raw, cache_dir=False).kind == "char"  # WikiText .raw is for characters


def test_directory_errors(tmp_path: Path) -> None:
    incomplete = _write(tmp_path / "incomplete", {"train.txt": "abc", "test.txt": "abc"})
    msg = _error("has no valid file", load_corpus, incomplete)
    assert str(incomplete) in msg and "wiki.train.tokens" in msg and "dev" in msg
    _error("holds no train/valid/test files", load_corpus, _write(tmp_path / "none", {"a": "b"}))
    both = _write(
        tmp_path / "both",
        {"train.txt": "abc", "valid.txt": "ab", "dev.txt": "ab", "test.txt": "ab"},
    )
    _error("both a 'valid' and a 'dev'", load_corpus, both)
    two = {f"{p}.{s}.txt": "ab" for p in ("x", "y") for s in ("train", "valid", "test")}
    _error("several train/valid/test sets", load_corpus, _write(tmp_path / "two", two))
    empty = _write(tmp_path / "empty", {"train.txt": "abc", "valid.txt": "", "test.txt": "ab"})
    _error("valid split of .* is empty", load_corpus, empty)
    short = _write(tmp_path / "short", {"train.txt": "abc", "valid.txt": "a", "test.txt": "ab"})
    _error(r"valid split \(.*valid.txt\) has 1 token", load_corpus, short, cache_dir=False)


def test_bad_inputs_give_one_line_errors(tmp_path: Path) -> None:
    _error("does not exist", load_corpus, tmp_path / "missing")
    _error("is empty", load_corpus, _write(tmp_path, {"empty.txt": ""}) / "empty.txt")
    _error(
        "corpus kind 'bytes' is not valid; use one of auto, char, word", load_corpus, None, "bytes"
    )
    _error("built-in corpus .* is character level", load_corpus, None, kind="word")
    _error("single file", load_corpus, _write(tmp_path, {"f.txt": "x" * 50}) / "f.txt", "word")
    bad = _write(
        tmp_path / "bad",
        {
            "ptb.train.txt": "ok\n",
            "ptb.valid.part1.txt": "ok ok\n",
            "ptb.valid.part2.txt": b"bad \xff byte\n",
            "ptb.test.txt": "ok\n",
        },
    )
    msg = _error("is not valid UTF-8", load_corpus, bad, cache_dir=False)
    assert "ptb.valid.part2.txt" in msg and "byte offset 4" in msg and "0xff" in msg


# ----------------------------------------------------------------------------- cache


def test_cache_is_reused_and_rebuilt_when_corrupt(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "c.txt").write_bytes(b"abcdefghij" * 100)
    cache = tmp_path / "cache"
    first = load_corpus(tmp_path / "c.txt", cache_dir=cache)
    entry = cache / "corpora" / first.content_hash
    assert (entry / "train.npy").is_file() and (entry / "vocab.json").is_file()
    assert [p.name for p in (cache / "corpora").iterdir()] == [first.content_hash]  # no temp dirs

    def boom(*args, **kwargs):
        raise AssertionError("tokenizer ran although the cache holds this corpus")

    with monkeypatch.context() as m:
        m.setattr(corpus, "_tokenize", boom)
        second = load_corpus(tmp_path / "c.txt", cache_dir=cache)
        assert torch.equal(first.train, second.train) and torch.equal(first.test, second.test)
        assert first.vocab == second.vocab and second.train.dtype == torch.int64
        m.setenv("HYPERROUTER_CACHE", str(cache))  # the default cache follows the environment
        assert torch.equal(load_corpus(tmp_path / "c.txt").valid, first.valid)

    for damage in (b"garbage", b""):
        (entry / "train.npy").write_bytes(damage)
        again = load_corpus(tmp_path / "c.txt", cache_dir=cache)
        assert torch.equal(first.train, again.train)
    (entry / "meta.json").unlink()
    assert torch.equal(load_corpus(tmp_path / "c.txt", cache_dir=cache).train, first.train)
    assert [p.name for p in (cache / "corpora").iterdir()] == [first.content_hash]
    (tmp_path / "c.txt").write_bytes(b"abcdefghij" * 101)
    assert load_corpus(tmp_path / "c.txt", cache_dir=cache).content_hash != first.content_hash


def test_no_cache_writes_nothing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HYPERROUTER_CACHE", str(tmp_path / "cache"))
    (tmp_path / "c.txt").write_bytes(b"abcdefghij" * 10)
    load_corpus(tmp_path / "c.txt", cache_dir=False)
    assert not (tmp_path / "cache").exists()


# ----------------------------------------------------------------------------- iterators


def test_iterator_segments_targets_and_resume() -> None:
    data = torch.arange(103)
    it = LMOrderedIterator(data, batch_size=4, tgt_len=5)
    assert it.n_step == 25 and len(it) == 5  # 24 target rows -> 5 batches, the last of 4
    assert it.num_tokens == 24 * 4 and it.data.shape == (25, 4)
    x, y, seq = it.get_batch(0)
    assert x.shape == y.shape == (5, 4) and seq == 5
    assert x[:, 1].tolist() == [25, 26, 27, 28, 29]  # column b = the b-th contiguous part
    assert torch.equal(y, x + 1)  # the target is the next token
    x, y, last = it.get_batch(4)
    assert last == 4 and x.shape == (4, 4) and y[-1].tolist() == [24, 49, 74, 99]
    batches = list(it)
    assert len(batches) == 5
    resumed = list(it.iter_from(3))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(resumed, batches[3:]))
    assert list(it.iter_from(5)) == []
    assert torch.equal(it.batch_at_step(12)[0], batches[2][0])  # step 12 = batch 12 % 5
    with pytest.raises(IndexError):
        it.get_batch(5)
    with pytest.raises(IndexError):
        it.iter_from(6)


def test_iterator_extended_context_and_errors() -> None:
    it = LMOrderedIterator(torch.arange(40, dtype=torch.int32), batch_size=2, tgt_len=4, ext_len=3)
    x, y, seq = it.get_batch(0)
    assert x.shape == (4, 2) and x.dtype == torch.int64  # no earlier rows for batch 0
    x, y, seq = it.get_batch(2)
    assert x.shape == (7, 2) and x[:, 0].tolist() == list(range(5, 12))
    assert y[:, 0].tolist() == list(range(9, 13))
    LMOrderedIterator(torch.arange(24), batch_size=4, tgt_len=5)  # exactly one full batch
    msg = _error(
        "has 23 tokens, fewer than one batch needs \\(batch_size 4 x \\(tgt_len 5 \\+ 1\\) = 24\\)",
        LMOrderedIterator,
        torch.arange(23),
        batch_size=4,
        tgt_len=5,
        name="the valid split",
    )
    assert msg.startswith("the valid split") and "smaller batch_size or tgt_len" in msg
    _error("batch_size must be an integer >= 1", LMOrderedIterator, torch.arange(9), 0, 2)
    _error("ext_len", LMOrderedIterator, torch.arange(9), 1, 2, ext_len=-1)
    _error("1-D tensor", LMOrderedIterator, torch.zeros(4, 4), 1, 2)


# ----------------------------------------------------------------------------- built-in


def test_builtin_corpus_is_tiny_shakespeare() -> None:
    data = builtin.builtin_corpus_bytes()
    assert len(data) == builtin.SIZE == 1_115_394
    assert hashlib.sha256(data).hexdigest() == builtin.SHA256
    assert builtin.SHA256 == "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
    c = load_corpus(None, cache_dir=False)
    assert c.kind == "char" and c.name == builtin.NAME and len(c.vocab) == 66  # 65 + <unk>
    assert [c.train.numel(), c.valid.numel(), c.test.numel()] == list(split_sizes(len(data)))
    assert c.vocab.decode(c.train[:14].tolist()) == "First Citizen:"


def test_corrupt_builtin_asset_is_reported(monkeypatch) -> None:
    monkeypatch.setattr(builtin, "SHA256", "0" * 64)
    _error("built-in corpus asset .* is corrupt", builtin.builtin_corpus_bytes)


# ----------------------------------------------------------------------------- real data


@pytest.mark.integration
@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not present")
def test_real_corpora_load(tmp_path: Path) -> None:
    enwik6 = load_corpus(SHARED / "enwik8" / "enwik6", cache_dir=tmp_path)
    assert [enwik6.train.numel(), enwik6.valid.numel(), enwik6.test.numel()] == [
        900_000,
        50_000,
        50_000,
    ]
    ptb = load_corpus(SHARED / "ptb", cache_dir=tmp_path)
    assert ptb.kind == "word" and len(ptb.vocab) == 10_000 and ptb.vocab.symbols[0] == "the"
    # the standard PTB token counts (words + one <eos> per line)
    assert [ptb.train.numel(), ptb.valid.numel(), ptb.test.numel()] == [929_589, 73_760, 82_430]
    chars = load_corpus(SHARED / "ptb", kind="char", cache_dir=tmp_path)
    assert chars.train.numel() == 10_034_964  # the three ptb.char.train parts joined
    cached = load_corpus(SHARED / "ptb", cache_dir=tmp_path)
    assert torch.equal(cached.test, ptb.test) and cached.vocab == ptb.vocab
