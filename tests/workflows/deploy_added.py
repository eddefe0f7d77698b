"""deploy_v1 with a new step before the approval, without ``ctx.patched``: unsafe."""

from __future__ import annotations

from polos import WorkflowContext, workflow
from tests.workflows.deploy_v1 import deploy_slow, mark

__all__ = ["deploy_check", "deploy_slow"]


@workflow(name="deploy_check")
async def deploy_check(ctx: WorkflowContext, order: dict[str, int]) -> str:
    await ctx.step.run("reserve", mark, "reserve")
    await ctx.step.run("charge", mark, "charge")
    await ctx.step.run("fraud_check", mark, "fraud_check")
    await ctx.step.suspend("approval", data={"order": order["id"]})
    await ctx.step.run("ship", mark, "ship")
    return "shipped"
