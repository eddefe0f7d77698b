"""The code runs were started on, for the ``polos check-deploy`` tests: each step marks
$POLOS_TEST_LOG, so a test sees that a dry replay runs none of them."""

from __future__ import annotations

import asyncio
import os

from polos import WorkflowContext, workflow


def mark(text: str) -> str:
    with open(os.environ["POLOS_TEST_LOG"], "a") as f:
        f.write(text + "\n")
    return text


async def slow(seconds: float) -> str:
    mark("slow start")
    await asyncio.sleep(seconds)
    return mark("slow done")


@workflow(name="deploy_check")
async def deploy_check(ctx: WorkflowContext, order: dict[str, int]) -> str:
    await ctx.step.run("reserve", mark, "reserve")
    await ctx.step.run("charge", mark, "charge")
    await ctx.step.suspend("approval", data={"order": order["id"]})
    await ctx.step.run("ship", mark, "ship")
    return "shipped"


@workflow(name="deploy_slow")
async def deploy_slow(ctx: WorkflowContext, seconds: float) -> str:
    await ctx.step.run("prepare", mark, "prepare")
    return await ctx.step.run("slow", slow, seconds)
