"""Sessions: an agent's conversation across runs, kept in JetStream (docs/agents.md, "Sessions
and memory"). Every test runs the agents in real worker processes as the worker role, under
auth, against the dev LLM served here; the client only starts runs and reads sessions."""

from __future__ import annotations

import asyncio
import collections
import re
from pathlib import Path
from typing import Any

import pytest

from polos import history as ev
from polos.agent import AgentRequest, agent_workflow
from polos.devllm import DevLLM, LoggedRequest, Reply
from polos.memory import (
    SUMMARY_ASSISTANT_ACK,
    SUMMARY_USER_PREFIX,
    get_session_memory,
)
from polos.memory.types import SessionMemory
from tests.helpers import counts, kill, spawn, stop

pytestmark = pytest.mark.slow

WORKER = ["-m", "polos_services.worker", "tests.test_parity_sessions_workers"]
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}


def chat_reply(body: dict[str, Any]) -> Reply:
    """A model that remembers only what the request carries: names said earlier, the weather."""
    messages = body["messages"]
    last = messages[-1]
    if last.get("role") == "tool":
        return Reply.text(f"It is {eval_json(last['content'])['sky']} there.")
    text = str(last.get("content") or "")
    if m := re.match(r"My name is (\w+)", text):
        return Reply.text(f"Nice to meet you, {m.group(1)}.")
    if "weather" in text and body.get("tools"):
        return Reply.tools(("get_weather", {"city": "Paris"}))
    if text.startswith("What is my name"):
        said = [
            m.group(1)
            for msg in messages
            if msg.get("role") == "user"
            and (m := re.search(r"My name is (\w+)", str(msg.get("content"))))
        ]
        return Reply.text(f"Your name is {said[-1]}." if said else "I do not know your name.")
    return Reply.text(f"You said: {text}")


def eval_json(text: str) -> Any:
    import orjson

    return orjson.loads(text)


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": text}


def answered_steps(requests: list[LoggedRequest]) -> collections.Counter[str]:
    return collections.Counter(str(r.step) for r in requests if r.answered)


async def turn(env: Any, session: str, text: str, agent: str = "session_chat") -> dict[str, Any]:
    """One turn as a run of the agent itself (``polos_agent``), as a client starts it."""
    req = AgentRequest(agent=agent, input=text, session_id=session, key="chat")
    out: dict[str, Any] = await (await env.client.start(agent_workflow, req)).result(timeout=60)
    return out


# --------------------------------------------------------------------------- turn 2 sees turn 1


async def test_turn_two_sees_turn_one_and_the_session_keeps_both(
    env_factory: Any, subprocess_env: Any, tmp_path: Path
) -> None:
    async with DevLLM(responder=chat_reply) as llm:
        subprocess_env.update(POLOS_DEVLLM_URL=llm.url)
        env = await env_factory([], with_worker=False)
        w = spawn(WORKER, subprocess_env.as_role("worker"), tmp_path / "w.out")
        try:
            first = await turn(env, "chat-1", "My name is Ada")
            second = await turn(env, "chat-1", "What is my name?")
            other = await turn(env, "chat-2", "What is my name?")
        finally:
            stop(w)
        requests = llm.chat_requests

    assert first["result"] == "Nice to meet you, Ada."
    assert second["result"] == "Your name is Ada."  # the model saw turn 1
    assert other["result"] == "I do not know your name."  # another session sees nothing
    # The second request carries turn 1's messages before the new input.
    assert requests[1].body["messages"] == [
        SYSTEM,
        user("My name is Ada"),
        assistant("Nice to meet you, Ada."),
        user("What is my name?"),
    ]
    assert requests[2].body["messages"] == [SYSTEM, user("What is my name?")]
    memory = await get_session_memory("chat-1", client=env.client)
    assert memory == SessionMemory(
        summary=None,
        messages=[
            user("My name is Ada"),
            assistant("Nice to meet you, Ada."),
            user("What is my name?"),
            assistant("Your name is Ada."),
        ],
    )
    # Load and record are durable steps of the agent run.
    history = await env.client.history(second["run_id"])
    keys = [e.key for _, e in history if isinstance(e, ev.StepCompleted)]
    assert keys == ["chat/session/load", "chat/llm/1", "chat/stopped", "chat/session/record"]


