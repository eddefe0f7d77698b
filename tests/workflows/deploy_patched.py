"""The same new step as deploy_added, behind ``ctx.patched``: runs in flight keep the old path,
so the deploy is safe."""

from __future__ import annotations

from polos import WorkflowContext, workflow
from tests.workflows.deploy_v1 import deploy_slow, mark

__all__ = ["deploy_check", "deploy_slow"]


@workflow(name="deploy_check")
async def deploy_check(ctx: WorkflowContext, order: dict[str, int]) -> str:
    await ctx.step.run("reserve", mark, "reserve")
    await ctx.step.run("charge", mark, "charge")
    if await ctx.patched("fraud-check"):
        await ctx.step.run("fraud_check", mark, "fraud_check")
    await ctx.step.suspend("approval", data={"order": order["id"]})
    await ctx.step.run("ship", mark, "ship")
    return "shipped"
