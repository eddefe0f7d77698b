"""Versioning: changing a workflow's code while runs of it are suspended.

An incompatible change fails those runs with a clear NonDeterminismError; ``ctx.patched`` lets the
same change roll out safely (old runs keep the old path, new runs take the new one).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from polos import Worker, WorkflowContext, workflow
from polos.errors import RunNotFoundError, WorkflowFailedError

CHECKS: list[str] = []


def check(run_id: str) -> str:
    CHECKS.append(run_id)
    return "checked"


def one() -> int:
    return 1


@workflow(name="versioned")
async def v1(ctx: WorkflowContext) -> str:
    await ctx.step.run("a", one)
    await ctx.step.suspend("approval")
    await ctx.step.run("b", one)
    return "old"


@workflow(name="versioned")
async def v2_patched(ctx: WorkflowContext) -> str:
    await ctx.step.run("a", one)
    new = await ctx.patched("fraud-check")
    if new:
        await ctx.step.run("check", check, ctx.run_id)
    await ctx.step.suspend("approval")
    await ctx.step.run("b", one)
    assert await ctx.patched("fraud-check") is new  # the same id keeps its answer
    return "new" if new else "old"


@workflow(name="versioned")
async def v2_unpatched(ctx: WorkflowContext) -> str:
    await ctx.step.run("a", one)
    await ctx.step.run("check", check, ctx.run_id)
    await ctx.step.suspend("approval")
    await ctx.step.run("b", one)
    return "new"


async def _until_suspended(client: Any, run_id: str) -> None:
    for _ in range(500):
        try:
            if (await client.get(run_id)).status == "suspended":
                return
        except RunNotFoundError:
            pass  # the orchestrator has not recorded the start yet
        await asyncio.sleep(0.02)
    raise AssertionError(f"run {run_id} never suspended")


async def _suspend_one_on_v1(env: Any, settings: Any) -> str:
    async with Worker([v1], settings=settings.worker):
        handle = await env.client.start("versioned")
        await _until_suspended(env.client, handle.run_id)
    return handle.run_id


async def test_patched_lets_a_change_roll_out_while_runs_are_suspended(
    env_factory: Any, settings: Any
) -> None:
    CHECKS.clear()
    env = await env_factory([], with_worker=False)
    old_run = await _suspend_one_on_v1(env, settings)
    async with Worker([v2_patched], settings=settings.worker):
        new = await env.client.start("versioned")
        await _until_suspended(env.client, new.run_id)
        for run_id in (old_run, new.run_id):
            await env.client.resume(run_id, "approval", {"ok": True})
        assert await env.client.get_handle(old_run).result(timeout=15) == "old"
        assert await new.result(timeout=15) == "new"
    assert CHECKS == [new.run_id]  # the new step ran for the new run only, once
    kinds = [(e.key, e.kind) for _, e in await env.client.history(new.run_id) if hasattr(e, "key")]
    assert ("patch:fraud-check", "patch") in kinds
    assert not any(
        k == "patch:fraud-check"
        for k, _ in [
            (e.key, e.kind) for _, e in await env.client.history(old_run) if hasattr(e, "key")
        ]
    )


async def test_incompatible_change_fails_suspended_runs_with_a_clear_error(
    env_factory: Any, settings: Any
) -> None:
    CHECKS.clear()
    env = await env_factory([], with_worker=False)
    old_run = await _suspend_one_on_v1(env, settings)
    async with Worker([v2_unpatched], settings=settings.worker):
        await env.client.resume(old_run, "approval", {"ok": True})
        with pytest.raises(WorkflowFailedError) as info:
            await env.client.get_handle(old_run).result(timeout=15)
    assert info.value.error_type == "NonDeterminismError"
    message = info.value.error["message"]
    assert "'check'" in message and "'approval'" in message, message
    assert CHECKS == []  # the new step never ran against the old history
