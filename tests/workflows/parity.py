"""Workflows for the parity tests that need a worker process to SIGKILL: ``on_start`` /
``on_end`` hooks and ``state_schema`` state. Each hook and step appends a line to
$POLOS_TEST_LOG each time it really runs, so a test counts executions across processes."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from pydantic import Field

from polos import HookContext, HookResult, WorkflowContext, WorkflowState, hook, workflow


def _mark(text: str) -> None:
    with open(os.environ["POLOS_TEST_LOG"], "a") as f:
        f.write(text + "\n")
        f.flush()


class Tally(WorkflowState):
    count: int = 0
    items: list[int] = Field(default_factory=list)
    first_pid: int | None = None


@hook
def audit_start(ctx: WorkflowContext, hc: HookContext) -> HookResult:
    _mark("hook on_start")
    return HookResult.continue_with(modified_payload={"tag": f"seen:{hc.current_payload['tag']}"})


@hook
async def audit_end(ctx: WorkflowContext, hc: HookContext) -> HookResult:
    _mark("hook on_end")
    return HookResult.continue_with(modified_output={**hc.current_output, "audited": True})


async def slow_step(i: int, seconds: float) -> int:
    _mark(f"start {i}")
    await asyncio.sleep(seconds)
    _mark(f"done {i}")
    return i


@workflow(id="p_stateful", on_start=audit_start, on_end=[audit_end], state_schema=Tally)
async def p_stateful(ctx: WorkflowContext, job: dict[str, Any]) -> dict[str, Any]:
    if ctx.state.first_pid is None:
        # Not deterministic on purpose: replay must restore it from the history, not redo it.
        ctx.state.first_pid = os.getpid()
    for i in range(1, int(job["steps"]) + 1):
        ctx.state.count += 1
        ctx.state.items = [*ctx.state.items, i]
        await ctx.step.run(f"s{i}", slow_step, i, float(job.get("seconds", 0.0)))
    return {
        "tag": job["tag"],
        "count": ctx.state.count,
        "items": ctx.state.items,
        "first_pid": ctx.state.first_pid,
        "retry_count": ctx.retry_count,
    }
