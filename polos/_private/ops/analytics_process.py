"""The analytics service as a child of `polos up`: the Parquet export kept current under the
data dir (so `polos sql` has rows right away) and, when ``OTEL_*`` configure an exporter, the
span follower.

A child process rather than tasks in `polos up`'s own event loop: the exporter takes a
notification for every history message and builds Parquet files, CPU work that would sit
between the orchestrator's handlers on the hot path; in its own process it has its own
interpreter (and GIL), and a fault in it cannot stop the orchestrator. The child runs in its
own session, so a Ctrl-C in the terminal reaches only `polos up`, which then closes the child's
stdin: the child makes a last export and exits. If `polos up` dies without that (SIGKILL), the
pipe closes all the same, so no exporter outlives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from polos.config import Settings

# The child's CPU priority below `polos up`'s (os.nice): on a machine the services share, the
# export yields the CPU to the hot path under load and catches up when it is idle.
NICE = int(os.environ.get("POLOS_ANALYTICS_NICE", "10"))

# The export waits for the streams to be quiet for a flush interval before a pass (so it never
# competes with a burst of appends), but never lags more than this under sustained load.
MAX_LAG = float(os.environ.get("POLOS_ANALYTICS_MAX_LAG", "30"))

# A child that dies this soon after its start, this many times in a row, is not restarted again.
QUICK_EXIT_SECONDS = 10.0
QUICK_EXITS_TO_GIVE_UP = 3


def otel_configured(env: Mapping[str, str] = os.environ) -> bool:
    """Whether the ``OTEL_*`` variables ask for spans: an OTLP endpoint, or an explicit
    ``OTEL_TRACES_EXPORTER`` other than ``none``. Unset, OpenTelemetry's default would be OTLP
    to localhost, which a first `polos up` has no collector for."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    choice = env.get("OTEL_TRACES_EXPORTER", "").split(",")[0].strip().lower()
    if choice:
        return choice != "none"
    return bool(
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


class AnalyticsProcess:
    """``python -m polos_analytics`` run, watched and restarted by `polos up` (a ``Service``)."""

    def __init__(
        self,
        settings: Settings,
        *,
        export_dir: Path | None,
        otel: bool,
        log_file: Path,
        flush_interval: float = 1.0,
        nice: int = NICE,
    ) -> None:
        if export_dir is None and not otel:
            raise ValueError("AnalyticsProcess with neither an export nor spans to make")
        self.settings = settings
        self.export_dir = export_dir
        self.otel = otel
        self.log_file = log_file
        self.flush_interval = flush_interval
        self.nice = nice
        self.proc: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self._stopping = False
        self._watch: asyncio.Task[None] | None = None

    def describe(self) -> str:
        what = []
        if self.export_dir is not None:
            what.append(f"Parquet export in {self.export_dir.resolve()}")
        if self.otel:
            what.append("OpenTelemetry spans")
        return " and ".join(what)

    def _args(self) -> list[str]:
        args = [
            sys.executable,
            "-m",
            "polos_analytics",
            "--until-stdin-closes",
            "--flush-interval",
            str(self.flush_interval),
            "--idle",
            str(self.flush_interval),
            "--max-lag",
            str(MAX_LAG),
            "--log-level",
            "warning",
            "--nice",
            str(self.nice),
        ]
        if self.export_dir is not None:
            args += ["--dir", str(self.export_dir)]
        else:
            args.append("--no-export")
        if self.otel:
            args.append("--otel")
        return args

    async def _spawn(self) -> asyncio.subprocess.Process:
        env = dict(os.environ)
        # The service role's URL goes through the environment, not argv, which `ps` shows.
        env.update(self.settings.to_env())
        env["PYTHONUNBUFFERED"] = "1"
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        # A local file opened once per start of the child: not worth a thread.
        with open(self.log_file, "ab") as log:  # noqa: ASYNC230
            return await asyncio.create_subprocess_exec(
                *self._args(),
                stdin=asyncio.subprocess.PIPE,
                stdout=log,
                stderr=log,
                env=env,
                start_new_session=True,
            )

    async def start(self) -> None:
        self.proc = await self._spawn()
        self._watch = asyncio.create_task(self._supervise())

    async def _supervise(self) -> None:
        quick_exits = 0
        delay = 1.0
        while not self._stopping:
            assert self.proc is not None
            started = time.monotonic()
            code = await self.proc.wait()
            if self._stopping:
                return
            quick_exits = quick_exits + 1 if time.monotonic() - started < QUICK_EXIT_SECONDS else 0
            last = _last_line(self.log_file)
            if quick_exits >= QUICK_EXITS_TO_GIVE_UP:
                print(
                    f"analytics: exited with code {code} {quick_exits} times in a row; polos "
                    f"up goes on without it ({last}; log {self.log_file})",
                    file=sys.stderr,
                    flush=True,
                )
                return
            print(
                f"analytics: exited with code {code}; restarting in {delay:g}s ({last}; log "
                f"{self.log_file})",
                file=sys.stderr,
                flush=True,
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)
            if self._stopping:
                return
            self.proc = await self._spawn()
            self.restarts += 1

    async def stop(self, timeout: float = 15.0) -> None:
        self._stopping = True
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(BaseException):
                await self._watch
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        # Closing stdin asks for a clean stop: the exporter writes what is left, then exits.
        if proc.stdin is not None:
            with contextlib.suppress(Exception):
                proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


def _last_line(path: Path) -> str:
    """The last line of a log, for a one-line report of why a child ended."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            lines = [ln for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    return lines[-1].strip() if lines else "no output"


__all__ = ["AnalyticsProcess", "otel_configured"]
