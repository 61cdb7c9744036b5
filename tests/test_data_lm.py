"""Language-model corpora, vocabularies, caching, batching and downloads (no network)."""

from __future__ import annotations

import hashlib
import http.server
import threading
import zipfile
from functools import partial
from pathlib import Path

import pytest
import torch

from hyperrouter.data import builtin, download
from hyperrouter.data.corpus import load_corpus, split_sizes
from hyperrouter.data.iterators import LMOrderedIterator
from hyperrouter.data.vocab import EOS, UNK, Vocab

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_split_arithmetic_gives_the_standard_enwik8_split() -> None:
    assert split_sizes(100_000_000) == (90_000_000, 5_000_000, 5_000_000)
    assert split_sizes(1_000_000) == (900_000, 50_000, 50_000)
    assert sum(split_sizes(12_345)) == 12_345


def test_single_file_is_char_level_and_split_in_order(tmp_path: Path) -> None:
    text = bytes(range(32, 127)) * 50
    (tmp_path / "corpus.bin").write_bytes(text)
    corpus = load_corpus(tmp_path / "corpus.bin", cache_dir=False)
    assert corpus.kind == "char"
    n_train, n_valid, n_test = split_sizes(len(text))
    assert [len(corpus.train), len(corpus.valid), len(corpus.test)] == [n_train, n_valid, n_test]
    joined = torch.cat([corpus.train, corpus.valid, corpus.test]).tolist()
    assert corpus.vocab.decode(joined).encode() == text


def test_char_vocab_round_trip_and_unknown_bytes() -> None:
    vocab = Vocab.from_bytes([b"hello world"])
    assert vocab.decode(vocab.encode("hello")) == "hello"
    assert vocab.encode("z") == [vocab.unk_id]
    assert Vocab.from_dict(vocab.to_dict()) == vocab


def _write_word_dir(root: Path, names: tuple[str, str, str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / names[0]).write_text("the cat sat\nthe dog sat\n\nthe end\n")
    (root / names[1]).write_text("the cat ran\n")
    (root / names[2]).write_text("a <unk> sat\n")
    return root


def test_word_corpus_vocab_order_eos_and_unk(tmp_path: Path) -> None:
    root = _write_word_dir(
        tmp_path / "wt", ("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens")
    )
    corpus = load_corpus(root, cache_dir=False)
    assert corpus.kind == "word"
    vocab = corpus.vocab
    assert vocab.symbols[:3] == [EOS, "the", "sat"]  # by frequency: 4 lines, 'the' x3, 'sat' x2
    assert UNK in vocab.stoi and EOS in vocab.stoi
    # blank line -> just <eos>; every line ends with <eos>
    assert corpus.train.tolist().count(vocab.eos_id) == 4
    # 'ran' and 'a' are not in train -> <unk>; literal <unk> maps to the same id
    assert vocab.decode(corpus.valid.tolist()) == "the cat <unk> <eos>"
    assert corpus.test.tolist()[:2] == [vocab.unk_id, vocab.unk_id]


def test_directory_layouts(tmp_path: Path) -> None:
    plain = _write_word_dir(tmp_path / "plain", ("train.txt", "dev.txt", "test.txt"))
    assert load_corpus(plain, cache_dir=False).kind == "char"
    assert load_corpus(plain, kind="word", cache_dir=False).kind == "word"
    ptb = tmp_path / "ptb"
    ptb.mkdir()
    (ptb / "ptb.train.part1.txt").write_text(" a b\n")
    (ptb / "ptb.train.part2.txt").write_text(" c d\n")
    (ptb / "ptb.valid.txt").write_text(" a\n")
    (ptb / "ptb.test.txt").write_text(" b\n")
    (ptb / "ptb.char.train.txt").write_text("a _ b\n")
    (ptb / "ptb.char.valid.txt").write_text("a\n")
    (ptb / "ptb.char.test.txt").write_text("b\n")
    (ptb / "README.txt").write_text("train valid test")
    words = load_corpus(ptb, cache_dir=False)
    assert words.kind == "word"
    assert words.vocab.decode(words.train.tolist()) == "a b <eos> c d <eos>"
    chars = load_corpus(ptb, kind="char", cache_dir=False)
    assert chars.vocab.decode(chars.train.tolist()) == "a _ b\n"


def test_bad_inputs_give_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_corpus(tmp_path / "missing")
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ValueError, match="is empty"):
        load_corpus(tmp_path / "empty.txt", cache_dir=False)
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    (incomplete / "train.txt").write_text("abc")
    with pytest.raises(ValueError, match="no valid/test file"):
        load_corpus(incomplete)
    bad = _write_word_dir(tmp_path / "bad", ("train.txt", "valid.txt", "test.txt"))
    (bad / "valid.txt").write_bytes(b"ok ok\nbad \xff byte\n")
    with pytest.raises(ValueError, match=r"valid.txt is not valid UTF-8 text \(byte offset 10\)"):
        load_corpus(bad, kind="word", cache_dir=False)
    with pytest.raises(ValueError, match="unknown corpus kind"):
        load_corpus(None, kind="bytes")


