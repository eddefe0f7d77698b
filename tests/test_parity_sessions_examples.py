"""examples/chat.py and examples/research_team.py, served by a worker process (worker role,
under auth) as `polos worker examples.<name>` would, against the dev LLM served here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from examples.chat import chat_agent, converse
from examples.research_team import Brief, dev_team
from polos.agent import SharedMemory
from polos.devllm import LABEL, DevLLM
from polos.memory import get_session_memory
from tests.helpers import spawn, stop

pytestmark = pytest.mark.slow


async def test_the_chat_example_keeps_the_conversation(
    env_factory: Any, subprocess_env: Any, tmp_path: Path
) -> None:
    async with DevLLM() as llm:
        subprocess_env.update(OPENAI_BASE_URL=llm.url)
        env = await env_factory([], with_worker=False)
        w = spawn(
            ["-m", "polos_services.worker", "examples.chat"],
            subprocess_env.as_role("worker"),
            tmp_path / "w.out",
        )
        try:
            said = ["Hi, my name is Ada.", "I am planning a trip to Lisbon.", "What is my name?"]
            answers = await converse(env.client, "ada-1", said)
        finally:
            stop(w)
        requests = llm.chat_requests

    # The system message, the turns so far, the new message: 2, 4, 6 messages.
    assert answers == [f"{LABEL}: received {n} messages." for n in (2, 4, 6)]
    last = requests[-1].body["messages"]
    assert last[0] == {"role": "system", "content": chat_agent.instructions}
    assert [m["content"] for m in last[1:] if m["role"] == "user"] == said
    memory = await get_session_memory("ada-1", client=env.client)
    assert [m["content"] for m in memory.messages[::2]] == said
    assert memory.messages[1::2] == [{"role": "assistant", "content": a} for a in answers]


async def test_the_research_team_example_passes_work_through_shared_memory(
    env_factory: Any, subprocess_env: Any, tmp_path: Path
) -> None:
    async with DevLLM(responder=dev_team) as llm:
        subprocess_env.update(OPENAI_BASE_URL=llm.url)
        env = await env_factory([], with_worker=False)
        w = spawn(
            ["-m", "polos_services.worker", "examples.research_team"],
            subprocess_env.as_role("worker"),
            tmp_path / "w.out",
        )
        try:
            handle = await env.client.start("research_team", Brief(topic="durable execution"))
            article = await handle.result(timeout=60)
        finally:
            stop(w)

    facts = [f"fact {i} on durable execution" for i in (1, 2, 3)]
    memory = await SharedMemory(env.client.js, env.settings.prefix, handle.run_id).snapshot()
    # The three parallel appends all landed (compare-and-set), in some order.
    assert sorted(memory["facts"]) == facts
    assert memory["draft"] == "Draft: " + "; ".join(memory["facts"]) + "."
    assert memory["final"] == "; ".join(memory["facts"]) + "."
    # The editor's answer is the final text, built by the writer from the researcher's facts.
    assert article == {"topic": "durable execution", "text": memory["final"], "llm_calls": 8}
