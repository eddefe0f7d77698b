"""A ten-step workflow whose steps leave a trace on disk, to show crash recovery.

Each step appends its name to ``$POLOS_DEMO_LOG`` (if set) when it actually executes, so a
reader can count executions per step across worker crashes. A replayed step writes nothing.
"""

from __future__ import annotations

import asyncio
import os

from pydantic import BaseModel

from polos import WorkflowContext, current_step, workflow


class Job(BaseModel):
    name: str
    steps: int = 10
    step_seconds: float = 0.0


def _mark(label: str) -> None:
    path = os.environ.get("POLOS_DEMO_LOG")
    if path:
        with open(path, "a") as f:
            f.write(f"{label}\n")


async def do_step(job: Job, i: int) -> str:
    info = current_step()
    _mark(f"start {i}")
    if job.step_seconds:
        await asyncio.sleep(job.step_seconds)
    _mark(f"done {i}")
    return f"{job.name}-{i}@{info.idempotency_key if info else '?'}"


@workflow
async def ten_steps(ctx: WorkflowContext, job: Job) -> list[str]:
    results = []
    for i in range(1, job.steps + 1):
        results.append(await ctx.step.run(f"step-{i}", do_step, job, i))
    return results
