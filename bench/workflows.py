"""The workflows the benchmark runs. Importable by worker subprocesses
(``python -m polos_services.worker polos_bench.workflows``), so they live in a module of their own.

The step functions do nothing: every microsecond a benchmark sees is Polos's overhead.
"""

from __future__ import annotations

import time

from pydantic import BaseModel

from polos import WorkflowContext, workflow

# Wall-clock time (perf_counter) of each ctx.step.run call, filled by ``timed_steps`` when it
# runs in this process. Not durable and not part of any run: the benchmark reads it directly.
STEP_TIMES: list[float] = []


class Steps(BaseModel):
    steps: int = 10
    # Seconds each step sleeps: makes a run long enough to kill its worker in the middle.
    step_seconds: float = 0.0


async def noop() -> int:
    return 1


async def sleepy(seconds: float) -> float:
    import asyncio

    await asyncio.sleep(seconds)
    return time.time()


async def stamp() -> float:
    return time.time()


@workflow
async def bench_steps(ctx: WorkflowContext, job: Steps) -> int:
    """``job.steps`` no-op steps in a row: the standard throughput and latency workload."""
    total = 0
    for i in range(job.steps):
        one: int = await ctx.step.run(f"s{i}", noop)
        total += one
    return total


@workflow
async def bench_long(ctx: WorkflowContext, job: Steps) -> float:
    """``job.steps`` no-op steps, a suspend, then one step: the long history a resume replays.
    Returns the wall-clock time the step after the resume ran."""
    for i in range(job.steps):
        one: int = await ctx.step.run(f"s{i}", noop)
        assert one == 1
    await ctx.step.suspend("go")
    ran: float = await ctx.step.run("after", stamp)
    return ran


@workflow
async def timed_steps(ctx: WorkflowContext, job: Steps) -> int:
    """Like ``bench_steps`` but times every step call from inside the workflow."""
    total = 0
    for i in range(job.steps):
        t0 = time.perf_counter()
        one: int = await ctx.step.run(f"s{i}", noop)
        total += one
        if not ctx.is_replaying:
            STEP_TIMES.append(time.perf_counter() - t0)
    return total


@workflow
async def first_step(ctx: WorkflowContext) -> float:
    """One step that returns when (wall clock) it ran: start-to-first-step latency."""
    return await ctx.step.run("stamp", stamp)


@workflow
async def slow_steps(ctx: WorkflowContext, job: Steps) -> list[float]:
    """Steps that each take ``job.step_seconds``: a run long enough to crash a worker in."""
    out: list[float] = []
    for i in range(job.steps):
        at: float = await ctx.step.run(f"s{i}", sleepy, job.step_seconds)
        out.append(at)
    return out


@workflow
async def approval(ctx: WorkflowContext) -> float:
    """Suspends (no worker, no slot) until resumed; then one step stamps when it ran."""
    await ctx.step.suspend("approve")
    return await ctx.step.run("after", stamp)


@workflow
async def stamped_steps(ctx: WorkflowContext, job: Steps) -> list[float]:
    """The peers' workload (bench/peers/): ``job.steps`` steps, each returning when it ran."""
    out: list[float] = []
    for i in range(job.steps):
        at: float = await ctx.step.run(f"s{i}", stamp)
        out.append(at)
    return out
