"""Workflows for the chaos suite. Every step function appends ``start|done|fail <run>/<step>`` to
$POLOS_TEST_LOG each time it really runs, so the test can count executions across processes
that get SIGKILLed."""

from __future__ import annotations

import asyncio
import os
import time

from pydantic import BaseModel

from polos import RetryPolicy, WorkflowContext, workflow
from polos._private.run.execution import current_step


class ChaosJob(BaseModel):
    steps: int = 3
    step_seconds: float = 0.02
    flaky: bool = False
    suspend: bool = False
    event: bool = False
    sleep: float = 0.0
    child: bool = False


def _mark(text: str) -> None:
    # "<what> <run>/<step> <pid> <time>": the test matches re-runs to the kills that caused them.
    with open(os.environ["POLOS_TEST_LOG"], "a") as f:
        f.write(f"{text} {os.getpid()} {time.time():.6f}\n")


async def work(key: str, seconds: float) -> int:
    _mark(f"start {key}")
    await asyncio.sleep(seconds)
    _mark(f"done {key}")
    return 1


def flaky(key: str) -> int:
    info = current_step()
    _mark(f"start {key}")
    if info is not None and info.attempt == 1:
        _mark(f"fail {key}")
        raise RuntimeError("the first attempt always fails")
    _mark(f"done {key}")
    return 1


@workflow
async def chaos_child(ctx: WorkflowContext, n: int) -> int:
    return await ctx.step.run("c", work, f"{ctx.run_id}/c", 0.01) + n


@workflow
async def chaos_mix(ctx: WorkflowContext, job: ChaosJob) -> int:
    total = 0
    for i in range(job.steps):
        total += await ctx.step.run(f"s{i}", work, f"{ctx.run_id}/s{i}", job.step_seconds)
    if job.flaky:
        total += await ctx.step.run(
            "flaky",
            flaky,
            f"{ctx.run_id}/flaky",
            retry=RetryPolicy(max_attempts=5, initial_interval=0.05),
        )
    if job.suspend:
        resumed = await ctx.step.suspend("approval")
        total += int(resumed.data["add"])
    if job.event:
        got = await ctx.step.wait_for_event("ev", topic=f"chaos.{ctx.run_id}")
        total += int(got.data["add"])
    if job.sleep:
        await ctx.step.sleep("nap", job.sleep)
        total += 1
    if job.child:
        total += await ctx.step.invoke_and_wait("kid", chaos_child, 1)
    return total


def expected(job: ChaosJob) -> int:
    return (
        job.steps
        + int(job.flaky)
        + int(job.suspend)
        + int(job.event)
        + int(bool(job.sleep))
        + 2 * int(job.child)
    )