async def test_tool_calls_come_back_exactly_as_the_model_made_them(
    env_factory: Any, subprocess_env: Any, tmp_path: Path
) -> None:
    """A turn with a tool call is stored in the provider-independent form and comes back in
    the next turn exactly as the loop sent it: the assistant's tool call, then its output."""
    async with DevLLM(responder=chat_reply) as llm:
        subprocess_env.update(POLOS_DEVLLM_URL=llm.url)
        env = await env_factory([], with_worker=False)
        w = spawn(WORKER, subprocess_env.as_role("worker"), tmp_path / "w.out")
        try:
            await turn(env, "tools-1", "How is the weather?")
            await turn(env, "tools-1", "Thanks")
        finally:
            stop(w)
        requests = llm.chat_requests

    assert len(requests) == 3
    turn_one = requests[1].body["messages"] + [assistant("It is clear there.")]
    assert requests[2].body["messages"] == [*turn_one, user("Thanks")]
    memory = await get_session_memory("tools-1", client=env.client)
    kinds = [m.get("type") or m["role"] for m in memory.messages]
    assert kinds == [
        "user",
        "function_call",
        "function_call_output",
        "assistant",
        "user",
        "assistant",
    ]
    call, output = memory.messages[1], memory.messages[2]
    assert call["name"] == "get_weather" and call["call_id"] == output["call_id"]
    assert eval_json(call["arguments"]) == {"city": "Paris"}


async def test_a_session_spans_child_run_and_inline_turns(
    env_factory: Any, subprocess_env: Any, tmp_path: Path
) -> None:
    """The session belongs to the conversation, not to how the agent runs: a turn as a child
    run of a workflow, then one inline in a workflow's own history, then one as a run of its
    own all see the turns before them."""
    async with DevLLM(responder=chat_reply) as llm:
        subprocess_env.update(POLOS_DEVLLM_URL=llm.url)
        env = await env_factory([], with_worker=False)
        w = spawn(WORKER, subprocess_env.as_role("worker"), tmp_path / "w.out")
        try:
            child = {"session_id": "mixed", "text": "My name is Di"}
            inline = {"session_id": "mixed", "text": "What is my name?", "inline": True}
            first = await (await env.client.start("chat_turn", child)).result(timeout=60)
            handle = await env.client.start("chat_turn", inline)
            second = await handle.result(timeout=60)
            third = await turn(env, "mixed", "What is my name?")
        finally:
            stop(w)

    assert first["text"] == "Nice to meet you, Di."
    assert second["text"] == third["result"] == "Your name is Di."
    assert second["run_id"] == handle.run_id  # inline: the steps are in the workflow's history
    history = await env.client.history(handle.run_id)
    keys = [e.key for _, e in history if isinstance(e, ev.StepCompleted)]
    assert keys == ["chat/session/load", "chat/llm/1", "chat/stopped", "chat/session/record"]
    memory = await get_session_memory("mixed", client=env.client)
    assert len(memory.messages) == 6


# --------------------------------------------------------------------------- concurrency


