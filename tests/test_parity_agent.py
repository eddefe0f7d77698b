"""Agents written as in the original Polos SDK (``Agent(id=..., system_prompt=...,
output_schema=..., stop_conditions=[max_steps(...)], guardrails=..., on_start=...)``), run
with ``agent.run(polos, input)`` / ``agent.stream(polos, input)`` through a real worker
process under auth, against the fake OpenAI server (polos.devllm) over the real openai client.
A worker SIGKILLed mid-agent repeats no completed LLM call, hook, guardrail or tool."""

from __future__ import annotations

import asyncio
import collections
from pathlib import Path
from typing import Any

import orjson
import pytest

from polos import (
    HookContext,
    HookResult,
    MaxStepsConfig,
    StopConditionContext,
    hook,
    max_steps,
    stop_condition,
)
from polos import history as ev
from polos.agent import Agent, AgentConfigError, AgentRequest, agent_workflow
from polos.devllm import DevLLM, Reply, default_reply
from polos.errors import WorkflowFailedError
from polos.middleware import GuardrailResult, guardrail
from polos.types import AgentResult
from tests import test_parity_agent_workers as agents
from tests.helpers import kill, marks, spawn, stop

pytestmark = pytest.mark.slow

WORKER = ["-m", "polos_services.worker", "tests.test_parity_agent_workers"]


def _who(body: dict[str, Any]) -> str:
    fmt = (body.get("response_format") or {}).get("json_schema") or {}
    if fmt.get("name") == "GuardrailEvaluationResult":
        return "judge"
    first = (body.get("messages") or [{}])[0]
    return str(first.get("content") or "").split(":")[0]


def _retries(body: dict[str, Any]) -> int:
    return sum(
        1
        for m in body["messages"]
        if m.get("role") == "user" and "failed guardrail validation" in str(m.get("content"))
    )


class Script:
    """The fake LLM's answers, per agent (its system prompt names it)."""

    def __init__(self) -> None:
        self.held = asyncio.Event()
        self.release = asyncio.Event()
        self.hold_retry = False

    async def __call__(self, body: dict[str, Any]) -> Reply:
        who = _who(body)
        tools_done = sum(1 for m in body["messages"] if m.get("role") == "tool")
        if who == "judge":
            said = body["messages"][0]["content"]
            return Reply.json({"passed": "rude" not in said, "reason": "the answer is rude"})
        if who == "double_guarded":
            return Reply.text(
                ["this is forbidden", "you are rude", "a polite secret answer"][_retries(body)]
            )
        if who == "stubborn":
            return Reply.text("forbidden again")
        if who == "tool_limited" and tools_done == 0:
            return Reply.tools(("audit", {"note": "a"}), ("lookup", {"sku": "b"}))
        if who == "judged_tools" and tools_done == 0:
            return Reply(content="let me look that up", tool_calls=[("lookup", {"sku": "j"})])
        if who == "capped":
            return Reply.tools(("lookup", {"sku": f"s{tools_done}"}))
        if who == "custom_stop":
            return Reply.tools(("audit", {"note": f"n{tools_done}"}))
        if who == "crash_guarded" and tools_done:
            if _retries(body) == 0:
                return Reply.text("forbidden first answer")
            if self.hold_retry:
                self.hold_retry = False
                self.held.set()
                await self.release.wait()  # the worker dies while waiting for this answer
            return Reply.text("an acceptable answer")
        return default_reply(body)


@pytest.fixture
async def stack(env_factory: Any, subprocess_env: Any, tmp_path: Path) -> Any:
    script = Script()
    log = tmp_path / "marks.log"
    async with DevLLM(responder=script) as llm:
        subprocess_env.update(POLOS_TEST_LOG=str(log), POLOS_DEVLLM_URL=llm.url)
        env = await env_factory([], with_worker=False)
        procs = [spawn(WORKER, subprocess_env.as_role("worker"), tmp_path / "w1.out")]

        def respawn() -> None:
            kill(procs[-1])
            procs.append(
                spawn(WORKER, subprocess_env.as_role("worker"), tmp_path / f"w{len(procs)}.out")
            )

        try:
            yield env, llm, script, log, respawn
        finally:
            script.release.set()
            for p in procs:
                stop(p)


