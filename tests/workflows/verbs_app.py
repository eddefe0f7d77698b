"""A small app for the tests of the original's CLI verbs: workflows, an agent with a tool."""

from __future__ import annotations

from pydantic import BaseModel

from polos import NO_RETRY, Agent, WorkflowContext, tool, workflow
from polos.agent import agent_workflow  # agents run as runs of this workflow: serve it

__all__ = ["agent_workflow", "approve", "fails", "greet", "helper", "lookup"]


class Who(BaseModel):
    name: str


def hello(name: str) -> str:
    return f"hello {name}"


@workflow(name="greet")
async def greet(ctx: WorkflowContext, who: Who) -> str:
    """Greets someone, in one step."""
    return await ctx.step.run("hello", hello, who.name)


def boom() -> None:
    raise ValueError("no such order")


@workflow(name="fails")
async def fails(ctx: WorkflowContext) -> None:
    await ctx.step.run("boom", boom, retry=NO_RETRY)


@workflow(name="approve")
async def approve(ctx: WorkflowContext) -> str:
    await ctx.step.run("hello", hello, "reviewer")
    await ctx.step.suspend("approval", data={"question": "ship it?"})
    return "approved"


@tool
def lookup(order_id: str) -> str:
    """Look an order up by its id."""
    return f"order {order_id}: paid"


helper = Agent(
    "helper",
    model="gpt-4o-mini",
    tools=[lookup],
    instructions="You help with orders.",
)
