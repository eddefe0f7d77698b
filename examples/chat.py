"""A chat agent with a session: every turn sees the conversation so far.

    python -m examples.chat

Each message is one run of the ``chat`` workflow. The agent is given ``session_id``, so before
its first LLM call it loads the session's earlier turns (a durable step) and puts them before
the new message, and after its answer it records the turn (another durable step). When the
history passes ``max_conversation_tokens``, the oldest turns are folded into a summary by an
LLM call, itself a durable step.

With ``OPENAI_API_KEY`` set the agent talks to OpenAI. Without it, this script starts the
**Polos dev LLM** (polos/devllm.py), a scripted server that is *not a model*: it answers
"received N messages", so you see the history grow turn by turn.

A worker serving this module: ``polos worker examples.chat``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from typing import Any

from pydantic import BaseModel

from polos import WorkflowContext, workflow
from polos.agent import Agent, agent_workflow  # agents run as child runs of this workflow
from polos.memory.types import CompactionConfig

chat_agent = Agent(
    "chat",
    model="gpt-4o-mini",
    instructions="You are a friendly assistant. Keep answers short.",
    # Fold the oldest turns into a summary past ~4000 tokens; keep the last turn verbatim.
    compaction=CompactionConfig(max_conversation_tokens=4000, min_recent_messages=2),
)


class ChatTurn(BaseModel):
    session_id: str
    message: str


@workflow
async def chat(ctx: WorkflowContext, turn: ChatTurn) -> str:
    reply = await ctx.step.agent_invoke_and_wait(
        "reply", chat_agent.with_input(turn.message, session_id=turn.session_id)
    )
    return str(reply.result)


async def converse(client: Any, session_id: str, messages: list[str]) -> list[str]:
    """Send the messages one turn at a time; the answers, in order."""
    answers = []
    for text in messages:
        handle = await client.start(chat, ChatTurn(session_id=session_id, message=text))
        answers.append(await handle.result(timeout=120))
    return answers


async def main() -> None:
    from polos.devllm import LABEL, DevLLM
    from polos.memory import get_session_memory
    from polos.testing import EmbeddedServer, PolosEnvironment, fast_settings

    devllm = None
    if not os.environ.get("OPENAI_API_KEY") and not os.environ.get("OPENAI_BASE_URL"):
        devllm = await DevLLM().start()
        os.environ["OPENAI_BASE_URL"] = devllm.url
        print(f"OPENAI_API_KEY is not set: using the {LABEL} at {devllm.url}")
    with tempfile.TemporaryDirectory() as tmp, EmbeddedServer(tmp, port=0) as server:
        async with PolosEnvironment(
            fast_settings(server.url, prefix="example"), [chat, agent_workflow]
        ) as env:
            said = ["Hi, my name is Ada.", "I am planning a trip to Lisbon.", "What is my name?"]
            for text, answer in zip(said, await converse(env.client, "ada-1", said), strict=True):
                print(f"you:   {text}\nagent: {answer}")
            memory = await get_session_memory("ada-1", client=env.client)
            print(
                f"session ada-1 keeps {len(memory.messages)} messages, summary={memory.summary!r}"
            )
    if devllm is not None:
        with contextlib.suppress(Exception):
            await devllm.stop()


if __name__ == "__main__":
    asyncio.run(main())
