"""A long run for the replay-snapshot tests: ``steps`` marked steps, a suspend, one more step.
Each step function appends to $POLOS_TEST_LOG when it really starts and finishes (as in
``tests.workflows.marked``), so a test counts executions across processes."""

from __future__ import annotations

from pydantic import BaseModel

from polos import WorkflowContext, workflow
from tests.workflows.marked import marked_step


class Long(BaseModel):
    steps: int = 60
    step_seconds: float = 0.0
    suspend: bool = True


@workflow
async def long_run(ctx: WorkflowContext, job: Long) -> int:
    total = 0
    for i in range(1, job.steps + 1):
        total += await ctx.step.run(f"s{i}", marked_step, i, job.step_seconds)
    if job.suspend:
        resumed = await ctx.step.suspend("approve")
        total += int(resumed.data["add"])
        total += await ctx.step.run("after", marked_step, 0, 0.0)
    return total
