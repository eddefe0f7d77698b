"""Workflows re-walked over a recorded history by ``tests/test_rewalk.py``: the steps a replay
from a snapshot must find exactly as a replay from the log does (duplicate keys, a gather, a key
used again after the loop), and variants of the same code that changed."""

from __future__ import annotations

import asyncio

from pydantic import BaseModel

from polos import WorkflowContext, workflow


class Walk(BaseModel):
    steps: int = 5
    change: str = ""  # "", "name" (s2 another function), "skip" (no s2), "extra" (one more step)


async def one() -> int:
    return 1


async def two() -> int:
    return 2


@workflow
async def rewalked(ctx: WorkflowContext, job: Walk) -> int:
    total = 0
    for i in range(job.steps):
        if job.change == "skip" and i == 2:
            continue
        fn = two if job.change == "name" and i == 2 else one
        total += await ctx.step.run(f"s{i}", fn)
    total += await ctx.step.run("d", one)
    total += await ctx.step.run("d", two)  # its second use: recorded as d#2
    a, b = await asyncio.gather(ctx.step.run("g1", one), ctx.step.run("g2", two))
    total += await ctx.step.run("s0", one)  # a key of the loop again: s0#2
    if job.change == "extra":
        total += await ctx.step.run("new", one)
    return total + a + b
