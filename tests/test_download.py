"""Dataset downloads against a local HTTP server: resume, checksums, offline errors, --from."""

from __future__ import annotations

import hashlib
import http.server
import io
import socket
import threading
import zipfile
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest

from hyperrouter.data import download
from hyperrouter.data.corpus import load_corpus, split_sizes
from hyperrouter.errors import HyperRouterError

QUIET = {"progress": False, "log": lambda _: None}


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Static files with `Range: bytes=N-` support; records the Range headers it saw."""

    ranges: list[str | None]
    honour_range = True

    def log_message(self, *args) -> None:
        pass

    def send_head(self):
        rng = self.headers.get("Range")
        self.ranges.append(rng)
        path = Path(self.translate_path(self.path))
        if rng and self.honour_range and path.is_file():
            data = path.read_bytes()
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self.send_error(416)
                return None
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(data) - start))
            self.end_headers()
            return io.BytesIO(data[start:])
        return super().send_head()


@pytest.fixture
def server(tmp_path: Path):
    """(folder served, base URL, handler class) of a server on 127.0.0.1."""
    www = tmp_path / "www"
    www.mkdir()
    handler = type("Handler", (_Handler,), {"ranges": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=www))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{httpd.server_address[1]}/", handler
    httpd.shutdown()
    httpd.server_close()


def _dead_url() -> str:
    """A localhost URL nobody listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/enwik8.zip"


def _fake_enwik8(www: Path, monkeypatch, url: str) -> bytes:
    """Serve a small enwik8.zip and point the registry (URL and checksums) at it."""
    data = b"<mediawiki>\n" + bytes(range(256)) * 40
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("enwik8", data)
    (www / "enwik8.zip").write_bytes(buf.getvalue())
    spec = replace(
        download.DATASETS["enwik8"],
        urls={"enwik8.zip": (url + "enwik8.zip",)},
        checks={"enwik8.zip": _check(buf.getvalue())},
        member_check=_check(data),
    )
    monkeypatch.setitem(download.DATASETS, "enwik8", spec)
    return data


def _check(data: bytes) -> download.Check:
    return download.Check("sha256", hashlib.sha256(data).hexdigest(), len(data))


def _splits(out: Path) -> list[bytes]:
    return [(out / f"{s}.txt").read_bytes() for s in ("train", "valid", "test")]


def test_download_resumes_verifies_and_prepares(server, tmp_path: Path, monkeypatch) -> None:
    www, url, handler = server
    data = _fake_enwik8(www, monkeypatch, url)
    root = tmp_path / "data"
    part = root / ".downloads" / "enwik8" / "enwik8.zip.part"
    part.parent.mkdir(parents=True)
    part.write_bytes((www / "enwik8.zip").read_bytes()[:100])  # an interrupted earlier run
    out = download.get_dataset("enwik8", root, **QUIET)
    assert out == root / "enwik8" and handler.ranges == ["bytes=100-"]
    assert [len(b) for b in _splits(out)] == list(split_sizes(len(data)))
    assert b"".join(_splits(out)) == data
    assert not (root / ".downloads").exists() and not list(root.glob(".enwik8.*"))
    c = load_corpus(out, cache_dir=False)
    assert c.kind == "char" and c.train.numel() == split_sizes(len(data))[0]
    # prepared: returned again without the network
    monkeypatch.setitem(
        download.DATASETS,
        "enwik8",
        replace(download.DATASETS["enwik8"], urls={"enwik8.zip": (_dead_url(),)}),
    )
    assert download.get_dataset("enwik8", root, **QUIET) == out


def test_server_ignoring_range_restarts_the_download(server, tmp_path: Path, monkeypatch) -> None:
    www, url, handler = server
    handler.honour_range = False
    data = _fake_enwik8(www, monkeypatch, url)
    part = tmp_path / "d" / ".downloads" / "enwik8" / "enwik8.zip.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"stale bytes from somewhere else")
    out = download.get_dataset("enwik8", tmp_path / "d", **QUIET)
    assert b"".join(_splits(out)) == data


def test_checksum_mismatch_deletes_the_download(server, tmp_path: Path, monkeypatch) -> None:
    www, url, _ = server
    _fake_enwik8(www, monkeypatch, url)
    spec = download.DATASETS["enwik8"]
    bad = replace(spec, checks={"enwik8.zip": download.Check("sha256", "0" * 64)})
    monkeypatch.setitem(download.DATASETS, "enwik8", bad)
    with pytest.raises(HyperRouterError, match="fails its sha256 check .* was deleted") as info:
        download.get_dataset("enwik8", tmp_path / "d1", **QUIET)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "d1" / "enwik8").exists()
    assert not (tmp_path / "d1" / ".downloads" / "enwik8" / "enwik8.zip").exists()
    # a wrong extracted member is caught too, and nothing is left half prepared
    wrong_member = replace(spec, member_check=download.Check("sha256", "1" * 64))
    monkeypatch.setitem(download.DATASETS, "enwik8", wrong_member)
    with pytest.raises(HyperRouterError, match="extracted from the archive fails"):
        download.get_dataset("enwik8", tmp_path / "d2", **QUIET)
    assert not (tmp_path / "d2" / "enwik8").exists() and not list((tmp_path / "d2").glob(".enw*"))


