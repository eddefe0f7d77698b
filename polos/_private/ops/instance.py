"""One ``polos up`` per data directory.

``polos up`` holds an OS lock (``flock``) on ``<data-dir>/polos.lock`` for as long as it runs,
taken before anything touches the directory; the file says who holds it (pid, URL, the
nats-server's pid). A second ``polos up`` on the same directory cannot take the lock and
refuses, naming the first. The lock dies with its process, so a ``polos up`` killed with
SIGKILL leaves nothing to clean up; the file's text may stay, but only a held lock counts.

``polos`` commands find a running ``polos up`` (its URL) through the same file: ``running``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from polos.errors import PolosError

LOCK_FILE = "polos.lock"
SERVER_PID_FILE = "nats-server.pid"
DEFAULT_DATA_DIR = ".polos"


def data_dir_from(value: str | os.PathLike[str] | None) -> Path:
    """The data dir: the flag's value, else ``$POLOS_DATA_DIR``, else ``./.polos``."""
    return Path(value or os.environ.get("POLOS_DATA_DIR") or DEFAULT_DATA_DIR)


class DataDirInUseError(PolosError):
    """Another ``polos up`` (or a nats-server it left behind) uses this data directory."""


@dataclass(frozen=True)
class Instance:
    """What the lock file says about the ``polos up`` holding it."""

    pid: int | None
    url: str | None
    server_pid: int | None
    started_at: float | None
    ui_url: str | None = None  # its web UI, without credentials

    def describe(self) -> str:
        bits = [f"pid {self.pid}" if self.pid else "pid unknown"]
        bits.append(self.url or "URL not known yet: still starting")
        return ", ".join(bits)


def _parse(text: str) -> Instance:
    try:
        doc: dict[str, Any] = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError:
        doc = {}
    return Instance(
        doc.get("pid"),
        doc.get("url"),
        doc.get("server_pid"),
        doc.get("started_at"),
        doc.get("ui_url"),
    )


def _alive(pid: int | None) -> bool:
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def running(data_dir: str | os.PathLike[str]) -> Instance | None:
    """The ``polos up`` running on ``data_dir``, or None when none holds its lock."""
    path = Path(data_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _parse(os.pread(fd, 1 << 16, 0).decode(errors="replace"))
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class DataDirLock:
    """The lock of one running ``polos up``. ``acquire`` raises ``DataDirInUseError``."""

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / LOCK_FILE
        self._fd: int | None = None
        self._doc: dict[str, Any] = {}

    def acquire(self, patience: float = 1.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + patience
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = _parse(os.pread(fd, 1 << 16, 0).decode(errors="replace"))
                # A `polos` command looking (``running``) holds a shared lock for an instant
                # and names no pid: wait that out. A live holder is refused at once.
                if (holder.pid and _alive(holder.pid)) or time.monotonic() > deadline:
                    os.close(fd)
                    raise DataDirInUseError(
                        f"polos up already runs on {self.data_dir.resolve()} ({holder.describe()}); "
                        "stop it first, or give this one another --data-dir"
                    ) from None
                time.sleep(0.05)
        self._fd = fd
        self.record(pid=os.getpid(), started_at=time.time())

    def record(self, **fields: Any) -> None:
        """Add ``fields`` (url, server_pid) to what the lock file says."""
        assert self._fd is not None, "lock not held"
        self._doc.update(fields)
        data = json.dumps(self._doc).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
        os.close(self._fd)  # closing the descriptor releases the lock
        self._fd = None

    def __enter__(self) -> DataDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def leftover_server(data_dir: str | os.PathLike[str]) -> int | None:
    """The pid of a nats-server still running on ``data_dir`` although no ``polos up`` holds
    its lock (its ``polos up`` was killed where the server cannot die with it), or None."""
    try:
        pid = int((Path(data_dir) / SERVER_PID_FILE).read_text().strip())
    except (OSError, ValueError):
        return None
    if not _alive(pid):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return pid  # no /proc (macOS): a live pid is all we can tell
    return pid if b"nats-server" in cmdline else None


__all__ = [
    "DEFAULT_DATA_DIR",
    "LOCK_FILE",
    "SERVER_PID_FILE",
    "DataDirInUseError",
    "DataDirLock",
    "Instance",
    "data_dir_from",
    "leftover_server",
    "running",
]
