"""Workflows for process-level crash tests. Each step function appends a line to
$POLOS_TEST_LOG each time it really starts and finishes, so a test can count executions
across processes that get SIGKILLed."""

from __future__ import annotations

import asyncio
import os

from pydantic import BaseModel

from polos import WorkflowContext, workflow


class Job(BaseModel):
    steps: int = 10
    step_seconds: float = 0.0
    pause_seconds: float = 0.0  # idle time between steps (not a step: plain code)


def _mark(text: str) -> None:
    with open(os.environ["POLOS_TEST_LOG"], "a") as f:
        f.write(text + "\n")
        f.flush()


async def marked_step(i: int, seconds: float) -> int:
    _mark(f"start {i}")
    if seconds:
        await asyncio.sleep(seconds)
    _mark(f"done {i}")
    return i * i


@workflow
async def marked(ctx: WorkflowContext, job: Job) -> int:
    total = 0
    for i in range(1, job.steps + 1):
        total += await ctx.step.run(f"s{i}", marked_step, i, job.step_seconds)
        if job.pause_seconds:
            await asyncio.sleep(job.pause_seconds)
    return total