def _count(log: Path) -> collections.Counter[str]:
    return collections.Counter(marks(log))


async def _steps(env: Any, run_id: str) -> list[ev.StepCompleted]:
    return [e for _, e in await env.client.history(run_id) if isinstance(e, ev.StepCompleted)]


async def test_original_options_and_hooks_through_a_worker(stack: Any) -> None:
    env, llm, _, log, _ = stack
    r = await agents.hooked.run(env.client, "How many of A1?")
    # output_schema, and on_end's modified_output replacing the result.
    assert isinstance(r.result, agents.Answer) and r.result.stock == 101
    assert r.agent_run_id == r.run_id and r.agent_run_id
    assert r.total_steps == 2 and r.stop_reason == "completed"
    assert r.usage.input_tokens > 0 and r.usage.output_tokens > 0
    [tr] = r.tool_results
    assert (tr.tool_name, tr.status) == ("lookup", "completed")
    assert tr.result == {"sku": "FORCED", "stock": 3, "annotated": True}
    first, second = llm.chat_requests
    body = first.body
    # system_prompt, temperature, max_output_tokens, and on_start's rewritten input.
    assert body["messages"][0] == {"role": "system", "content": "hooked: you check stock."}
    assert body["messages"][1]["content"] == "How many of A1? (checked)"
    assert body["temperature"] == 0.1 and body["max_tokens"] == 300
    assert body["model"] == "gpt-4o-mini"
    # on_tool_start's modified_payload reached the tool, on_tool_end's output the model.
    tool_msg = next(m for m in second.body["messages"] if m.get("role") == "tool")
    assert orjson.loads(tool_msg["content"])["annotated"] is True
    assert _count(log) == {
        "hook on_start": 1,
        "hook step_start 1": 1,
        "hook on_tool_start lookup": 1,
        "tool lookup FORCED": 1,
        "hook on_tool_end lookup": 1,
        "hook step_end 1": 1,
        "hook step_start 2": 1,
        "hook step_end 2": 1,
        "hook on_end": 1,
    }
    keys = [s.key for s in await _steps(env, r.run_id)]
    assert "agent/on_start.rewrite_input.0" in keys and "agent/on_end.bump_stock.0" in keys
    assert "agent/tool/1/lookup/on_tool_start.force_sku.0" in keys


async def test_stop_conditions_end_the_run_and_the_reason_is_recorded(stack: Any) -> None:
    env, llm, _, log, _ = stack
    r = await agents.until_lookup.run(env.client, "check")
    assert r.stop_reason == "executed_tool" and r.total_steps == 1
    assert len(llm.chat_requests) == 1  # stopped right after the tool step: no second call
    stopped = [s for s in await _steps(env, r.run_id) if s.key == "agent/stopped"]
    assert [s.output for s in stopped] == [
        {"stop_reason": "executed_tool", "total_steps": 1, "message": None}
    ]

    r = await agents.capped.run(env.client, "loop")
    assert r.stop_reason == "max_steps" and r.total_steps == 2 and r.usage.llm_calls == 2

    r = await agents.custom_stop.run(env.client, "audit")
    assert r.stop_reason == "audited_twice" and r.total_steps == 2
    # A custom condition is a durable step, evaluated once per step that called tools.
    assert _count(log)["stop check 1"] == 1 and _count(log)["stop check 2"] == 1
    keys = [s.key for s in await _steps(env, r.run_id)]
    assert "agent/step/2/stop_condition.audited_twice.0" in keys


