"""Slot leases with real processes: a worker SIGKILLed while its runs hold slots.

The killed worker cannot give anything back; its slots must return by themselves when their
leases run out, the runs waiting behind them must then be admitted without any worker's help,
and every run must still finish once a worker is back.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from polos import RunNotFoundError
from polos._private import limits
from polos.config import Settings
from tests.helpers import kill, spawn, stop

pytestmark = pytest.mark.slow

LEASE = 2.0

MODULE = """
import asyncio
from polos import Queue, WorkflowContext, workflow

LEASED = Queue("leased", concurrency=3)


async def hold(seconds: float) -> float:
    await asyncio.sleep(seconds)
    return seconds


@workflow(queue=LEASED)
async def leased(ctx: WorkflowContext, seconds: float) -> float:
    # Long on the first attempt (the worker is killed inside it), short after a crash.
    return await ctx.step.run("hold", hold, seconds if ctx.attempt == 1 else 0.01)
"""


@pytest.fixture
async def settings(make_settings: Any) -> Settings:
    return await make_settings(slot_lease=LEASE)


async def test_sigkilled_worker_gives_its_slots_back_within_the_lease(
    env_factory: Any, subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    module = tmp_path / "leased_wf.py"
    module.write_text(MODULE)
    subprocess_env["POLOS_SLOT_LEASE"] = str(LEASE)
    env = await env_factory([], with_worker=False)
    store = limits.store_for(env.client.nc, env.client.js, env.client.names)
    w1 = spawn(
        ["-m", "polos_services.worker", str(module)],
        subprocess_env.as_role("worker"),
        tmp_path / "w1.out",
    )
    w2 = None
    try:
        # Wait until the worker has registered the queue's limit, then fill the queue.
        cfg = limits.LimitsConfig(env.client.js, env.client.names, ttl=0)
        deadline = time.monotonic() + 30
        while await cfg.queue("leased") is None:
            assert time.monotonic() < deadline, "the worker never registered its queue"
            await asyncio.sleep(0.05)
        holders = [await env.client.start("leased", 60.0) for _ in range(3)]
        held_ids = {h.run_id for h in holders}

        async def slot_runs() -> set[str]:
            return {e.value["run"] for e in await store.entries("q.leased.>")}

        async def info(run_id: str) -> Any:
            try:
                return await env.client.get(run_id)
            except RunNotFoundError:  # the start command is stored but not yet acted on
                return None

        async def running() -> bool:
            infos = [await info(h.run_id) for h in holders]
            return all(i is not None and i.status == "running" for i in infos)

        deadline = time.monotonic() + 30
        while not (await slot_runs() == held_ids and await running()):
            assert time.monotonic() < deadline, "the three runs never ran"
            await asyncio.sleep(0.05)
        # Two more wait behind them, holding no worker.
        waiters = [await env.client.start("leased", 0.01) for _ in range(2)]
        deadline = time.monotonic() + 30
        while True:
            infos = [await info(h.run_id) for h in waiters]
            if all(i is not None and (i.waiting or {}).get("kind") == "slot" for i in infos):
                break
            assert time.monotonic() < deadline, "the waiters never parked"
            await asyncio.sleep(0.05)

        kill(w1)  # SIGKILL while holding all three slots
        t_kill = time.monotonic()
        deadline = t_kill + LEASE * 5
        while (await slot_runs()) & held_ids:
            assert time.monotonic() < deadline, "the dead worker's slots never came back"
            await asyncio.sleep(0.02)
        returned = time.monotonic() - t_kill
        # With no worker alive, the waiting runs get the freed slots (admission is the
        # orchestrator's job, not a worker's).
        deadline = time.monotonic() + LEASE * 5
        while True:
            infos = [await env.client.get(h.run_id) for h in waiters]
            if all(i.status == "queued" for i in infos):
                break
            assert time.monotonic() < deadline, f"waiters not admitted: {infos}"
            await asyncio.sleep(0.02)
        admitted = time.monotonic() - t_kill
        print(
            f"\nslots of the SIGKILLed worker back {returned:.2f}s after the kill "
            f"(lease {LEASE}s, renewed every {LEASE / 3:.2f}s, TTL granularity 1s); waiters "
            f"admitted {admitted:.2f}s after the kill"
        )

        w2 = spawn(
            ["-m", "polos_services.worker", str(module)],
            subprocess_env.as_role("worker"),
            tmp_path / "w2.out",
        )
        results = await asyncio.gather(*(h.result(timeout=60) for h in holders + waiters))
        assert results == [0.01] * 5
        for h in holders:
            info = await env.client.get(h.run_id)
            assert info.attempt >= 2  # resumed on the new worker after the crash
    finally:
        stop(w1)
        if w2 is not None:
            stop(w2)
    # Nothing leaks once everything is over.
    deadline = time.monotonic() + LEASE * 3
    while await slot_runs():
        assert time.monotonic() < deadline, "slots leaked"
        await asyncio.sleep(0.05)
