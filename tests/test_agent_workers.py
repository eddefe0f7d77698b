"""Workflows and tools for the agent crash tests, loaded by worker subprocesses
(``python -m polos_services.worker tests.test_agent_workers``). No tests here.

Each tool call appends ``start <i>`` / ``done <i>`` to $POLOS_TEST_LOG, so a test can count real
executions across SIGKILLed processes. The agent talks to the dev LLM at $POLOS_DEVLLM_URL.
"""

from __future__ import annotations

import os

from pydantic import BaseModel

from polos import WorkflowContext, workflow
from polos.agent import Agent, agent_workflow  # noqa: F401 - served as a workflow too


def _mark(text: str) -> None:
    with open(os.environ["POLOS_TEST_LOG"], "a") as f:
        f.write(text + "\n")


def work(i: int) -> dict[str, int]:
    """Do unit of work number i (a side effect that must not repeat).

    Args:
        i: which unit
    """
    _mark(f"start {i}")
    _mark(f"done {i}")
    return {"unit": i, "square": i * i}


crash_agent = Agent(
    "crash_agent",
    model="gpt-4o-mini",
    instructions="Do the units of work one by one.",
    tools=[work],
    base_url=os.environ.get("POLOS_DEVLLM_URL", "http://127.0.0.1:9/v1"),
    max_steps=50,
    timeout=60,
)


class CrashJob(BaseModel):
    units: int
    inline: bool = False  # the loop in the parent's history instead of a child run


@workflow
async def agent_crash(ctx: WorkflowContext, job: CrashJob) -> dict[str, object]:
    r = await ctx.step.agent_invoke_and_wait(
        "loop", crash_agent.with_input(f"Do {job.units} units."), inline=job.inline
    )
    return {
        "text": r.result,
        "llm_calls": r.usage.llm_calls,
        "tool_calls": r.usage.tool_calls,
        "run_id": r.run_id,
    }