async def test_guardrail_retries_are_new_requests_and_strings_are_judged(stack: Any) -> None:
    env, llm, _, log, _ = stack
    r = await agents.double_guarded.run(env.client, "hello")
    assert r.result == "a polite [x] answer"  # passed both, redacted by the callable
    steps = [(q.step or "").split(":", 1)[1] for q in llm.chat_requests]
    assert steps == [
        "agent/llm/1",  # "this is forbidden": the callable fails it
        "agent/llm/1/retry/1",  # "you are rude": the callable passes, the judge fails it
        "agent/llm/1/guardrail/1/judge.1",
        "agent/llm/1/retry/2",  # passes both
        "agent/llm/1/guardrail/2/judge.1",
    ]
    # Each retry is a new request carrying the reason, never the recorded answer again.
    retry = llm.chat_requests[1].body["messages"]
    assert retry[-1]["content"].startswith(
        "Previous attempt failed guardrail validation: do not say forbidden."
    )
    assert "the answer is rude" in llm.chat_requests[3].body["messages"][-1]["content"]
    assert _count(log)["guard this is forbidden"] == 1

    with pytest.raises(WorkflowFailedError, match="guardrail failed after 1 retries"):
        await agents.stubborn.run(env.client, "hi")
    assert sum(1 for q in llm.chat_requests if "stubborn" in str(q.body["messages"][0])) == 2

    # A tool-call guardrail keeps the first call only: the second never runs.
    r = await agents.tool_limited.run(env.client, "go")
    assert [t.tool_name for t in r.tool_results] == ["audit"]
    assert _count(log)["tool audit a"] == 1 and _count(log)["tool lookup b"] == 0

    # A judged answer with tool calls: the tool step's decision is the answer, not the judge.
    r = await agents.judged_tools.run(env.client, "look")
    [tool_step] = [s for s in await _steps(env, r.run_id) if s.kind == "tool"]
    assert tool_step.meta["decision"] == "agent/llm/1"
    asked = {q.step for q in llm.chat_requests}
    assert f"{r.run_id}:agent/llm/1/guardrail/0/judge.0" in asked


async def test_sigkill_mid_guardrail_retry_repeats_no_hook_guardrail_llm_or_tool(
    stack: Any,
) -> None:
    env, llm, script, log, respawn = stack
    script.hold_retry = True
    # Started as any client starts an agent run: the polos_agent workflow, by agent id.
    request = AgentRequest(agent="crash_guarded", input="go")
    handle = await env.client.start(agent_workflow, request)
    await asyncio.wait_for(script.held.wait(), 30)
    respawn()  # SIGKILL while the guardrail's retry call is in flight, then a new worker
    out = AgentResult.from_json(await handle.result(timeout=30))
    assert out.text == "an acceptable answer" and out.total_steps == 2
    answered = collections.Counter(q.step for q in llm.chat_requests if q.answered)
    unanswered = [q.step for q in llm.chat_requests if not q.answered]
    assert all(n == 1 for n in answered.values()), answered
    assert [s.split(":", 1)[1] for s in answered] == [
        "agent/llm/1",
        "agent/llm/2",
        "agent/llm/2/retry/1",
    ]
    assert len(unanswered) == 1 and unanswered[0].endswith("agent/llm/2/retry/1")
    # Everything that completed before the kill ran once.
    assert _count(log) == {
        "hook on_start": 1,
        "hook step_start 1": 1,
        "guard None": 1,
        "hook on_tool_start lookup": 1,
        "tool lookup FORCED": 1,
        "hook step_start 2": 1,
        "guard forbidden first answer": 1,
        "guard an acceptable answer": 1,
    }
    claims = [e for _, e in await env.client.history(handle.run_id) if isinstance(e, ev.RunClaimed)]
    assert len(claims) == 2


async def test_agent_stream_text_chunks_events_and_result(stack: Any) -> None:
    env, _, _, _, _ = stack
    s = await agents.live_streamer.stream(env.client, "tell me")
    chunks = [c async for c in s.text_chunks]
    assert len(chunks) > 1
    events = [e async for e in s.events]  # a second iterator sees every event from the first
    kinds = [e.event_type for e in events]
    assert kinds[-1] == "agent_finish" and "step_finish" in kinds
    assert await s.text() == "".join(chunks)
    r = await s.result()
    assert r.result == "".join(chunks) and r.agent_run_id == s.agent_run_id