def test_cache_is_reused_and_rebuilt_when_corrupt(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "c.txt").write_bytes(b"abcdefghij" * 100)
    cache = tmp_path / "cache"
    first = load_corpus(tmp_path / "c.txt", cache_dir=cache)
    entry = cache / first.content_hash
    assert (entry / "train.npy").is_file()

    def boom(*args, **kwargs):
        raise AssertionError("tokenizer ran although the cache holds this corpus")

    monkeypatch.setattr(Vocab, "from_bytes", boom)
    second = load_corpus(tmp_path / "c.txt", cache_dir=cache)
    assert torch.equal(first.train, second.train) and first.vocab == second.vocab
    monkeypatch.undo()
    (entry / "train.npy").write_bytes(b"garbage")
    third = load_corpus(tmp_path / "c.txt", cache_dir=cache)
    assert torch.equal(first.train, third.train)
    (tmp_path / "c.txt").write_bytes(b"abcdefghij" * 101)
    assert load_corpus(tmp_path / "c.txt", cache_dir=cache).content_hash != first.content_hash


def test_iterator_segments_targets_and_resume() -> None:
    data = torch.arange(103)
    it = LMOrderedIterator(data, batch_size=4, tgt_len=5)
    assert it.n_step == 25 and len(it) == 5  # 24 target rows -> 5 batches, the last of 4
    x, y, seq = it.get_batch(0)
    assert x.shape == (5, 4) and seq == 5
    assert x[:, 1].tolist() == [25, 26, 27, 28, 29] and torch.equal(y[:-1], x[1:])
    _, _, last = it.get_batch(4)
    assert last == 4
    assert [b[0].tolist() for b in it.iter_from(3)] == [it.get_batch(i)[0].tolist() for i in (3, 4)]
    with pytest.raises(ValueError, match="fewer than one batch needs"):
        LMOrderedIterator(torch.arange(20), batch_size=4, tgt_len=5)


def test_builtin_corpus_is_tiny_shakespeare() -> None:
    data = builtin.builtin_corpus_bytes()
    assert len(data) == 1_115_394
    assert hashlib.sha256(data).hexdigest() == builtin.SHA256
    corpus = load_corpus(None, cache_dir=False)
    assert corpus.kind == "char" and len(corpus.vocab) == 66  # 65 characters + <unk>
    assert corpus.vocab.decode(corpus.train[:14].tolist()) == "First Citizen:"


# ----------------------------------------------------------------------------- downloads


@pytest.fixture
def server(tmp_path: Path):
    """A local HTTP server (with Range support) serving tmp_path/www."""
    www = tmp_path / "www"
    www.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def send_head(self):
            rng = self.headers.get("Range")
            path = Path(self.translate_path(self.path))
            if rng and path.is_file():
                start = int(rng.split("=")[1].split("-")[0])
                data = path.read_bytes()[start:]
                self.send_response(206)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                import io

                return io.BytesIO(data)
            return super().send_head()

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=www))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()


