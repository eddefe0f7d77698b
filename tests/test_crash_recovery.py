"""Crash recovery with real processes: SIGKILLed workers and orchestrators, a restarted server.

Every step function leaves a mark on disk each time it really starts and finishes; the counters
prove that completed steps ran exactly once and the step in flight at a crash at most twice.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from polos import PolosClient, Worker
from polos.testing import PolosEnvironment, SecuredServer
from tests.helpers import counts, kill, marks, spawn, stop, until
from tests.workflows.marked import Job, marked

pytestmark = pytest.mark.slow

WORKER = ["-m", "polos_services.worker", "tests.workflows.marked"]
ORCHESTRATOR = ["-m", "polos_services.orchestrator"]


def _assert_exactly_once(log: Path, steps: int, in_flight: set[str] = frozenset()) -> None:  # type: ignore[assignment]
    started, done = counts(log)
    for i in range(1, steps + 1):
        s = str(i)
        assert done[s] == 1, f"step {i} finished {done[s]} times: {marks(log)}"
        limit = 2 if s in in_flight else 1
        assert 1 <= started[s] <= limit, f"step {i} started {started[s]} times"


async def test_sigkill_worker_inside_a_step(
    env_factory: Any, subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    log = tmp_path / "marks.log"
    subprocess_env["POLOS_TEST_LOG"] = str(log)
    env = await env_factory([], with_worker=False)
    w1 = spawn(WORKER, subprocess_env.as_role("worker"), tmp_path / "w1.out")
    w2 = None
    try:
        handle = await env.client.start("marked", Job(steps=10, step_seconds=0.1))
        await until(lambda: "start 4" in marks(log), 30, "step 4 to start")
        kill(w1)  # mid-step 4
        w2 = spawn(WORKER, subprocess_env.as_role("worker"), tmp_path / "w2.out")
        assert await handle.result(timeout=30) == sum(i * i for i in range(1, 11))
    finally:
        stop(w1)
        if w2:
            stop(w2)
    started, _ = counts(log)
    _assert_exactly_once(log, 10, in_flight={"4"})
    print(f"\nstep 4 (in flight at SIGKILL) started {started['4']}x; every other step once")


async def test_sigkill_worker_between_steps(
    env_factory: Any, subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    log = tmp_path / "marks.log"
    subprocess_env["POLOS_TEST_LOG"] = str(log)
    env = await env_factory([], with_worker=False)
    w1 = spawn(WORKER, subprocess_env.as_role("worker"), tmp_path / "w1.out")
    w2 = None
    try:
        handle = await env.client.start("marked", Job(steps=6, pause_seconds=0.4))
        await until(lambda: "done 3" in marks(log), 30, "step 3 to finish")
        await asyncio.sleep(0.1)  # inside the pause after step 3: no step in flight
        kill(w1)
        w2 = spawn(WORKER, subprocess_env.as_role("worker"), tmp_path / "w2.out")
        assert await handle.result(timeout=30) == sum(i * i for i in range(1, 7))
    finally:
        stop(w1)
        if w2:
            stop(w2)
    _assert_exactly_once(log, 6)


async def test_orchestrator_sigkilled_and_restarted_mid_run(
    settings: Any, subprocess_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "marks.log"
    monkeypatch.setenv("POLOS_TEST_LOG", str(log))  # the in-process worker marks here
    orch = spawn(ORCHESTRATOR, subprocess_env.as_role("service"), tmp_path / "o1.out")
    client = await PolosClient.connect(settings=settings)
    try:
        async with Worker([marked], settings=settings.worker):
            first = await client.start(marked, Job(steps=8, step_seconds=0.05))
            await until(lambda: "start 2" in marks(log), 30, "the first run to start")
            kill(orch)
            # Commands sent while no orchestrator runs are kept by the stream.
            second = await client.start(marked, Job(steps=3))
            orch = spawn(ORCHESTRATOR, subprocess_env.as_role("service"), tmp_path / "o2.out")
            assert await first.result(timeout=30) == sum(i * i for i in range(1, 9))
            assert await second.result(timeout=30) == 14
            # The index caught up with both runs after the restart.
            await until_index(client, {first.run_id, second.run_id})
    finally:
        stop(orch)
        await client.close()


async def until_index(client: PolosClient, run_ids: set[str]) -> None:
    for _ in range(200):
        done = {r.run_id for r in await client.list_runs(status="completed")}
        if run_ids <= done:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("run index did not catch up")


async def test_nats_server_restart_mid_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "marks.log"
    monkeypatch.setenv("POLOS_TEST_LOG", str(log))
    # Its own server (it is killed), with auth on: the restart keeps every role's users.
    server = SecuredServer(tmp_path / "nats", port=0, pool=1)
    server.start()
    try:
        settings = server.namespace()
        async with PolosEnvironment(settings, [marked]) as env:
            handle = await env.client.start(marked, Job(steps=10, step_seconds=0.1))
            await until(lambda: "done 3" in marks(log), 30, "step 3 to finish")
            server.kill()  # SIGKILL the server itself, then bring it back on the same port
            await asyncio.sleep(0.3)
            server.start()
            assert await handle.result(timeout=60) == sum(i * i for i in range(1, 11))
        _, done = counts(log)
        # Nothing completed ran twice; a step whose append was cut by the crash may re-run.
        assert all(done[str(i)] <= 2 for i in range(1, 11))
        completed_twice = [i for i in range(1, 4) if done[str(i)] != 1]
        assert completed_twice == [], f"steps recorded before the crash re-ran: {completed_twice}"
    finally:
        server.stop()
