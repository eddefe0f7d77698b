"""Cron schedules against a real nats-server: keyed schedules through the client, a
``@workflow(schedule=...)``, two schedulers, firings missed while no scheduler ran."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from polos import WorkflowContext, workflow
from polos_services.scheduler import Scheduler


@workflow(name="cron_job")
async def cron_job(ctx: WorkflowContext, payload: Any) -> Any:
    return payload


@workflow(name="cron_decl", schedule="* * * * * *", timezone="Europe/Paris")
async def cron_decl(ctx: WorkflowContext) -> str:
    return "tick"


async def _runs(env: Any, wf: str) -> list[Any]:
    return await env.client.list_runs(workflow=wf, limit=1000)


async def _wait_runs(env: Any, wf: str, n: int, timeout: float = 15) -> list[Any]:
    deadline = time.monotonic() + timeout
    while True:
        runs = await _runs(env, wf)
        if len(runs) >= n:
            return runs
        assert time.monotonic() < deadline, f"only {len(runs)} runs of {wf}"
        await asyncio.sleep(0.1)


async def test_keyed_schedule_create_list_delete(env_factory: Any) -> None:
    env = await env_factory([cron_job])
    doc = await env.client.create_schedule(
        "nightly", cron_job, "0 3 * * *", timezone="Europe/Berlin", input={"kind": "nightly"}
    )
    assert doc["cron"] == "0 3 * * *"
    await env.client.create_schedule("fast", "cron_job", "@every 1s", input={"kind": "fast"})
    listed = {d["key"]: d for d in await env.client.list_schedules()}
    assert set(listed) == {"nightly", "fast"} and listed["nightly"]["timezone"] == "Europe/Berlin"
    runs = await _wait_runs(env, "cron_job", 2)
    outputs = [(await env.client.get_handle(r.run_id).result(timeout=10)) for r in runs[:2]]
    assert outputs == [{"kind": "fast"}] * 2
    assert await env.client.delete_schedule("fast") is True
    assert await env.client.delete_schedule("fast") is False
    await asyncio.sleep(0.5)
    before = len(await _runs(env, "cron_job"))
    await asyncio.sleep(1.5)
    assert len(await _runs(env, "cron_job")) == before  # no firing after the delete
    assert [d["key"] for d in await env.client.list_schedules()] == ["nightly"]
    with pytest.raises(ValueError):
        await env.client.create_schedule("bad", cron_job, "every tuesday")
    with pytest.raises(ValueError):
        await env.client.create_schedule("badtz", cron_job, "0 3 * * *", timezone="Mars/Olympus")


async def test_workflow_schedule_and_two_schedulers(env_factory: Any) -> None:
    env = await env_factory([cron_decl])
    second = Scheduler(env.as_role("service"))
    await second.start()
    try:
        runs = await _wait_runs(env, "cron_decl", 3)
        listed = await env.client.list_schedules()
        assert [d["key"] for d in listed] == ["wf-cron_decl"]
        assert listed[0]["timezone"] == "Europe/Paris"
        await second.stop()
        await env.scheduler.stop()
        await asyncio.sleep(0.5)
        fired = env.scheduler.cron_runs + second.cron_runs
        runs = await _runs(env, "cron_decl")
        # Each firing was taken by one of the two schedulers and started one run.
        assert len(runs) == fired
        print(
            f"\ncron with two schedulers: {env.scheduler.cron_runs} + {second.cron_runs} firings, "
            f"{len(runs)} runs"
        )
        # Missed while no scheduler ran: the server keeps the firings; each starts one run
        # (late) when a scheduler comes back.
        await asyncio.sleep(2.2)
        env.scheduler = Scheduler(env.as_role("service"))
        await env.scheduler.start()
        await _wait_runs(env, "cron_decl", len(runs) + 2)
    finally:
        await second.stop()
        await env.client.delete_schedule("wf-cron_decl")  # stop the every-second firings
