"""Agents and workflows for the session tests, loaded by worker subprocesses
(``python -m polos_services.worker tests.test_parity_sessions_workers``). No tests here.

The agents talk to the dev LLM at $POLOS_DEVLLM_URL; each tool call appends ``start <city>`` /
``done <city>`` to $POLOS_TEST_LOG, so a test counts real executions across a SIGKILL.
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import BaseModel

from polos import WorkflowContext, workflow
from polos.agent import Agent, agent_workflow  # noqa: F401 - served as a workflow too
from polos.memory.types import CompactionConfig

URL = os.environ.get("POLOS_DEVLLM_URL", "http://127.0.0.1:9/v1")


def get_weather(city: str) -> dict[str, Any]:
    """The weather in a city.

    Args:
        city: the city's name
    """
    log = os.environ.get("POLOS_TEST_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"start {city}\ndone {city}\n")
    return {"city": city, "sky": "clear", "celsius": 21}


session_chat = Agent(
    "session_chat",
    model="gpt-4o-mini",
    instructions="You are a helpful assistant.",
    tools=[get_weather],
    base_url=URL,
    timeout=60,
)

# A budget of 40 tokens (about 160 characters): the third turn compacts the first.
session_compact = Agent(
    "session_compact",
    model="gpt-4o-mini",
    instructions="You are a helpful assistant.",
    base_url=URL,
    timeout=60,
    compaction=CompactionConfig(
        max_conversation_tokens=40, max_summary_tokens=8, min_recent_messages=2
    ),
)

AGENTS = {a.name: a for a in (session_chat, session_compact)}


class Turn(BaseModel):
    session_id: str
    text: str
    agent: str = "session_chat"
    inline: bool = False


@workflow
async def chat_turn(ctx: WorkflowContext, turn: Turn) -> dict[str, Any]:
    r = await ctx.step.agent_invoke_and_wait(
        "chat",
        AGENTS[turn.agent].with_input(turn.text, session_id=turn.session_id),
        inline=turn.inline,
    )
    return {"text": r.result, "run_id": r.run_id, "llm_calls": r.usage.llm_calls}
