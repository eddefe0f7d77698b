"""Suspend/resume and external events, against a real nats-server: no worker held while
waiting, early resumes and early events kept, duplicates answered and ignored."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import orjson
import pytest

from polos import (
    CommandRejectedError,
    RunNotFoundError,
    WaitTimeoutError,
    WorkflowContext,
    workflow,
)
from polos._private.run import waits as wt
from polos._private.store.tokens import (
    event_subject,
    resume_subject,
    topic_from_subject,
    topic_tokens,
)
from polos._private.store.writes import requester
from tests.helpers import until

CALLS: dict[str, int] = {}


def _count(name: str) -> None:
    CALLS[name] = CALLS.get(name, 0) + 1


@workflow(name="w_approval")
async def w_approval(ctx: WorkflowContext, order: dict[str, Any]) -> dict[str, Any]:
    async def charge() -> str:
        _count(f"charge-{ctx.run_id}")
        return "ch_1"

    payment = await ctx.step.run("charge", charge)
    decision = await ctx.step.suspend(
        "approval", data={"id": order["id"], "amount": order["amount"]}
    )
    return {"payment": payment, "approved": decision.data["approved"]}


@workflow(name="w_timeout")
async def w_timeout(ctx: WorkflowContext) -> str:
    try:
        await ctx.step.suspend("review", data={"q": 1}, timeout=0.5)
    except WaitTimeoutError:
        return "timed out"
    return "resumed"


@workflow(name="w_pickup")
async def w_pickup(ctx: WorkflowContext, order_id: str) -> dict[str, Any]:
    got = await ctx.step.wait_for_event("pickup", topic=f"warehouse.pickup/{order_id}")
    return {"topic": got.topic, "data": got.data, "seq": got.seq}


@workflow(name="w_loop")
async def w_loop(ctx: WorkflowContext, n: int) -> list[Any]:
    out = []
    for i in range(n):
        got = await ctx.step.wait_for_event(f"e{i}", topic="ticks")
        out.append(got.data)
    return out


@workflow(name="w_event_timeout")
async def w_event_timeout(ctx: WorkflowContext) -> str:
    try:
        await ctx.step.wait_for_event("never", topic="nothing.here", timeout=0.3)
    except WaitTimeoutError as exc:
        return f"timeout {exc.kind}"
    return "event"


def test_topic_tokens_are_reversible() -> None:
    names = wt.Names("polos")
    for topic in ("warehouse.pickup/42", "a.b c.d*e>f", "ünï.cödé", "x=y.z"):
        subject = event_subject(names, topic)
        assert " " not in subject and "*" not in subject.split(".", 2)[2]
        assert topic_from_subject(names, subject) == topic
    assert event_subject(names, "warehouse.pickup/42") == "polos.event.warehouse.pickup=2F42"
    with pytest.raises(ValueError):
        topic_tokens("a..b")


async def test_suspend_holds_no_worker_and_resume_continues(env_factory: Any) -> None:
    env = await env_factory([w_approval])
    handle = await env.client.start(w_approval, {"id": "o1", "amount": 5000})
    await until_status(env, handle.run_id, "suspended")
    info = await env.client.get(handle.run_id)
    assert info.waiting and info.waiting["data"] == {"id": "o1", "amount": 5000}
    await until(lambda: not env.worker.active_runs, what="the worker to release the run")
    waiting = await env.client.waiting()
    assert [r.run_id for r in waiting] == [handle.run_id]
    assert waiting[0].waiting["data"]["amount"] == 5000

    t0 = time.perf_counter()
    answer = await env.client.resume(handle.run_id, "approval", {"approved": True})
    assert answer["status"] == "resumed"
    result = await handle.result(timeout=20)
    print(f"\nresume -> run completed: {(time.perf_counter() - t0) * 1000:.1f} ms")
    assert result == {"payment": "ch_1", "approved": True}
    assert CALLS[f"charge-{handle.run_id}"] == 1

    # A second resume of the same key: a clear answer, nothing changes.
    with pytest.raises(CommandRejectedError, match="already resumed"):
        await env.client.resume(handle.run_id, "approval", {"approved": False})
    assert (await handle.result(timeout=5))["approved"] is True


async def test_second_resume_while_suspended_is_rejected(env_factory: Any) -> None:
    env = await env_factory([w_approval], with_worker=False)
    handle = await env.client.start(w_approval, {"id": "o2", "amount": 1})
    # No worker yet: both resumes arrive before the suspend; the first is kept.
    first = await env.client.resume(handle.run_id, "approval", {"approved": True})
    assert first["status"] == "pending"
    with pytest.raises(CommandRejectedError, match="already pending"):
        await env.client.resume(handle.run_id, "approval", {"approved": False})
    from polos.worker import Worker

    async with Worker([w_approval], settings=env.as_role("worker")):
        result = await handle.result(timeout=20)
    assert result["approved"] is True  # the early (first) resume was applied


async def test_commands_share_one_inbox_and_each_gets_its_own_answer(env_factory: Any) -> None:
    env = await env_factory([w_approval])
    client = env.client
    handles = [
        await client.start(w_approval, {"id": f"s{i}", "amount": i}, run_id=f"share-{i}")
        for i in range(12)
    ]
    for h in handles:
        await until_status(env, h.run_id, "suspended")
    await client.resume(handles[0].run_id, "approval", {"approved": True})  # the inbox exists
    subs, made = len(client.nc._subs), client.nc._sid  # nats-py counts the SUBs it sent

    async def one(i: int) -> Any:
        run_id = handles[i].run_id
        try:
            if i == 0:
                return await client.resume(run_id, "approval", {"approved": False})
            if i < 6:
                return await client.resume(run_id, "approval", {"approved": i % 2 == 0})
            if i < 11:
                return await client.cancel(run_id, f"no {i}")
            return await client.resume("share-nobody", "approval", {"approved": True})
        except CommandRejectedError as exc:
            return exc

    # Twelve commands at once, each answered for its own run, on no subscription of its own.
    answers = await asyncio.gather(*(one(i) for i in range(12)))
    assert (len(client.nc._subs), client.nc._sid) == (subs, made)
    assert "already resumed" in str(answers[0])
    for i in range(1, 6):
        assert answers[i]["run_id"] == handles[i].run_id and answers[i]["status"] == "resumed"
        assert (await handles[i].result(timeout=20))["approved"] is (i % 2 == 0)
    for i in range(6, 11):
        assert answers[i]["run_id"] == handles[i].run_id and answers[i]["status"] == "cancelled"
    assert "no run 'share-nobody'" in str(answers[11])
    assert (await handles[0].result(timeout=20))["approved"] is True

    # No orchestrator: the command is stored, the wait ends with the reason, nothing is left.
    await env.orchestrator.stop()
    env.orchestrator = None
    with pytest.raises(TimeoutError, match=r"no orchestrator answered within 0\.3s"):
        await client.resume(handles[11].run_id, "approval", {"approved": True}, timeout=0.3)
    made = client.nc._sid
    with pytest.raises(TimeoutError, match=r"no orchestrator answered within 0\.3s"):
        await client.cancel(handles[11].run_id, timeout=0.3)
    assert requester(client.nc)._open == {}
    assert client.nc._sid == made


async def test_resume_errors_are_clear_and_dead_lettered(env_factory: Any) -> None:
    env = await env_factory([w_approval])
    with pytest.raises(CommandRejectedError, match="no run"):
        await env.client.resume("nope", "approval", {})
    handle = await env.client.start(w_approval, {"id": "o3", "amount": 1})
    await until_status(env, handle.run_id, "suspended")
    # A raw publish with a bad body: dead-lettered, the run unchanged.
    await env.client.js.publish(
        resume_subject(env.client.names, handle.run_id, "approval"), b'{"approved": true}'
    )
    await asyncio.sleep(0.3)
    assert (await env.client.get(handle.run_id)).status == "suspended"
    letters = await env.client.dead_letters()
    assert any("unknown field" in d["reason"] for d in letters)
    # A raw, well-formed resume works like the client's.
    await env.client.js.publish(
        resume_subject(env.client.names, handle.run_id, "approval"),
        orjson.dumps({"data": {"approved": False}}),
    )
    assert (await handle.result(timeout=20))["approved"] is False


async def until_status(env: Any, run_id: str, status: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(RunNotFoundError):
            if (await env.client.get(run_id)).status == status:
                return
        if time.monotonic() > deadline:
            raise AssertionError(f"run {run_id} never reached {status}")
        await asyncio.sleep(0.02)


async def test_suspend_timeout_raises_catchable_error(env_factory: Any) -> None:
    env = await env_factory([w_timeout])
    handle = await env.client.start(w_timeout)
    assert await handle.result(timeout=20) == "timed out"
    kinds = [type(e).__name__ for _, e in await env.client.history(handle.run_id)]
    assert "RunSuspended" in kinds and "RunWoken" in kinds


async def test_event_published_before_the_wait_is_not_lost(env_factory: Any) -> None:
    env = await env_factory([w_pickup], with_worker=False)
    handle = await env.client.start(w_pickup, "42")
    await until_status(env, handle.run_id, "queued")
    # Published after the run started, before any worker reached the wait.
    await env.client.publish_event("warehouse.pickup/42", {"by": "bob"})
    await env.client.publish_event("warehouse.pickup/43", {"by": "eve"})  # another order's
    from polos.worker import Worker

    async with Worker([w_pickup], settings=env.as_role("worker")):
        result = await handle.result(timeout=20)
    assert result["data"] == {"by": "bob"} and result["topic"] == "warehouse.pickup/42"


async def test_event_wakes_waiting_run_raw_publish(env_factory: Any) -> None:
    env = await env_factory([w_pickup])
    old = await env.client.publish_event("warehouse.pickup/7", {"stale": True})  # before the run
    handle = await env.client.start(w_pickup, "7")
    await until_status(env, handle.run_id, "suspended")
    subject = f"{env.settings.prefix}.event.warehouse.pickup=2F7"
    t0 = time.perf_counter()
    await env.client.js.publish(subject, orjson.dumps({"raw": 1}))
    result = await handle.result(timeout=20)
    print(f"\nevent publish -> run completed: {(time.perf_counter() - t0) * 1000:.1f} ms")
    assert result["data"] == {"raw": 1} and result["seq"] > old


async def test_wait_in_a_loop_gets_each_event_once_in_order(env_factory: Any) -> None:
    env = await env_factory([w_loop])
    handle = await env.client.start(w_loop, 5)
    await until_status(env, handle.run_id, "suspended")
    for i in range(5):  # a burst: most arrive while the run is between waits
        await env.client.publish_event("ticks", i)
    assert await handle.result(timeout=30) == [0, 1, 2, 3, 4]


async def test_event_wait_timeout(env_factory: Any) -> None:
    env = await env_factory([w_event_timeout])
    handle = await env.client.start(w_event_timeout)
    assert await handle.result(timeout=20) == "timeout event"


async def test_malformed_event_is_dead_lettered(env_factory: Any) -> None:
    env = await env_factory([w_pickup])
    handle = await env.client.start(w_pickup, "9")
    await until_status(env, handle.run_id, "suspended")
    subject = f"{env.settings.prefix}.event.warehouse.pickup=2F9"
    await env.client.js.publish(subject, b"{not json")
    await env.client.publish_event("warehouse.pickup/9", "ok")
    assert (await handle.result(timeout=20))["data"] == "ok"
    assert any(d["source"] == "event" for d in await env.client.dead_letters())


@workflow(name="w_triggered", trigger_on_event="orders.created")
async def w_triggered(ctx: WorkflowContext, event: dict[str, Any]) -> Any:
    return event["data"]


async def test_event_triggered_workflow_runs_once_per_event(env_factory: Any) -> None:
    env = await env_factory([w_triggered])
    await asyncio.sleep(0.2)  # the worker registered the workflow
    for i in range(3):
        await env.client.publish_event("orders.created", {"n": i})
    deadline = time.monotonic() + 20
    while True:
        runs = await env.client.list_runs(workflow="w_triggered")
        if len(runs) >= 3 and all(r.status == "completed" for r in runs):
            break
        assert time.monotonic() < deadline, runs
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    runs = await env.client.list_runs(workflow="w_triggered")
    assert len(runs) == 3
    outputs = sorted([(await env.client.get(r.run_id)).output["n"] for r in runs])
    assert outputs == [0, 1, 2]
    assert {(await env.client.history(r.run_id))[0][1].source for r in runs} == {"event"}


@workflow(name="w_gather")
async def w_gather(ctx: WorkflowContext) -> list[Any]:
    async def slow() -> str:
        _count(f"slow-{ctx.run_id}")
        await asyncio.sleep(0.3)
        return "slow done"

    async def wait() -> Any:
        return (await ctx.step.suspend("gate")).data

    return list(await asyncio.gather(ctx.step.run("slow", slow), wait()))


async def test_suspend_in_gather_lets_running_siblings_record_first(env_factory: Any) -> None:
    env = await env_factory([w_gather])
    handle = await env.client.start(w_gather)
    await until_status(env, handle.run_id, "suspended")
    kinds = [
        (type(e).__name__, getattr(e, "key", None))
        for _, e in await env.client.history(handle.run_id)
    ]
    assert kinds.index(("StepCompleted", "slow")) < kinds.index(("RunSuspended", None))
    await env.client.resume(handle.run_id, "gate", "open")
    assert await handle.result(timeout=20) == ["slow done", "open"]
    assert CALLS[f"slow-{handle.run_id}"] == 1  # the sibling's work was kept, not redone