async def test_two_concurrent_turns_of_one_session_both_land(
    env_factory: Any, subprocess_env: Any, tmp_path: Path
) -> None:
    """Both turns load the same history (the dev LLM holds each answer until both asked), so
    both write on the same revision: compare-and-set makes the later one re-read and append."""
    both = asyncio.Event()
    asked = 0

    async def responder(body: dict[str, Any]) -> Reply:
        nonlocal asked
        if body["messages"][-1]["content"].startswith("concurrent"):
            asked += 1
            if asked == 2:
                both.set()
            await asyncio.wait_for(both.wait(), 30)
        return chat_reply(body)

    async with DevLLM(responder=responder) as llm:
        subprocess_env.update(POLOS_DEVLLM_URL=llm.url)
        env = await env_factory([], with_worker=False)
        w = spawn(WORKER, subprocess_env.as_role("worker"), tmp_path / "w.out")
        try:
            await turn(env, "busy", "My name is Bo")
            a, b = await asyncio.gather(
                turn(env, "busy", "concurrent A"), turn(env, "busy", "concurrent B")
            )
        finally:
            stop(w)
        requests = llm.chat_requests

    # Each concurrent turn saw turn 1 and not the other.
    for r in requests[1:]:
        assert r.body["messages"][:3] == [
            SYSTEM,
            user("My name is Bo"),
            assistant("Nice to meet you, Bo."),
        ]
        assert len(r.body["messages"]) == 4
    memory = await get_session_memory("busy", client=env.client)
    msgs = memory.messages
    assert msgs[:2] == [user("My name is Bo"), assistant("Nice to meet you, Bo.")]
    # Both later turns are there, each whole, one after the other.
    later = [msgs[2:4], msgs[4:6]]
    assert sorted(later, key=lambda t: str(t[0]["content"])) == [
        [user("concurrent A"), assistant("You said: concurrent A")],
        [user("concurrent B"), assistant("You said: concurrent B")],
    ]
    assert len(msgs) == 6
    records = []
    for run in (a["run_id"], b["run_id"]):
        hist = await env.client.history(run)
        records += [
            e.output
            for _, e in hist
            if isinstance(e, ev.StepCompleted) and e.key.endswith("record")
        ]
    assert sorted(r["turns"] for r in records) == [2, 3]


# --------------------------------------------------------------------------- crashes


async def test_sigkill_mid_turn_leaves_the_history_as_without_the_crash(
    env_factory: Any, subprocess_env: Any, tmp_path: Path
) -> None:
    """Turn 2 (a tool call, then the answer) loses its worker while its second LLM call is in
    flight; another worker finishes it. The session holds each turn once, exactly as a run
    without the crash leaves it, the tool ran once, and no answered LLM call was asked again."""
    held = asyncio.Event()
    never = asyncio.Event()
    holds = 0

    async def responder(body: dict[str, Any]) -> Reply:
        nonlocal holds
        if body["messages"][-1].get("role") == "tool" and holds == 0:
            holds += 1
            held.set()
            await never.wait()  # the worker dies waiting for this answer
        return chat_reply(body)

    log = tmp_path / "marks.log"
    async with DevLLM(responder=responder) as llm:
        subprocess_env.update(POLOS_DEVLLM_URL=llm.url, POLOS_TEST_LOG=str(log))
        env = await env_factory([], with_worker=False)
        w1 = spawn(WORKER, subprocess_env.as_role("worker"), tmp_path / "w1.out")
        w2 = None
        try:
            await turn(env, "crash-1", "My name is Cy")
            req = {"session_id": "crash-1", "text": "How is the weather?"}
            handle = await env.client.start("chat_turn", req)
            await asyncio.wait_for(held.wait(), 30)
            kill(w1)
            w2 = spawn(WORKER, subprocess_env.as_role("worker"), tmp_path / "w2.out")
            out = await handle.result(timeout=60)
            third = await turn(env, "crash-1", "What is my name?")
        finally:
            never.set()
            stop(w1)
            if w2:
                stop(w2)
        requests = llm.chat_requests

    assert out["text"] == "It is clear there."
    assert third["result"] == "Your name is Cy."
    started, done = counts(log)
    assert started == {"Paris": 1} and done == {"Paris": 1}
    answered = answered_steps(requests)
    assert all(n == 1 for n in answered.values()), answered
    unanswered = [r for r in requests if not r.answered]
    assert len(unanswered) == 1
    memory = await get_session_memory("crash-1", client=env.client)
    kinds = [m.get("type") or m["role"] for m in memory.messages]
    assert kinds == [
        "user",
        "assistant",
        "user",
        "function_call",
        "function_call_output",
        "assistant",
        "user",
        "assistant",
    ]
    assert [m.get("content") for m in memory.messages if m.get("role") == "user"] == [
        "My name is Cy",
        "How is the weather?",
        "What is my name?",
    ]
    # Turn 3 saw turns 1 and 2 whole, once each.
    assert requests[-1].body["messages"][:-1] == [
        *[r for r in requests if r.answered][-2].body["messages"],
        assistant("It is clear there."),
    ]


