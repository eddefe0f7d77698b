"""Cancellation against a real nats-server: a running step interrupted, a suspended run,
a parent with children, timers cleared, clear answers for unknown and finished runs."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import pytest

from polos import CommandRejectedError, WorkflowCancelledError, WorkflowContext, workflow
from polos import history as ev
from polos._private.run import waits as wt
from polos._private.store import connect, read_subject
from polos.testing import PolosEnvironment as Stack
from tests.helpers import until
from tests.test_waiting import until_status

STARTED: set[str] = set()
FINISHED: set[str] = set()


@workflow(name="k_long")
async def k_long(ctx: WorkflowContext) -> str:
    async def long_step() -> str:
        STARTED.add(ctx.run_id)
        await asyncio.sleep(30)
        FINISHED.add(ctx.run_id)
        return "done"

    return await ctx.step.run("long", long_step)


@workflow(name="k_sleeper")
async def k_sleeper(ctx: WorkflowContext) -> str:
    await ctx.step.sleep("nap", 60)
    return "woke"


@workflow(name="k_parent")
async def k_parent(ctx: WorkflowContext) -> list[str]:
    return await ctx.step.batch_invoke_and_wait("kids", [(k_sleeper, None), (k_long, None)])


async def test_cancel_interrupts_a_running_step(env_factory: Any) -> None:
    env = await env_factory([k_long])
    handle = await env.client.start(k_long)
    await until(lambda: handle.run_id in STARTED, what="the step to start")
    t0 = time.perf_counter()
    answer = await env.client.cancel(handle.run_id, reason="user asked")
    assert answer["status"] == "cancelled"
    with pytest.raises(WorkflowCancelledError):
        await handle.result(timeout=10)
    await until(lambda: handle.run_id not in env.worker.active_runs, 10, "the worker to let go")
    print(f"\ncancel -> worker released the run: {(time.perf_counter() - t0) * 1000:.1f} ms")
    assert handle.run_id not in FINISHED
    kinds = [type(e).__name__ for _, e in await env.client.history(handle.run_id)]
    assert kinds[-1] == "RunCancelled" and "StepCompleted" not in kinds


async def test_cancel_suspended_run_clears_its_timer(env_factory: Any) -> None:
    env = await env_factory([k_sleeper])
    handle = await env.client.start(k_sleeper)
    await until_status(env, handle.run_id, "suspended")
    names = env.client.names
    pending_filter = f"{names.prefix}.timer.at.{handle.run_id}.>"

    async def pending() -> int:
        return len(await read_subject(env.client.nc, names.timers_stream, pending_filter))

    deadline = time.monotonic() + 10
    while not await pending():  # the orchestrator arms the 60 s timer
        assert time.monotonic() < deadline, "no timer armed"
        await asyncio.sleep(0.05)
    await env.client.cancel(handle.run_id)
    with pytest.raises(WorkflowCancelledError):
        await handle.result(timeout=10)
    deadline = time.monotonic() + 10
    while await pending():
        assert time.monotonic() < deadline, "the cancelled run's timer was not cleared"
        await asyncio.sleep(0.05)


async def test_cancelled_parent_cancels_children(env_factory: Any) -> None:
    env = await env_factory([k_parent, k_sleeper, k_long])
    handle = await env.client.start(k_parent)
    await until_status(env, handle.run_id, "suspended")
    children = (await env.client.get(handle.run_id)).waiting
    history = await env.client.history(handle.run_id)
    kids = next(e.children for _, e in history if type(e).__name__ == "RunSuspended")
    assert children and len(kids) == 2
    for kid in kids:
        await until_status(env, kid, "suspended" if kid == kids[0] else "running")
    await env.client.cancel(handle.run_id)
    for kid in kids:
        await until_status(env, kid, "cancelled")
    with pytest.raises(WorkflowCancelledError):
        await handle.result(timeout=10)
    assert kids[1] not in FINISHED


async def test_cancel_unknown_or_finished_run_is_answered(env_factory: Any) -> None:
    env = await env_factory([k_sleeper])
    with pytest.raises(CommandRejectedError, match="no run"):
        await env.client.cancel("ghost")
    handle = await env.client.start(k_sleeper)
    await until_status(env, handle.run_id, "suspended")
    await env.client.cancel(handle.run_id)
    with pytest.raises(CommandRejectedError, match="already cancelled"):
        await env.client.cancel(handle.run_id)
    with pytest.raises(CommandRejectedError, match="cancelled"):
        await env.client.resume(handle.run_id, "nap", {})


# --------------------------------------------------------------------------- the cascade's window
#
# A parent's worker publishes a child's request before it records the step that names the child
# (so a crash in between replays to the same child). A cancel landing in between fences that
# record out: the parent's history never names the child. These tests put the child request
# exactly there, with the SDK's own request (``waiting.child_request``) sent on the worker's user.


@workflow(name="k_holder")
async def k_holder(ctx: WorkflowContext) -> str:
    await ctx.step.suspend("hold")
    return "released"


async def _request_child(stack: Stack, parent_run_id: str) -> str:
    """What the parent's worker sends when its code reaches ``invoke("spawn", k_sleeper)``."""
    req = wt.child_request(
        stack.client.names, parent_run_id, parent_run_id, "spawn", 0, "k_sleeper", None
    )
    nc = await connect(stack.as_role("worker"), name="parent-worker")
    try:
        await nc.jetstream().publish(req.subject, req.body, headers=req.headers)
    finally:
        await nc.close()
    return req.run_id