async def test_guarded_stream_sends_the_checked_text_once_and_queue_is_used(stack: Any) -> None:
    env, llm, _, log, _ = stack
    s = await agents.stream_guarded.stream(env.client, "hi")
    chunks = [c async for c in s.text_chunks]
    r = await s.result()
    # With guardrails nothing streams while the model writes: the text that passed, once.
    assert chunks == [r.result] and "dev LLM" in str(r.result)
    assert llm.chat_requests[0].body.get("stream") is not True
    assert _count(log)[f"guard {r.result}"] == 1

    r = await agents.queued.run(env.client, "hi")
    requested = [e for _, e in await env.client.history(r.run_id) if isinstance(e, ev.RunRequested)]
    assert [e.queue for e in requested] == ["agents_q"]


async def test_with_input_ids_and_provider_kwargs_reach_hooks_and_requests(stack: Any) -> None:
    env, llm, _, log, _ = stack
    h = await env.client.start("tuned_wf", "hi")
    out = await h.result(timeout=30)
    assert out["steps"] == 1 and "dev LLM" in out["text"]
    [req] = llm.chat_requests
    assert (req.body["top_p"], req.body["seed"]) == (0.25, 7)  # the original dropped them
    assert _count(log)["hook ids s-1 u-1 WorkflowContext"] == 1


async def test_plain_loop_runs_hooks_and_a_failing_step_hook_stops_it() -> None:
    @hook
    def budget(ctx: Any, hc: HookContext) -> HookResult | None:
        assert isinstance(hc.current_payload, dict)
        if hc.current_payload["step"] > 1:
            return HookResult.fail("budget spent")
        return None

    async with DevLLM() as llm:
        a = Agent(
            "plain_hooks",
            tools=[agents.audit_plain],
            provider_base_url=llm.url,
            on_agent_step_start=budget,
        )
        llm.script(Reply.tools(("audit_plain", {"note": "x"})), Reply.text("never asked"))
        r = await a.run("go")
        assert r.stop_reason == "on_agent_step_start" and r.total_steps == 1
        assert len(llm.chat_requests) == 1


async def test_options_refused_clearly() -> None:
    with pytest.raises(AgentConfigError, match="compaction"):
        Agent("c1", compaction=object())
    with pytest.raises(ValueError, match="name= and id="):
        Agent("a", id="b")
    with pytest.raises(TypeError, match="initial_state"):
        agents.live_streamer.with_input("x", initial_state={"a": 1})
    with pytest.raises(TypeError, match="guardrail"):
        Agent("g1", guardrails=[42])
    with pytest.raises(TypeError, match="stop condition"):
        Agent("s1", stop_conditions=[1])
    with pytest.raises(TypeError, match="StopConditionContext"):

        @stop_condition
        def bad(ctx: int) -> bool:
            return True

    with pytest.raises(TypeError, match="queue"):
        Agent("q1", queue={"name": "x", "concurrency": 3})
    with pytest.raises(TypeError, match="modified_llm_config"):
        GuardrailResult.continue_with(modified_llm_config=None)
    # The original's forms of a configured condition, and its default.
    assert max_steps(count=3).config == MaxStepsConfig(count=3)
    assert max_steps({"count": 4}).config == MaxStepsConfig(count=4)
    cond = max_steps()
    cond.check()
    assert cond(StopConditionContext(steps=[])) is False
    with pytest.raises(TypeError, match="exactly two"):
        guardrail(lambda x: x)
    a = Agent("alias_check", id="alias_check", output_schema=agents.Answer, system_prompt="s")
    assert (a.id, a.output_type, a.instructions) == ("alias_check", agents.Answer, "s")