def test_offline_gives_one_clear_line(tmp_path: Path, monkeypatch) -> None:
    dead = _dead_url()
    spec = replace(download.DATASETS["enwik8"], urls={"enwik8.zip": (dead,)})
    monkeypatch.setitem(download.DATASETS, "enwik8", spec)
    with pytest.raises(HyperRouterError) as info:
        download.get_dataset("enwik8", tmp_path, timeout=5, **QUIET)
    msg = str(info.value)
    assert msg.startswith("download of enwik8 failed") and "\n" not in msg
    assert dead in msg and "--from enwik8.zip" in msg
    with pytest.raises(HyperRouterError, match="unknown dataset 'enwik9'; valid: enwik8, text8"):
        download.get_dataset("enwik9", tmp_path)


def test_prepare_from_local_files(server, tmp_path: Path, monkeypatch) -> None:
    www, url, handler = server
    data = _fake_enwik8(www, monkeypatch, url)
    out = download.get_dataset("enwik8", tmp_path / "a", from_file=www / "enwik8.zip", **QUIET)
    assert b"".join(_splits(out)) == data
    raw = tmp_path / "enwik8"
    raw.write_bytes(data)  # the extracted file itself
    out2 = download.get_dataset("enwik8", tmp_path / "b", from_file=raw, **QUIET)
    assert _splits(out2) == _splits(out) and raw.exists()
    raw.write_bytes(data[:-1])
    with pytest.raises(HyperRouterError, match=r"--from .*enwik8 has .* bytes, expected"):
        download.get_dataset("enwik8", tmp_path / "c", from_file=raw, **QUIET)
    with pytest.raises(HyperRouterError, match="does not exist"):
        download.get_dataset("enwik8", tmp_path / "c", from_file=tmp_path / "nope", **QUIET)
    assert handler.ranges == []  # no network for --from
    (tmp_path / "d" / "enwik8").mkdir(parents=True)
    (tmp_path / "d" / "enwik8" / "other.txt").write_text("x")
    with pytest.raises(HyperRouterError, match="is not a prepared enwik8 dataset"):
        download.get_dataset("enwik8", tmp_path / "d", from_file=www / "enwik8.zip", **QUIET)


def test_word_datasets_from_local_files(tmp_path: Path, monkeypatch) -> None:
    texts = {s: f" {s} words here \n = heading = \n\n" for s in ("train", "valid", "test")}
    archive = tmp_path / "wikitext-2-v1.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for s, text in texts.items():
            zf.writestr(f"wikitext-2/wiki.{s}.tokens", text)
    spec = download.DATASETS["wikitext-2"]
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    monkeypatch.setitem(
        download.DATASETS,
        "wikitext-2",
        replace(spec, checks={"wikitext-2-v1.zip": download.Check("md5", md5)}),
    )
    out = download.get_dataset("wikitext-2", tmp_path / "wt", from_file=archive, **QUIET)
    assert sorted(p.name for p in out.iterdir()) == [
        ".prepared.json",
        "wiki.test.tokens",
        "wiki.train.tokens",
        "wiki.valid.tokens",
    ]
    c = load_corpus(out, cache_dir=False)
    assert c.kind == "word" and c.vocab.decode(c.valid[:2].tolist()) == "<unk> words"

    ptb_files = tmp_path / "ptb-files"
    ptb_files.mkdir()
    checks = {}
    for s in ("train", "valid", "test"):
        (ptb_files / f"ptb.{s}.txt").write_text(f" a b {s}\n")
        checks[f"ptb.{s}.txt"] = download.Check(
            "md5", hashlib.md5(f" a b {s}\n".encode()).hexdigest()
        )
    monkeypatch.setitem(download.DATASETS, "ptb", replace(download.DATASETS["ptb"], checks=checks))
    with pytest.raises(
        HyperRouterError, match="not usable for ptb; give a folder holding ptb.train.txt"
    ):
        download.get_dataset("ptb", tmp_path / "p", from_file=ptb_files / "ptb.train.txt", **QUIET)
    out = download.get_dataset("ptb", tmp_path / "p", from_file=ptb_files, **QUIET)
    assert load_corpus(out, cache_dir=False).kind == "word"
    (ptb_files / "ptb.test.txt").write_text("changed\n")
    with pytest.raises(HyperRouterError, match="fails its md5 check"):
        download.get_dataset("ptb", tmp_path / "q", from_file=ptb_files, **QUIET)


def test_registry_pins_the_published_checksums() -> None:
    enwik8 = download.DATASETS["enwik8"]
    assert enwik8.member_check.size == 100_000_000
    assert enwik8.member_check.digest.startswith("2b49720ec4d78c3c")
    assert set(download.DATASETS) == {"enwik8", "text8", "wikitext-103", "wikitext-2", "ptb"}
    for spec in download.DATASETS.values():
        assert set(spec.checks) == set(spec.urls)
        assert all(c.digest for c in spec.checks.values())
