"""Durable time against a real nats-server: sleeps, timer accuracy, a scheduler restart and a
nats-server restart with timers pending, two schedulers, long retry back-offs."""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from polos import RetryPolicy, WorkflowContext, workflow
from polos._private.run.wake import wake
from polos._private.store import append
from polos.testing import PolosEnvironment, SecuredServer
from polos_services.scheduler import Scheduler
from tests.test_waiting import until_status

ATTEMPTS: dict[str, list[float]] = {}


@workflow(name="w_sleepy")
async def w_sleepy(ctx: WorkflowContext, seconds: float) -> float:
    await ctx.step.sleep("nap", timedelta(seconds=seconds))
    return await ctx.step.now("woke") / 1000


@workflow(name="w_until")
async def w_until(ctx: WorkflowContext, when: float) -> str:
    await ctx.step.sleep_until("alarm", datetime.fromtimestamp(when, tz=UTC))
    return "rang"


def _flaky(run: str) -> str:
    ATTEMPTS.setdefault(run, []).append(time.time())
    if len(ATTEMPTS[run]) < 3:
        raise RuntimeError("not yet")
    return "ok"


@workflow(name="w_backoff")
async def w_backoff(ctx: WorkflowContext) -> str:
    policy = RetryPolicy(max_attempts=3, initial_interval=0.4, backoff=1.0)
    return await ctx.step.run("flaky", _flaky, ctx.run_id, retry=policy)


async def test_sleep_holds_no_worker_and_wakes_on_time(env_factory: Any) -> None:
    env = await env_factory([w_sleepy, w_until])
    handles = []
    for _ in range(5):
        t0 = time.time()
        handles.append((t0, await env.client.start(w_sleepy, 0.6)))
    await until_status(env, handles[-1][1].run_id, "suspended")
    assert not env.worker.active_runs  # sleeping runs hold no worker
    lateness = []
    for t0, h in handles:
        woke = await h.result(timeout=20)
        assert woke >= t0 + 0.6
    lateness = env.scheduler.lateness_ms
    print(
        f"\ntimer lateness (fire - due), 5 timers: median {statistics.median(lateness):.1f} ms, "
        f"max {max(lateness):.1f} ms"
    )
    until_ = await env.client.start(w_until, time.time() + 0.3)
    assert await until_.result(timeout=20) == "rang"


async def test_long_retry_backoff_waits_in_the_scheduler(env_factory: Any, settings: Any) -> None:
    env = await env_factory([w_backoff])
    env.worker.settings = env.worker.settings.with_(local_retry_limit=0.1)
    handle = await env.client.start(w_backoff)
    assert await handle.result(timeout=20) == "ok"
    times = ATTEMPTS[handle.run_id]
    assert len(times) == 3 and all(b - a >= 0.4 for a, b in itertools.pairwise(times))
    history = [e for _, e in await env.client.history(handle.run_id)]
    retry_waits = [e for e in history if getattr(e, "kind", None) == "retry"]
    assert len(retry_waits) == 2  # both back-offs suspended the run


async def test_scheduler_restart_with_timers_pending(env_factory: Any) -> None:
    env = await env_factory([w_sleepy])
    handles = [await env.client.start(w_sleepy, 1.0) for _ in range(3)]
    for h in handles:
        await until_status(env, h.run_id, "suspended")
    await env.scheduler.stop()  # no scheduler while the timers come due
    await asyncio.sleep(1.3)
    for h in handles:
        assert (await env.client.get(h.run_id)).status == "suspended"
    env.scheduler = Scheduler(env.as_role("service"))
    await env.scheduler.start()
    for h in handles:
        await h.result(timeout=20)
    assert env.scheduler.woken == 3


async def test_two_schedulers_each_timer_takes_effect_once(env_factory: Any) -> None:
    env = await env_factory([w_sleepy])
    second = Scheduler(env.as_role("service"))
    await second.start()
    try:
        handles = [await env.client.start(w_sleepy, 0.3) for _ in range(10)]
        for h in handles:
            await h.result(timeout=20)
        assert env.scheduler.woken + second.woken == 10
        for h in handles:
            wakes = [
                e for _, e in await env.client.history(h.run_id) if type(e).__name__ == "RunWoken"
            ]
            assert len(wakes) == 1
        print(f"\ntwo schedulers: {env.scheduler.woken} + {second.woken} timers")
    finally:
        await second.stop()


async def test_timer_survives_nats_server_restart(tmp_path: Path) -> None:
    # Its own server (it is killed), with auth on: the restart keeps every role's users.
    server = SecuredServer(tmp_path / "nats", port=0, pool=1)
    server.start()
    try:
        settings = server.namespace()
        async with PolosEnvironment(settings, [w_sleepy]) as env:
            handle = await env.client.start(w_sleepy, 1.5)
            await until_status(env, handle.run_id, "suspended")
            server.kill()  # SIGKILL with the timer pending
            await asyncio.sleep(0.3)
            server.start()
            await handle.result(timeout=30)
    finally:
        server.stop()


async def test_stale_timer_changes_nothing(env_factory: Any) -> None:
    """A timer that fires after the run moved on (resumed first) is fenced out."""
    env = await env_factory([])
    from polos import history as ev

    js, names = env.scheduler.js, env.client.names  # histories and wakes: a service's
    run = "stale1"
    seq = await append(
        js, names, run, ev.RunRequested(run_id=run, workflow="x"), expected_last_seq=0, msg_id="r"
    )
    await append(
        js,
        names,
        run,
        ev.RunClaimed(run_id=run, worker_id="w", attempt=1),
        expected_last_seq=seq,
        msg_id="c",
    )
    # The timer was armed for the state at ``seq``; the run moved on since.
    assert (
        await wake(js, names, run, "s", expected_seq=seq, reason="t", cause="timer", kind="sleep")
        is None
    )
    assert len(await env.client.history(run)) == 2


async def test_scheduler_process_sigkilled_with_timers_pending(
    env_factory: Any, subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    """The scheduler as a real process, SIGKILLed while timers are pending; a new one fires them."""
    from tests.helpers import kill, spawn, stop

    env = await env_factory([w_sleepy])
    await env.scheduler.stop()  # only the subprocess schedulers below
    first = spawn(
        ["-m", "polos_services.scheduler"], subprocess_env.as_role("service"), tmp_path / "s1.log"
    )
    try:
        handles = [await env.client.start(w_sleepy, 1.5) for _ in range(3)]
        for h in handles:
            await until_status(env, h.run_id, "suspended")
        kill(first)
        second = spawn(
            ["-m", "polos_services.scheduler"],
            subprocess_env.as_role("service"),
            tmp_path / "s2.log",
        )
        try:
            for h in handles:
                await h.result(timeout=30)
        finally:
            stop(second)
    finally:
        stop(first)
    for h in handles:
        wakes = [e for _, e in await env.client.history(h.run_id) if type(e).__name__ == "RunWoken"]
        assert len(wakes) == 1
