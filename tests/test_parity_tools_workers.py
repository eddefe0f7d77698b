"""Workflows and tools for the parity tools tests, loaded by worker subprocesses
(``python -m polos_services.worker tests.test_parity_tools_workers``). No tests here.

``log_work`` appends ``start <unit>`` / ``done <unit>`` to $POLOS_TEST_LOG, so a test counts real
executions across a SIGKILLed worker. The agent talks to the dev LLM at $POLOS_DEVLLM_URL.
"""

from __future__ import annotations

import os

from pydantic import BaseModel, Field

from polos import WorkflowContext, tool, workflow
from polos.agent import Agent, agent_workflow  # noqa: F401 - served as a workflow too
from polos.tools import create_ask_user_tool


def _mark(text: str) -> None:
    with open(os.environ["POLOS_TEST_LOG"], "a") as f:
        f.write(text + "\n")


class WorkInput(BaseModel):
    unit: int = Field(description="Which unit of work")


class WorkOutput(BaseModel):
    unit: int
    square: int


@tool(description="Do one unit of work (a side effect that must not repeat).")
async def log_work(ctx: WorkflowContext, input: WorkInput) -> WorkOutput:
    def side_effect() -> int:
        _mark(f"start {input.unit}")
        _mark(f"done {input.unit}")
        return input.unit * input.unit

    square = await ctx.step.run("side_effect", side_effect)
    return WorkOutput(unit=input.unit, square=square)


asker = Agent(
    "parity_asker",
    model="gpt-4o-mini",
    instructions="Do the work, ask the user what you need.",
    tools=[log_work, create_ask_user_tool()],
    base_url=os.environ.get("POLOS_DEVLLM_URL", "http://127.0.0.1:9/v1"),
    timeout=60,
)


@workflow
async def parity_ask(ctx: WorkflowContext, text: str) -> dict[str, object]:
    r = await ctx.step.agent_invoke_and_wait("ask", asker.with_input(text))
    return {"text": r.result, "tool_calls": r.usage.tool_calls, "run_id": r.run_id}
