"""The original Polos SDK's ``@workflow`` options, each through a real orchestrator, scheduler
and worker under authentication (every component as its own role): ``id``, ``description``,
``queue`` as a name, a ``Queue`` or a dict, ``schedule`` as a cron string, a dict or ``True``
(runs get a ``SchedulePayload``), ``trigger_on_event`` with ``batch_size`` /
``batch_timeout_seconds`` (runs get the list of events), and every unsupported option
refused at decoration time."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from polos import (
    BatchEventPayload,
    EventPayload,
    PolosClient,
    Queue,
    SchedulePayload,
    Worker,
    WorkflowContext,
    queue,
    workflow,
)
from polos._private.run.definitions import OPTIONS
from polos_services.scheduler import Scheduler
from tests.helpers import kill, spawn, stop

ORCHESTRATOR = ["-m", "polos_services.orchestrator"]


async def _runs(env: Any, wf: str, n: int, timeout: float = 20) -> list[Any]:
    deadline = time.monotonic() + timeout
    while True:
        runs = await env.client.list_runs(workflow=wf, limit=1000)
        if len(runs) >= n and all(r.status == "completed" for r in runs):
            return runs
        assert time.monotonic() < deadline, f"{len(runs)} runs of {wf}: {runs}"
        await asyncio.sleep(0.05)


# --------------------------------------------------------------------------- refused options


def test_every_unknown_option_is_refused_naming_it_and_the_accepted_ones() -> None:
    for bad in ("retries", "timeout", "queue_name", "version", "deployment_id"):
        with pytest.raises(TypeError) as info:
            workflow(**{bad: 1})
        msg = str(info.value)
        assert repr(bad) in msg and all(o in msg for o in OPTIONS), msg


def _define(**options: Any) -> None:
    async def f(ctx: WorkflowContext) -> None: ...

    workflow(**options)(f)


@pytest.mark.parametrize(
    ("options", "error", "says"),
    [
        ({"queue": 3}, TypeError, "queue must be a name, a Queue or a dict"),
        ({"queue": {"concurrency_limit": 2, "priority": 1}}, ValueError, "'priority'"),
        ({"queue": {"concurrency_limit": 0}}, ValueError, "concurrency"),
        ({"schedule": 5}, TypeError, "schedule must be a cron string"),
        ({"schedule": {"timezone": "UTC"}}, ValueError, "needs 'cron'"),
        ({"schedule": {"cron": "* * * * *", "jitter": 3}}, ValueError, "'jitter'"),
        ({"schedule": "every tuesday"}, ValueError, "5 cron fields"),
        ({"schedule": {"cron": "* * * * *", "timezone": "Mars/Olympus"}}, ValueError, "time zone"),
        ({"schedule": "* * * * *", "queue": "q"}, ValueError, "cannot specify a queue"),
        ({"schedule": True, "trigger_on_event": "a.b"}, ValueError, "not both"),
        ({"batch_size": 3}, ValueError, "need trigger_on_event"),
        ({"trigger_on_event": "a.b", "batch_size": 0}, ValueError, "batch_size"),
        ({"trigger_on_event": "a.b", "batch_timeout_seconds": -1}, ValueError, "batch_timeout"),
        ({"trigger_on_event": "a..b"}, ValueError, "empty"),
        ({"on_start": "audit"}, TypeError, "a hook must be a function"),
        ({"state_schema": dict}, TypeError, "state_schema must be a pydantic model"),
        ({"id": "a", "name": "b"}, ValueError, "same thing"),
        ({"id": "not a token"}, ValueError, "must be 1-128"),
        ({"description": 7}, TypeError, "description must be a string"),
    ],
)
def test_wrong_values_raise_at_decoration_time(
    options: dict[str, Any], error: type[Exception], says: str
) -> None:
    with pytest.raises(error) as info:
        _define(**options)
    assert says.lower() in str(info.value).lower(), str(info.value)


# --------------------------------------------------------------------------- id, description


@workflow(id="order_processor", description="charges and ships an order")
async def order_processor_fn(ctx: WorkflowContext, order: dict[str, Any]) -> dict[str, Any]:
    return {"id": order["id"], "by": ctx.workflow}


async def test_id_is_the_registered_name_and_description_is_registered(env_factory: Any) -> None:
    env = await env_factory([order_processor_fn])
    assert order_processor_fn.id == order_processor_fn.name == "order_processor"
    handle = await env.client.start("order_processor", {"id": "o-1"})
    assert await handle.result(timeout=20) == {"id": "o-1", "by": "order_processor"}
    kv = await env.client.js.key_value(env.client.names.workflows_bucket)
    doc = orjson.loads((await kv.get("order_processor")).value)
    assert doc["description"] == "charges and ships an order"


# --------------------------------------------------------------------------- queues

ACTIVE: dict[str, int] = {"now": 0, "max": 0}


async def _busy() -> None:
    ACTIVE["now"] += 1
    ACTIVE["max"] = max(ACTIVE["max"], ACTIVE["now"])
    await asyncio.sleep(0.15)
    ACTIVE["now"] -= 1


@workflow(id="q_dict", queue={"concurrency_limit": 2})
async def q_dict(ctx: WorkflowContext, n: int) -> int:
    await ctx.step.run("busy", _busy)
    return n


@workflow(id="q_obj", queue=queue("shared-api", concurrency_limit=1))
async def q_obj(ctx: WorkflowContext, n: int) -> int:
    return n


@workflow(id="q_name", queue="shared-api")
async def q_name(ctx: WorkflowContext, n: int) -> int:
    return -n


async def test_queue_as_dict_queue_and_name(env_factory: Any) -> None:
    env = await env_factory([q_dict, q_obj, q_name])
    assert q_dict.options["queue_def"] == Queue("q_dict", concurrency=2)
    assert Queue("x", concurrency_limit=4).concurrency == 4
    ACTIVE.update(now=0, max=0)
    handles = [await env.client.start(q_dict, i) for i in range(5)]
    assert [await h.result(timeout=30) for h in handles] == list(range(5))
    assert ACTIVE["max"] <= 2, ACTIVE  # the dict's limit held across the five runs
    assert ACTIVE["max"] >= 1
    one = await env.client.start(q_obj, 3)
    two = await env.client.start(q_name, 3)
    assert (await one.result(timeout=20), await two.result(timeout=20)) == (3, -3)
    kv = await env.client.js.key_value(env.client.names.queues_bucket)
    limits = {k: orjson.loads((await kv.get(k)).value) for k in await kv.keys()}
    assert any(v.get("name") == "q_dict" and v["concurrency"] == 2 for v in limits.values())
    assert any(v.get("name") == "shared-api" and v["concurrency"] == 1 for v in limits.values())


# --------------------------------------------------------------------------- schedules


@workflow(id="sched_dict", schedule={"cron": "* * * * * *", "timezone": "Europe/Paris"})
async def sched_dict(ctx: WorkflowContext, payload: SchedulePayload) -> dict[str, Any]:
    return {
        "timestamp": payload.timestamp.timestamp(),
        "last": payload.last_timestamp.timestamp() if payload.last_timestamp else None,
        "upcoming": payload.upcoming.timestamp() if payload.upcoming else None,
        "timezone": payload.timezone,
        "key": payload.key,
        "schedule_id": payload.schedule_id,
    }


@workflow(id="sched_every", schedule="@every 1s")
async def sched_every(ctx: WorkflowContext, payload: SchedulePayload) -> str:
    return payload.timezone


@workflow(id="sched_api", schedule=True)
async def sched_api(ctx: WorkflowContext, payload: SchedulePayload) -> str:
    return f"{payload.key}:{payload.timezone}"


async def test_schedule_dict_and_true_run_with_a_schedule_payload(env_factory: Any) -> None:
    env = await env_factory([sched_dict, sched_api, sched_every])
    assert sched_api.schedulable and sched_api.schedule is None
    # A registration the scheduler cannot use (a worker of another version): dead-lettered
    # with its reason; the watcher goes on scheduling the others.
    kv = await env.client.js.key_value(env.client.names.workflows_bucket)
    worker_nc = env.worker._nc  # as the worker role: workers register workflows
    wkv = await worker_nc.jetstream().key_value(env.client.names.workflows_bucket)
    await wkv.put("sched_bad", orjson.dumps({"name": "sched_bad", "schedule": 5}))
    await env.client.create_schedule("tenant-7", sched_api, "* * * * * *", timezone="Asia/Tokyo")
    runs = await _runs(env, "sched_dict", 2)
    outs = sorted(
        [await env.client.get_handle(r.run_id).result(timeout=10) for r in runs],
        key=lambda o: o["timestamp"],
    )
    first, second = outs[0], outs[1]
    assert first["timezone"] == "Europe/Paris" and first["key"] == "global"
    assert first["schedule_id"] == "wf-sched_dict"
    assert first["timestamp"] == int(first["timestamp"])  # the due second, not handling time
    assert first["upcoming"] > first["timestamp"]
    assert second["last"] is not None and second["last"] < second["timestamp"]
    api = await _runs(env, "sched_api", 1)
    assert await env.client.get_handle(api[0].run_id).result(timeout=10) == "tenant-7:Asia/Tokyo"
    letters = await env.client.dead_letters()
    assert any(d["source"] == "schedule" and "sched_bad" in d["reason"] for d in letters), letters
    assert "sched_bad" in [k for k in await kv.keys()]
    every = await _runs(env, "sched_every", 1)
    assert await env.client.get_handle(every[0].run_id).result(timeout=10) == "UTC"
    for key in ("wf-sched_dict", "tenant-7", "wf-sched_every"):
        await env.client.delete_schedule(key)


# --------------------------------------------------------------------------- event triggers


@workflow(id="on_order", trigger_on_event="orders.created")
async def on_order(ctx: WorkflowContext, event: EventPayload) -> dict[str, Any]:
    return {"type": event.event_type, "data": event.data, "seq": event.sequence_id}


@workflow(id="order_batch", trigger_on_event="orders.batched", batch_size=3)
async def order_batch(ctx: WorkflowContext, batch: BatchEventPayload) -> list[Any]:
    return [(e.sequence_id, e.event_type, e.data["n"]) for e in batch.events]


@workflow(
    id="order_window",
    trigger_on_event="orders.window",
    batch_size=50,
    batch_timeout_seconds=0.5,
)
async def order_window(ctx: WorkflowContext, batch: BatchEventPayload) -> list[int]:
    return [e.data["n"] for e in batch.events]


async def test_one_event_a_run_has_the_event_payload_shape(env_factory: Any) -> None:
    env = await env_factory([on_order])
    await asyncio.sleep(0.2)  # registered
    seq = await env.client.publish_event("orders.created", {"n": 1}, event_type="created")
    [run] = await _runs(env, "on_order", 1)
    out = await env.client.get_handle(run.run_id).result(timeout=10)
    assert out == {"type": "created", "data": {"n": 1}, "seq": seq}


async def test_batches_of_events_and_a_batch_timeout(env_factory: Any) -> None:
    env = await env_factory([order_batch, order_window])
    await asyncio.sleep(0.2)
    seqs = [
        await env.client.publish_event("orders.batched", {"n": i}, event_type="t") for i in range(7)
    ]
    runs = await _runs(env, "order_batch", 2)
    got = sorted([await env.client.get_handle(r.run_id).result(timeout=10) for r in runs])
    assert got == [
        [[seqs[i], "t", i] for i in range(3)],
        [[seqs[i], "t", i] for i in range(3, 6)],
    ]
    # The seventh waits for two more (no timeout): nothing else started.
    await asyncio.sleep(0.5)
    assert len(await env.client.list_runs(workflow="order_batch")) == 2
    for i in range(2):
        await env.client.publish_event("orders.window", {"n": i})
    [win] = await _runs(env, "order_window", 1)  # fired by its timeout, holding both
    assert await env.client.get_handle(win.run_id).result(timeout=10) == [0, 1]


@workflow(id="order_batch_k", trigger_on_event="orders.k", batch_size=4)
async def order_batch_k(ctx: WorkflowContext, batch: BatchEventPayload) -> list[int]:
    return [e.data["n"] for e in batch.events]


@workflow(id="batch_ping")
async def batch_ping(ctx: WorkflowContext) -> str:
    return "pong"


async def test_a_batch_survives_an_orchestrator_sigkill(
    settings: Any, subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    orch = spawn(ORCHESTRATOR, subprocess_env.as_role("service"), tmp_path / "o1.out")
    client = await PolosClient.connect(settings=settings)
    try:
        async with Worker([order_batch_k, batch_ping], settings=settings.worker):
            # A run round trip: the orchestrator is up and consuming (its events consumer too),
            # so the first event is not published before it (a fixed sleep was not enough on a
            # loaded machine).
            await (await client.start(batch_ping)).result(timeout=60)
            for i in range(3):
                await client.publish_event("orders.k", {"n": i})
            # The three are handled (the cursor was made), none started a run.
            await asyncio.sleep(1.0)
            kill(orch)
            await client.publish_event("orders.k", {"n": 3})  # while no orchestrator runs
            for i in range(4, 9):
                await client.publish_event("orders.k", {"n": i})
            orch = spawn(ORCHESTRATOR, subprocess_env.as_role("service"), tmp_path / "o2.out")
            deadline = time.monotonic() + 30
            while True:
                runs = await client.list_runs(workflow="order_batch_k")
                if len(runs) >= 2 and all(r.status == "completed" for r in runs):
                    break
                assert time.monotonic() < deadline, runs
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)
            runs = await client.list_runs(workflow="order_batch_k")
            outs = sorted([await client.get_handle(r.run_id).result(timeout=10) for r in runs])
            assert outs == [[0, 1, 2, 3], [4, 5, 6, 7]]  # each event once; the ninth waits
    finally:
        stop(orch)
        await client.close()


async def test_a_batch_timeout_survives_a_scheduler_restart(env_factory: Any) -> None:
    env = await env_factory([order_window])
    await asyncio.sleep(0.2)
    await env.scheduler.stop()  # the timer is held by the server, not by the scheduler
    await env.client.publish_event("orders.window", {"n": 7})
    await asyncio.sleep(1.0)
    assert await env.client.list_runs(workflow="order_window") == []
    env.scheduler = Scheduler(env.as_role("service"))
    await env.scheduler.start()
    [win] = await _runs(env, "order_window", 1)
    assert await env.client.get_handle(win.run_id).result(timeout=10) == [7]
