"""``Polos`` as separate processes: two started at once on one empty directory share the one
local stack the first starts (and ``polos`` commands find it), and a ``Polos`` SIGKILLed in
the middle of a run leaves the run to the next one, its completed steps never run again."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import orjson
import pytest

from polos.testing import PolosEnvironment
from tests.helpers import ROOT, kill, marks, until

pytestmark = pytest.mark.slow

_SHARED = """
import asyncio, sys
from pathlib import Path
from polos import Polos, WorkflowContext, workflow

@workflow(name="pl_add")
async def pl_add(ctx: WorkflowContext, n: int) -> int:
    return await ctx.step.run("add", lambda: n + 100)

async def main() -> None:
    async with Polos() as polos:
        print(await pl_add.run(polos, int(sys.argv[1])), flush=True)
        release = Path(sys.argv[2])
        while not release.exists():  # keep the stack up until the test says so
            await asyncio.sleep(0.05)

asyncio.run(main())
"""


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POLOS_")}
    env.update(PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", **extra)
    return env


async def test_two_polos_processes_share_the_local_stack_one_starts(tmp_path: Path) -> None:
    (tmp_path / "shared.py").write_text(_SHARED)
    env = _clean_env()
    procs = {
        name: subprocess.Popen(
            [sys.executable, "shared.py", str(n), f"release-{name}"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for name, n in (("a", 1), ("b", 2))
    }
    outs: dict[str, tuple[bytes, bytes]] = {}
    try:
        # Both printed their result: read the first line of each without ending them.
        lines = {}
        for name, p in procs.items():
            assert p.stdout is not None
            lines[name] = await asyncio.wait_for(asyncio.to_thread(p.stdout.readline), 90)
        assert lines == {"a": b"101\n", "b": b"102\n"}
        # While they run, `polos` commands of the directory find the stack they use.
        runs = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "polos", "runs", "--json"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            timeout=60,
        )
        assert runs.returncode == 0, runs.stderr
        assert sorted(r["status"] for r in orjson.loads(runs.stdout)) == ["completed"] * 2
        # The guest first: the host's stack must outlive it.
        lock = orjson.loads((tmp_path / ".polos" / "polos.lock").read_bytes())
        host = next(n for n, p in procs.items() if p.pid == lock["pid"])
        guest = "b" if host == "a" else "a"
        for name in (guest, host):
            (tmp_path / f"release-{name}").touch()
            out, err = await asyncio.to_thread(procs[name].communicate, timeout=60)
            outs[name] = (out, err)
            assert procs[name].returncode == 0, err.decode()
    finally:
        for p in procs.values():
            if p.poll() is None:
                kill(p)
    said = {n: e.decode().strip().splitlines() for n, (_, e) in outs.items()}
    assert len(said[host]) == 1 and "started a local one for this process" in said[host][0]
    assert said[guest] == []  # it found the host's stack: nothing to say
    assert not (tmp_path / ".polos" / "polos.lock").read_text()  # released


_KILLED = """
import asyncio, os, sys, time
from pathlib import Path
from polos import Polos, WorkflowContext, workflow

MARKS = Path(sys.argv[1])

def mark(what: str) -> None:
    with MARKS.open("a") as f:
        f.write(f"{what} {os.getpid()}\\n")

def first(n: int) -> int:
    mark("first")
    return n + 1

def second(n: int) -> int:
    mark("second")
    while not (MARKS.parent / "go").exists():
        time.sleep(0.05)
    return n * 10

@workflow(name="pl_two_steps")
async def pl_two_steps(ctx: WorkflowContext, n: int) -> int:
    a = await ctx.step.run("first", first, n)
    return await ctx.step.run("second", second, a)

asyncio.run(Polos().serve())
"""


async def test_a_killed_polos_leaves_its_run_to_the_next(
    stack: PolosEnvironment, tmp_path: Path, subprocess_env: Any
) -> None:
    script = tmp_path / "killed.py"
    script.write_text(textwrap.dedent(_KILLED))
    effects = tmp_path / "marks.log"
    env = subprocess_env.as_role("worker")

    def serve(name: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, str(script), str(effects)],
            cwd=tmp_path,
            env=env,
            stdout=open(tmp_path / f"{name}.log", "ab"),
            stderr=subprocess.STDOUT,
        )

    first = serve("first")
    second = None
    try:
        handle = await stack.client.start("pl_two_steps", 4)
        await until(lambda: any(m.startswith("second") for m in marks(effects)), 60, "step 2")
        kill(first)  # SIGKILL in the middle of step 2
        second = serve("second")
        await until(lambda: len([m for m in marks(effects) if m.startswith("second")]) == 2, 60)
        (tmp_path / "go").touch()
        assert await handle.result(timeout=60) == 50
        lines = marks(effects)
        assert [m.split()[0] for m in lines].count("first") == 1, lines  # never again
        assert [m.split()[0] for m in lines].count("second") == 2, lines  # it never completed
        second.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(second.wait, 30) == 0
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                kill(p)
        for log in sorted(tmp_path.glob("*.log")):
            print(f"----- {log.name}\n{log.read_text()[-3000:]}")
