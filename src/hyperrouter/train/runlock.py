"""An exclusive lock on a run folder for the life of a run (train, resume, finetune, compare).

Two processes started with the same `--out` would otherwise both pass the "folder already holds
files" check and interleave their metrics, configs and checkpoints. The lock is an advisory
`flock` on RUN_DIR/.lock, which holds the owner's pid and host for people and scripts
(scripts/table2.py reads it). The kernel drops a `flock` when its process dies, however it dies,
so a lock file left by a killed process is taken over by the next run without asking; where
`fcntl` is missing (Windows) the file is created exclusively and a lock whose pid is no longer
running is taken over. Under torchrun only rank 0 locks: the folder is rank 0's to write.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hyperrouter import distributed
from hyperrouter.errors import HyperRouterError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

LOCK_FILE = ".lock"


def holds_files(folder: Path) -> bool:
    """Whether `folder` holds anything but a lock file (a lock alone is no run)."""
    return folder.is_dir() and any(p.name != LOCK_FILE for p in folder.iterdir())


def _owner(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """Exclusive lock on `folder` (created if missing; removed again on release if this lock
    created it and nothing else was written)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None
        self._created = False

    def acquire(self) -> None:
        self._created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            self._fd = self._lock_flock() if fcntl is not None else self._lock_exclusive()
        except BaseException:
            self._remove_folder_if_empty()
            raise
        os.ftruncate(self._fd, 0)
        record = {"pid": os.getpid(), "host": socket.gethostname()}
        os.write(self._fd, (json.dumps(record) + "\n").encode())

    def _busy(self) -> HyperRouterError:
        owner = _owner(self.path)
        who = f"pid {owner['pid']}" if "pid" in owner else "another process"
        if owner.get("host") and owner["host"] != socket.gethostname():
            who += f" on {owner['host']}"
        return HyperRouterError(
            f"{self.folder} is in use by another hyperrouter run ({who}); wait for it to finish "
            f"or choose another --out"
        )

    def _lock_flock(self) -> int:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._busy() from None
            try:  # the file we locked may have been released and removed meanwhile: retry
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)

    def _lock_exclusive(self) -> int:  # pragma: no cover - platforms without fcntl
        while True:
            try:
                return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                pid = _owner(self.path).get("pid")
                if isinstance(pid, int) and _alive(pid):
                    raise self._busy() from None
                self.path.unlink(missing_ok=True)  # left by a process that is gone

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)  # closing drops the flock
            self._fd = None
        self._remove_folder_if_empty()

    def _remove_folder_if_empty(self) -> None:
        if self._created:
            try:
                self.folder.rmdir()  # only succeeds when nothing was written
            except OSError:
                pass


@contextmanager
def locked(folder: str | os.PathLike) -> Iterator[None]:
    """Hold the run folder's lock (rank 0 under torchrun, every rank told if it is busy)."""
    lock = RunLock(folder)
    distributed.on_main(lock.acquire)
    try:
        yield
    finally:
        lock.release()
