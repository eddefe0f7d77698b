"""polos.memory, the session store and compaction in your own code (docs/agents.md, "Sessions
and memory"): the original's functions and types, a repeated record that writes nothing twice,
documents too large for one message, and clear errors. Connections are the worker role's
(agents write sessions) or the client's (which reads them)."""

from __future__ import annotations

from typing import Any

import pytest

from polos._private.agents.sessions import (
    SessionStore,
    answered_calls,
    fold_point,
    open_session,
    session_key,
    to_chat,
    to_stored,
)
from polos._private.agents.steps import StepRunner
from polos._private.store import connect, disconnect
from polos.agent import Agent
from polos.client import PolosClient
from polos.devllm import DevLLM, Reply
from polos.memory import (
    COMPACTION_PROMPT,
    SUMMARY_ASSISTANT_ACK,
    SUMMARY_USER_PREFIX,
    build_summary_messages,
    compact_if_needed,
    estimate_message_tokens,
    estimate_messages_tokens,
    estimate_tokens,
    get_session_memory,
    is_summary_pair,
    put_session_memory,
)
from polos.memory.types import CompactionConfig, NormalizedCompactionConfig

TOOL_TURN = [
    {"role": "user", "content": "weather?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "w", "arguments": '{"a":1}'}},
            {"id": "c2", "type": "function", "function": {"name": "w", "arguments": '{"a":2}'}},
        ],
    },
    {"role": "tool", "tool_call_id": "c1", "content": '{"sky":"clear"}'},
    {"role": "tool", "tool_call_id": "c2", "content": '{"sky":"rain"}'},
    {"role": "assistant", "content": "Clear, then rain."},
]


def test_the_summary_pair_and_token_estimates_are_the_originals() -> None:
    pair = build_summary_messages("Ada likes tea.")
    assert pair == [
        {"role": "user", "content": "[Prior conversation summary]\nAda likes tea."},
        {"role": "assistant", "content": SUMMARY_ASSISTANT_ACK},
    ]
    assert SUMMARY_USER_PREFIX == "[Prior conversation summary]\n"
    assert is_summary_pair([*pair, {"role": "user", "content": "hi"}], 0)
    assert not is_summary_pair(pair, 1)
    assert not is_summary_pair([pair[1], pair[0]], 0)
    assert "{existing_summary}" in COMPACTION_PROMPT and "{messages_to_fold}" in COMPACTION_PROMPT
    assert estimate_tokens("abcde") == 2  # ceil(len / 4)
    assert estimate_message_tokens({"role": "user", "content": "abcd"}) == 1
    # Unlike the original, tool calls and outputs count (a tool-heavy history is not empty).
    call = {"type": "function_call", "name": "w", "call_id": "c", "arguments": '{"a":1}'}
    assert estimate_message_tokens(call) > 0
    assert estimate_messages_tokens(TOOL_TURN) > estimate_messages_tokens(TOOL_TURN[::4])
    assert NormalizedCompactionConfig(
        max_conversation_tokens=1, max_summary_tokens=1, min_recent_messages=0, enabled=True
    )


def test_stored_form_round_trips_and_a_fold_never_splits_a_tool_call() -> None:
    stored = to_stored(TOOL_TURN)
    assert [m.get("type") or m["role"] for m in stored] == [
        "user",
        "function_call",
        "function_call",
        "function_call_output",
        "function_call_output",
        "assistant",
    ]
    assert to_chat(stored) == TOOL_TURN
    first = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    last = [{"role": "user", "content": "ok"}, {"role": "assistant", "content": "bye"}]
    three = to_stored(first) + stored + to_stored(last)
    # Keeping 4 recent messages would start at a tool output: the cut moves back to the user
    # message that began that turn.
    assert fold_point(three, 0, 4) == 2
    assert fold_point(three, 0, 3) == 2
    assert fold_point(three, 0, 2) == 8
    assert fold_point(three, 0, 9) == 0  # nothing to fold
    assert fold_point(three, 0, 0) == len(three)
    # A call that never ran (a turn stopped by max_tokens) is not kept: no provider takes it.
    unanswered = to_stored(TOOL_TURN[:3])
    assert [m.get("call_id") for m in answered_calls(unanswered)] == [None, "c1", "c1"]
    with pytest.raises(ValueError, match="no known role"):
        to_stored([{"content": "no role"}])


def test_bad_configuration_and_session_ids_fail_clearly() -> None:
    with pytest.raises(ValueError, match="max_conversation_tokens and max_summary_tokens"):
        Agent("bad_budget", compaction=CompactionConfig(max_conversation_tokens=0))
    with pytest.raises(ValueError, match="min_recent_messages must be 0 or more"):
        Agent("bad_recent", compaction=CompactionConfig(min_recent_messages=-1))
    assert session_key("user-42") == "user-42"
    # Any string is a session id; those that are not key tokens are hashed, never shared.
    odd = session_key("ada@example.com/chat 1")
    assert odd.startswith("=") and odd != session_key("ada@example.com/chat 2")
    assert session_key("=x") != "=x"
    with pytest.raises(ValueError, match="non-empty string"):
        session_key("")


async def test_an_agent_run_with_a_session_needs_nats() -> None:
    from polos.agent import AgentConfigError

    a = Agent("no_nats", base_url="http://127.0.0.1:9/v1")
    with pytest.raises(AgentConfigError, match="a session_id needs a NATS connection"):
        await a.run("hi", session_id="s1")


