"""Small helpers shared by tests: processes, marks, waiting for conditions."""

from __future__ import annotations

import asyncio
import collections
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from polos._private.ops.runtime import terminate_all

ROOT = Path(__file__).resolve().parents[1]


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    out = open(log, "ab")
    return subprocess.Popen(
        [sys.executable, *args], env=env, stdout=out, stderr=subprocess.STDOUT, cwd=str(ROOT)
    )


def stop(proc: subprocess.Popen[bytes]) -> None:
    terminate_all([proc])


def kill(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()  # SIGKILL: no cleanup, no goodbye
    proc.wait()


def marks(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def counts(path: Path) -> tuple[collections.Counter[str], collections.Counter[str]]:
    lines = marks(path)
    started = collections.Counter(ln.split()[1] for ln in lines if ln.startswith("start"))
    done = collections.Counter(ln.split()[1] for ln in lines if ln.startswith("done"))
    return started, done


async def until(cond: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