LONG = "x" * 120  # each message ~30 tokens: two turns pass the 40-token budget


async def test_sigkill_during_compaction_repeats_no_completed_summary_call(
    env_factory: Any, subprocess_env: Any, tmp_path: Path
) -> None:
    """Turn 3 passes the budget: the fold call summarises turn 1, its summary is too long so
    the resummarize call shortens it, and the worker dies while that call is in flight. The
    next worker asks the resummarize call again (it was never answered) but not the fold call,
    and the session is the summary pair's summary plus turns 2 and 3."""
    held = asyncio.Event()
    never = asyncio.Event()
    holds = 0

    async def responder(body: dict[str, Any]) -> Reply:
        nonlocal holds
        prompt = str(body["messages"][-1]["content"])
        if prompt.startswith("You are summarizing"):
            if "needs to be shortened" in prompt:
                if holds == 0:
                    holds += 1
                    held.set()
                    await never.wait()
                return Reply.text("Ada, long x.")
            assert "user: turn one " + LONG in prompt and "turn two" not in prompt
            return Reply.text("The user is Ada and sent a long line of x; " + "more " * 20)
        return Reply.text("ok " + prompt[:8])

    async with DevLLM(responder=responder) as llm:
        subprocess_env.update(POLOS_DEVLLM_URL=llm.url)
        env = await env_factory([], with_worker=False)
        w1 = spawn(WORKER, subprocess_env.as_role("worker"), tmp_path / "w1.out")
        w2 = None
        try:
            await turn(env, "long", "turn one " + LONG, agent="session_compact")
            await turn(env, "long", "turn two " + LONG, agent="session_compact")
            req = {"session_id": "long", "text": "turn three", "agent": "session_compact"}
            handle = await env.client.start("chat_turn", req)
            await asyncio.wait_for(held.wait(), 30)
            kill(w1)
            w2 = spawn(WORKER, subprocess_env.as_role("worker"), tmp_path / "w2.out")
            await handle.result(timeout=60)
        finally:
            never.set()
            stop(w1)
            if w2:
                stop(w2)
        requests = llm.chat_requests

    answered = answered_steps(requests)
    assert all(n == 1 for n in answered.values()), answered
    agent_run = f"{handle.run_id}"
    fold = [k for k in answered if k.endswith("session/compact")]
    again = [k for k in answered if k.endswith("session/compact/resummarize")]
    assert len(fold) == 1 and len(again) == 1, answered
    unanswered = [str(r.step) for r in requests if not r.answered]
    assert len(unanswered) == 1 and unanswered[0].endswith("session/compact/resummarize")
    # Turn 3's request: the short summary pair, turn 2 verbatim, the new input.
    main = [r for r in requests if r.answered and str(r.step).endswith("chat/llm/1")][-1]
    assert main.body["messages"] == [
        SYSTEM,
        user(SUMMARY_USER_PREFIX + "Ada, long x."),
        assistant(SUMMARY_ASSISTANT_ACK),
        user("turn two " + LONG),
        assistant("ok turn two"),
        user("turn three"),
    ]
    memory = await get_session_memory("long", client=env.client)
    assert memory.summary == "Ada, long x."
    assert memory.messages == [
        user("turn two " + LONG),
        assistant("ok turn two"),
        user("turn three"),
        assistant("ok turn thr"),
    ]
    assert agent_run