async def _types(stack: Stack, run_id: str) -> list[str]:
    return [type(e).__name__ for _, e in await stack.client.history(run_id)]


async def test_cancel_reaches_a_child_requested_but_not_recorded(stack: Stack) -> None:
    await stack.add_worker([k_holder, k_sleeper])
    parent = await stack.client.start(k_holder)
    await until_status(stack, parent.run_id, "suspended")
    child = await _request_child(stack, parent.run_id)
    await until_status(stack, child, "suspended")  # the child exists and runs (it sleeps)
    await stack.client.cancel(parent.run_id)
    await until_status(stack, child, "cancelled")
    # The parent's history never named the child: the cancel found its stored request.
    assert not any(
        isinstance(e, ev.StepCompleted) and e.kind == "invoke"
        for _, e in await stack.client.history(parent.run_id)
    )
    reasons = [
        e.reason for _, e in await stack.client.history(child) if isinstance(e, ev.RunCancelled)
    ]
    assert reasons == [f"parent run {parent.run_id} was cancelled"]


async def test_child_requested_after_its_parent_was_cancelled_never_runs(stack: Stack) -> None:
    await stack.add_worker([k_holder, k_sleeper])
    parent = await stack.client.start(k_holder)
    await until_status(stack, parent.run_id, "suspended")
    await stack.client.cancel(parent.run_id)
    await until_status(stack, parent.run_id, "cancelled")
    # The worker read the history before the cancel and sends the request after it.
    child = await _request_child(stack, parent.run_id)
    await until_status(stack, child, "cancelled")
    # Created cancelled: its task was never put out, no worker claimed it.
    assert await _types(stack, child) == ["RunRequested", "RunCancelled"]


async def test_child_request_and_parent_cancel_held_back_together(stack: Stack) -> None:
    """Both stored while no orchestrator runs, then handled concurrently in either order."""
    await stack.add_worker([k_holder, k_sleeper])
    parent = await stack.client.start(k_holder)
    await until_status(stack, parent.run_id, "suspended")
    await stack.orchestrator.stop()
    child = await _request_child(stack, parent.run_id)
    await stack.client.js.publish(
        stack.client.names.cancel_subject(parent.run_id), orjson.dumps({"reason": "stop"})
    )
    from polos_services.orchestrator import Orchestrator

    stack.orchestrator = Orchestrator(stack.as_role("service"))
    await stack.orchestrator.start()
    await until_status(stack, parent.run_id, "cancelled")
    await until_status(stack, child, "cancelled")
    assert (await _types(stack, child))[-1] == "RunCancelled"