async def test_compact_if_needed_folds_old_turns_into_the_summary_pair() -> None:
    seen: list[str] = []

    def responder(body: dict[str, Any]) -> Reply:
        prompt = body["messages"][-1]["content"]
        seen.append(prompt)
        assert "tools" not in body and "response_format" not in body
        return Reply.text("Ada asked about the weather twice.")

    async with DevLLM(responder=responder) as llm:
        writer = Agent("summariser", base_url=llm.url)
        messages = (
            build_summary_messages("Ada is a user.")
            + TOOL_TURN
            + [
                {"role": "user", "content": "and tomorrow?"},
                {"role": "assistant", "content": "Sun."},
            ]
        )
        small = CompactionConfig(max_conversation_tokens=10, min_recent_messages=2)
        out = await compact_if_needed(messages, None, small, None, writer)
        under = await compact_if_needed(messages, None, CompactionConfig(), None, writer)

    assert out.compacted and out.summary == "Ada asked about the weather twice."
    assert out.messages == [
        *build_summary_messages("Ada asked about the weather twice."),
        {"role": "user", "content": "and tomorrow?"},
        {"role": "assistant", "content": "Sun."},
    ]
    [prompt] = seen
    assert "Existing summary (if any):\nAda is a user." in prompt
    assert 'assistant called w({"a":1})' in prompt and 'tool: {"sky":"rain"}' in prompt
    assert "and tomorrow" not in prompt
    assert not under.compacted and under.messages == messages


async def test_a_repeated_record_writes_the_turn_once(settings: Any) -> None:
    """The record step repeated after a crash between its write and its event (same run, same
    key) finds its turn id in the session and writes nothing."""
    worker = settings.as_role("worker")
    nc = await connect(worker, name="test-sessions")
    try:
        js = nc.jetstream()
        agent = Agent("recorder", base_url="http://127.0.0.1:9/v1")
        runner = StepRunner(nc, worker.prefix, js)
        convo = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
        for _ in range(2):
            session = await open_session(runner, "k", agent, "rec-1")
            await session.record(session.history + convo)
        doc, _ = await SessionStore(js, worker.prefix).read("rec-1")
        assert doc.turns == 1 and doc.messages == convo
        other = StepRunner(nc, worker.prefix, js)  # another run: a turn of its own
        session = await open_session(other, "k", agent, "rec-1")
        assert session.history == convo
        await session.record([*session.history, *convo])
        doc, _ = await SessionStore(js, worker.prefix).read("rec-1")
        assert doc.turns == 2 and doc.messages == convo + convo
    finally:
        await disconnect(nc)


async def test_put_then_a_turn_sees_the_summary_and_large_sessions_move_out(
    settings: Any,
) -> None:
    """put_session_memory (worker role) sets a session; the next turn (Agent.run with a
    session and settings) gets its summary pair and messages first; a session too large for
    one message is kept in the payloads store and reads back whole."""
    worker = settings.as_role("worker")
    requests: list[Any] = []
    async with DevLLM(responder=lambda body: requests.append(body) or Reply.text("hi Ada")) as llm:
        await put_session_memory(
            "put-1",
            "The user is Ada.",
            [{"role": "user", "content": "I like tea"}, {"role": "assistant", "content": "Noted."}],
            settings=worker,
        )
        a = Agent("put_reader", base_url=llm.url)
        result = await a.run("hello", session_id="put-1", settings=worker)
    assert result.text == "hi Ada"
    assert requests[0]["messages"] == [
        *build_summary_messages("The user is Ada."),
        {"role": "user", "content": "I like tea"},
        {"role": "assistant", "content": "Noted."},
        {"role": "user", "content": "hello"},
    ]
    client = await PolosClient.connect(settings=settings)  # the client role reads sessions
    try:
        memory = await get_session_memory("put-1", client=client)
        assert memory.summary == "The user is Ada." and len(memory.messages) == 4
        big = "y" * 1_500_000
        await put_session_memory(
            "put-big", None, [{"role": "user", "content": big}], settings=worker
        )
        memory = await get_session_memory("put-big", client=client)
        assert memory.messages == [{"role": "user", "content": big}]
        assert (await get_session_memory("never-used", client=client)).messages == []
    finally:
        await client.close()


def test_the_docs_snippets_of_sessions_and_memory_run(tmp_path: Any) -> None:
    """The code blocks of docs/agents.md "Sessions and memory": the definitions import and
    define their agents and workflows (in a process of their own: agent names are global);
    the block of awaits is valid inside a coroutine."""
    import ast
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    text = (root / "docs" / "agents.md").read_text()
    section = text[text.index("## Sessions and memory") : text.index("## Streaming")]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 3
    defs = [b for b in blocks if "await " not in b.split("async def", 1)[0]]
    awaits = [b for b in blocks if b not in defs]
    assert len(defs) == 2 and len(awaits) == 1
    ast.parse("async def _():\n" + "".join(f"    {ln}\n" for ln in awaits[0].splitlines()))
    script = tmp_path / "snippets.py"
    script.write_text(
        "\n\n".join(defs)
        + "\nfrom polos.agent import get_agent\n"
        + "for name in ('assistant', 'researcher', 'writer', 'editor'):\n"
        + "    get_agent(name)\n"
        + "assert assistant.compaction.max_conversation_tokens == 4000\n"
        + "print('ok', assistant_turn.name, research_team.name)\n"
    )
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, cwd=root, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok assistant_turn research_team"