def _fake_enwik8(www: Path, monkeypatch) -> bytes:
    data = b"<mediawiki>" + bytes(range(256)) * 40
    with zipfile.ZipFile(www / "enwik8.zip", "w") as zf:
        zf.writestr("enwik8", data)
    spec = download.DATASETS["enwik8"]
    check = download.Check("sha256", hashlib.sha256(data).hexdigest(), len(data))
    monkeypatch.setitem(
        download.DATASETS,
        "enwik8",
        download.DatasetSpec(
            "enwik8",
            "char",
            {"enwik8.zip": (spec.urls["enwik8.zip"][0],)},
            member_checks={"enwik8": check},
            split_single="enwik8",
        ),
    )
    return data


def test_download_resume_verify_and_prepare(server, tmp_path: Path, monkeypatch) -> None:
    www, url = server
    data = _fake_enwik8(www, monkeypatch)
    spec = download.DATASETS["enwik8"]
    monkeypatch.setitem(
        download.DATASETS,
        "enwik8",
        download.DatasetSpec(**{**spec.__dict__, "urls": {"enwik8.zip": (url + "enwik8.zip",)}}),
    )
    root = tmp_path / "data"
    (root / ".downloads").mkdir(parents=True)
    archive = (www / "enwik8.zip").read_bytes()
    (root / ".downloads" / "enwik8.zip.part").write_bytes(archive[:100])  # interrupted earlier
    out = download.get_dataset("enwik8", root, progress=False, log=lambda _: None)
    corpus = load_corpus(out, cache_dir=False)
    assert corpus.kind == "char"
    assert (out / "train.txt").read_bytes() + (out / "valid.txt").read_bytes() + (
        out / "test.txt"
    ).read_bytes() == data
    assert download.get_dataset("enwik8", root, progress=False, log=lambda _: None) == out


def test_download_checksum_mismatch_and_offline(server, tmp_path: Path, monkeypatch) -> None:
    www, url = server
    _fake_enwik8(www, monkeypatch)
    spec = download.DATASETS["enwik8"]
    bad_check = {"enwik8": download.Check("sha256", "0" * 64)}
    monkeypatch.setitem(
        download.DATASETS,
        "enwik8",
        download.DatasetSpec(
            **{
                **spec.__dict__,
                "urls": {"enwik8.zip": (url + "enwik8.zip",)},
                "member_checks": bad_check,
            }
        ),
    )
    with pytest.raises(ValueError, match="fails its sha256 check"):
        download.get_dataset("enwik8", tmp_path / "d1", progress=False, log=lambda _: None)
    assert not (tmp_path / "d1" / "enwik8").exists()
    monkeypatch.setitem(
        download.DATASETS,
        "enwik8",
        download.DatasetSpec(
            **{**spec.__dict__, "urls": {"enwik8.zip": ("http://127.0.0.1:9/x",)}}
        ),
    )
    with pytest.raises(ValueError, match=r"could not download enwik8 .*--from enwik8.zip"):
        download.get_dataset("enwik8", tmp_path / "d2", progress=False, log=lambda _: None)
    with pytest.raises(ValueError, match="unknown dataset 'enwik9'"):
        download.get_dataset("enwik9", tmp_path)


def test_prepare_from_local_file(server, tmp_path: Path, monkeypatch) -> None:
    www, _ = server
    data = _fake_enwik8(www, monkeypatch)
    out = download.get_dataset(
        "enwik8", tmp_path / "a", from_file=www / "enwik8.zip", progress=False, log=lambda _: None
    )
    assert (out / "test.txt").read_bytes() == data[-len((out / "test.txt").read_bytes()) :]
    raw = tmp_path / "enwik8"
    raw.write_bytes(data)
    out2 = download.get_dataset(
        "enwik8", tmp_path / "b", from_file=raw, progress=False, log=lambda _: None
    )
    assert (out2 / "train.txt").read_bytes() == (out / "train.txt").read_bytes()


@pytest.mark.integration
@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not present")
def test_real_corpora_load(tmp_path: Path) -> None:
    enwik6 = load_corpus(SHARED / "enwik8" / "enwik6", cache_dir=tmp_path)
    assert [len(enwik6.train), len(enwik6.valid), len(enwik6.test)] == [900_000, 50_000, 50_000]
    ptb = load_corpus(SHARED / "ptb", cache_dir=tmp_path)
    assert ptb.kind == "word" and len(ptb.vocab) == 10_000
    assert [len(ptb.train), len(ptb.valid), len(ptb.test)] == [929_589, 73_760, 82_430]
