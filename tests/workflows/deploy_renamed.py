"""deploy_v1 with its first step renamed: runs in flight cannot replay it."""

from __future__ import annotations

from polos import WorkflowContext, workflow
from tests.workflows.deploy_v1 import deploy_slow, mark

__all__ = ["deploy_check", "deploy_slow"]


@workflow(name="deploy_check")
async def deploy_check(ctx: WorkflowContext, order: dict[str, int]) -> str:
    await ctx.step.run("reserve_stock", mark, "reserve")
    await ctx.step.run("charge", mark, "charge")
    await ctx.step.suspend("approval", data={"order": order["id"]})
    await ctx.step.run("ship", mark, "ship")
    return "shipped"
