"""Agents, driven through the real openai client over HTTP against the Polos dev LLM.

Durable tests run the agent inside a workflow on a real nats-server and read the run's history;
the rest use ``agent.run`` (plain code) where durability is not the point.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
from typing import Any

import orjson
import pydantic
import pytest

from polos import (
    Agent,
    AgentConfigError,
    AgentGuardrailError,
    AgentOutputError,
    GuardrailViolation,
    StepFailedError,
    WorkflowContext,
    WorkflowFailedError,
    tool,
    workflow,
)
from polos import history as ev
from polos._private.run import waits as waiting
from polos._private.run.wake import wake
from polos._private.store import load_state
from polos.agent import AgentRequest, AgentResult, agent_workflow, stream_subject
from polos.devllm import DevLLM, Reply
from polos.tools import Tool
from polos.workflow import Step

CALLS: collections.Counter[str] = collections.Counter()


@pytest.fixture
async def llm() -> Any:
    async with DevLLM() as server:
        yield server


# --------------------------------------------------------------------------- tools


@tool
def check_inventory(sku: str, quantity: int = 1) -> dict[str, Any]:
    """Is the item in stock?

    Args:
        sku: the stock keeping unit
        quantity: how many are needed
    """
    CALLS["check_inventory"] += 1
    return {"sku": sku, "in_stock": quantity <= 5}


async def calculate_shipping(country: str, weight_kg: float) -> float:
    """Shipping cost in USD.

    :param country: ISO country code
    :param weight_kg: parcel weight
    """
    CALLS["calculate_shipping"] += 1
    await asyncio.sleep(0)
    return round(5 + 2 * weight_kg, 2)


def explode(reason: str) -> str:
    """Always fails."""
    raise RuntimeError(f"boom: {reason}")


class OrderValidation(pydantic.BaseModel):
    valid: bool
    reason: str


def test_tool_schema_from_type_hints_and_docstrings() -> None:
    assert check_inventory.name == "check_inventory"
    assert check_inventory.description == "Is the item in stock?"
    props = check_inventory.parameters["properties"]
    assert props["sku"] == {"type": "string", "description": "the stock keeping unit"}
    assert props["quantity"]["default"] == 1 and props["quantity"]["type"] == "integer"
    assert check_inventory.parameters["required"] == ["sku"]
    ship = Tool.from_function(calculate_shipping)
    assert ship.parameters["properties"]["country"]["description"] == "ISO country code"
    assert ship.parameters["properties"]["weight_kg"]["type"] == "number"
    gated = tool(name="refund", description="Refund money", approval=True)(explode)
    assert (gated.name, gated.description, gated.approval) == ("refund", "Refund money", "always")
    assert check_inventory("A1", 9) == {"sku": "A1", "in_stock": False}  # still callable
    with pytest.raises(ValueError, match="tool name"):
        Tool.from_function(explode, name="bad name")


# --------------------------------------------------------------------------- durable loop

validator = Agent(
    "validator",
    model="gpt-4o",
    instructions="You validate orders.",
    tools=[check_inventory, calculate_shipping],
    output_type=OrderValidation,
    temperature=0.2,
)


@workflow
async def validate_wf(ctx: WorkflowContext, text: str) -> dict[str, Any]:
    v = await ctx.step.agent_invoke_and_wait("validate_order", validator.with_input(text))
    assert isinstance(v.result, OrderValidation)
    return {"valid": v.result.valid, "reason": v.result.reason, "run_id": v.run_id}


async def test_parallel_tool_calls_structured_output_and_record_format(
    env_factory: Any, llm: DevLLM
) -> None:
    validator.config = dataclasses.replace(validator.config, base_url=llm.url)
    CALLS.clear()
    llm.script(
        Reply.tools(
            ("check_inventory", {"sku": "A1", "quantity": 2}),
            ("calculate_shipping", {"country": "DE", "weight_kg": 1.5}),
        ),
        Reply.json({"valid": True, "reason": "in stock, ships for 8.0"}),
    )
    env = await env_factory([validate_wf, agent_workflow])
    h = await env.client.start(validate_wf, "order A1 x2 to DE")
    out = await h.result(timeout=15)
    assert out["valid"] is True and out["reason"] == "in stock, ships for 8.0"
    assert CALLS == {"check_inventory": 1, "calculate_shipping": 1}
    # The agent ran as a child run with its own history; the parent holds one child step.
    child = await env.client.get(out["run_id"])
    assert child.workflow == "polos_agent" and out["run_id"] != h.run_id
    parent = ev.RunState.fold(h.run_id, await env.client.history(h.run_id))
    assert [s.kind for s in parent.steps.values()] == ["child"]

    steps = [
        e for _, e in await env.client.history(out["run_id"]) if isinstance(e, ev.StepCompleted)
    ]
    assert (steps[0].kind, steps[0].key) == ("llm", "validate_order/llm/1")
    assert {s.key for s in steps} == {
        "validate_order/llm/1",
        "validate_order/tool/1/check_inventory",
        "validate_order/tool/2/calculate_shipping",
        "validate_order/llm/2",
        "validate_order/stopped",  # why the agent stopped, queryable in the steps view
    }
    first = steps[0]
    assert first.name == "gpt-4o"
    assert first.output["tool_calls"][0]["arguments"] == {"sku": "A1", "quantity": 2}
    assert set(first.output) == {"content", "tool_calls", "reasoning"}
    meta = first.meta
    assert (
        meta["agent"] == "validator" and meta["provider"] == "openai" and meta["model"] == "gpt-4o"
    )
    assert meta["base_url"] == llm.url and meta["temperature"] == 0.2
    assert meta["messages"][0] == {"role": "system", "content": "You validate orders."}
    assert meta["tools_offered"] == ["check_inventory", "calculate_shipping"]
    assert set(meta["usage"]) == {
        "prompt_tokens",
        "completion_tokens",
        "cached_tokens",
        "total_tokens",
    }
    assert meta["cost_usd"] > 0 and meta["finish_reason"] == "tool_calls" and meta["latency_ms"] > 0
    tool_step = next(s for s in steps if s.kind == "tool" and s.name == "calculate_shipping")
    assert tool_step.output == 8.0
    assert tool_step.meta["decision"] == "validate_order/llm/1"
    assert tool_step.meta["arguments"] == {"country": "DE", "weight_kg": 1.5}
    assert tool_step.meta["error"] is None and tool_step.meta["tool_call_id"]
    # Both tool calls came in one LLM answer; the second request carried both results.
    second = llm.chat_requests[1].body
    assert [m["role"] for m in second["messages"]] == [
        "system",
        "user",
        "assistant",
        "tool",
        "tool",
    ]
    assert second["response_format"]["type"] == "json_schema"
    assert second["temperature"] == 0.2


async def test_tool_error_goes_back_to_the_model(llm: DevLLM) -> None:
    agent = Agent("errs", tools=[explode], base_url=llm.url)
    llm.script(
        Reply.tools(("explode", {"reason": "x"})),
        Reply.tools(("explode", "{not json")),
        Reply.text("gave up"),
    )
    r = await agent.run("try it")
    assert r.result == "gave up"
    tools = [s for s in r.steps if s.kind == "tool"]
    assert tools[0].error == "RuntimeError: boom: x" and tools[0].output == {
        "error": "RuntimeError: boom: x"
    }
    assert tools[1].error is not None and tools[1].error.startswith(
        "ValueError: arguments must be a JSON object"
    )
    sent = llm.chat_requests[1].body["messages"][-1]
    assert sent["role"] == "tool" and "boom: x" in sent["content"]


async def test_structured_output_gets_one_corrective_retry(llm: DevLLM) -> None:
    agent = Agent("structured", output_type=OrderValidation, base_url=llm.url)
    llm.script(Reply.text("sure, it is valid"), Reply.json({"valid": False, "reason": "no stock"}))
    r = await agent.run("validate")
    assert r.result == OrderValidation(valid=False, reason="no stock")
    assert r.usage.llm_calls == 2
    retry_msg = llm.chat_requests[1].body["messages"][-1]
    assert retry_msg["role"] == "user" and "not valid JSON" in retry_msg["content"]

    llm.script(Reply.text("nope"), Reply.json({"valid": "maybe"}))
    with pytest.raises(AgentOutputError, match="does not match OrderValidation"):
        await agent.run("validate")


async def test_handoff_moves_the_conversation_to_the_specialist(llm: DevLLM) -> None:
    refunds = Agent(
        "refunds", instructions="You handle refunds.", output_type=OrderValidation, base_url=llm.url
    )
    triage = Agent(
        "triage", instructions="Route the customer.", handoffs=[refunds], base_url=llm.url
    )
    llm.script(
        Reply.tools(("transfer_to_refunds", {"reason": "refund request"})),
        Reply.json({"valid": True, "reason": "refund approved"}),
    )
    r = await triage.run("I want my money back")
    assert r.agent == "refunds"
    assert r.result == OrderValidation(valid=True, reason="refund approved")
    first, second = (q.body for q in llm.chat_requests)
    assert "transfer_to_refunds" in [t["function"]["name"] for t in first["tools"]]
    assert second["messages"][0] == {"role": "system", "content": "You handle refunds."}
    assert second["messages"][1] == {"role": "user", "content": "I want my money back"}
    assert second["messages"][-1]["role"] == "tool"
    assert "response_format" in second and "tools" not in second
    handoff = next(s for s in r.steps if s.kind == "tool")
    assert (handoff.name, handoff.agent, handoff.output) == (
        "transfer_to_refunds",
        "triage",
        {"transferred_to": "refunds"},
    )


async def test_guardrails_check_and_rewrite_input_tool_calls_and_output(llm: DevLLM) -> None:
    def no_secrets(text: str) -> str | None:
        if "password" in text:
            raise GuardrailViolation("no passwords")
        return text.replace("damn", "****")

    def cap_quantity(name: str, args: dict[str, Any]) -> dict[str, Any] | None:
        if name == "check_inventory" and args.get("sku") == "FORBIDDEN":
            raise GuardrailViolation("that SKU is off limits")
        return {**args, "quantity": min(int(args.get("quantity", 1)), 3)}

    def polite(answer: str) -> str:
        if "stupid" in answer:
            raise GuardrailViolation("be polite")
        return answer.upper()

    agent = Agent(
        "guarded",
        tools=[check_inventory],
        input_guardrails=[no_secrets],
        tool_guardrails=[cap_quantity],
        output_guardrails=[polite],
        guardrail_retries=1,
        base_url=llm.url,
    )
    with pytest.raises(AgentGuardrailError, match="no passwords"):
        await agent.run("my password is hunter2")
    assert llm.chat_requests == []  # rejected before any call

    llm.script(
        Reply.tools(
            ("check_inventory", {"sku": "A1", "quantity": 9}),
            ("check_inventory", {"sku": "FORBIDDEN"}),
        ),
        Reply.text("that is a stupid order"),
        Reply.text("all good"),
    )
    r = await agent.run("damn, check A1")
    assert llm.chat_requests[0].body["messages"][-1]["content"] == "****, check A1"
    ok, blocked = (s for s in r.steps if s.kind == "tool")
    assert ok.output == {"sku": "A1", "in_stock": True}  # quantity rewritten 9 -> 3
    assert blocked.error == "GuardrailViolation: that SKU is off limits"
    assert (
        llm.chat_requests[2]
        .body["messages"][-1]["content"]
        .startswith("Your answer was rejected: be polite")
    )
    assert r.result == "ALL GOOD" and r.text == "all good"

    llm.script(Reply.text("stupid"), Reply.text("stupid again"))
    with pytest.raises(AgentGuardrailError, match="output rejected: be polite"):
        await agent.run("check")


async def test_stop_conditions(llm: DevLLM) -> None:
    llm.responder = lambda body: Reply.tools(("check_inventory", {"sku": "A1"}))
    looping = Agent("looping", tools=[check_inventory], max_steps=3, base_url=llm.url)
    r = await looping.run("loop forever")
    assert r.stop_reason == "max_steps" and r.usage.llm_calls == 3 and r.result is None

    budget = Agent("budget", tools=[check_inventory], max_tokens=60, base_url=llm.url)
    r = await budget.run("loop forever")
    assert r.stop_reason == "max_tokens" and r.usage.total_tokens >= 60
    print(f"\nmax_tokens=60 stopped after {r.usage.llm_calls} calls, {r.usage.total_tokens} tokens")

    stopper = Agent(
        "stopper", tools=[check_inventory], stop_on_tools=["check_inventory"], base_url=llm.url
    )
    r = await stopper.run("check once")
    assert r.stop_reason == "tool_called" and r.result == {"sku": "A1", "in_stock": True}
    assert r.usage.llm_calls == 1


async def test_provider_errors_retry_fail_clearly_and_need_a_key(
    llm: DevLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    from polos.agent import LLMRetry

    agent = Agent("flaky", base_url=llm.url, retry=LLMRetry(initial_interval=0.01))
    llm.script(
        Reply.error(429, "slow down", retry_after=0.05),
        Reply.error(503, "overloaded"),
        Reply.text("finally"),
    )
    r = await agent.run("hi")
    assert r.result == "finally"
    assert [q.status for q in llm.chat_requests] == [429, 503, 200]

    llm.script(Reply.error(400, "messages[0].content is too long"))
    with pytest.raises(StepFailedError, match="too long") as info:
        await agent.run("hi")
    assert info.value.error_type == "BadRequestError"
    assert len(llm.chat_requests) == 4  # a bad request is not retried

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    keyless = Agent("keyless", model="gpt-4o")  # the real OpenAI endpoint, no key anywhere
    with pytest.raises(AgentConfigError) as missing:
        await keyless.run("hi")
    # One line naming both ways out: a key, or the dev LLM (which says it is not a model).
    text = str(missing.value)
    assert "\n" not in text and "OPENAI_API_KEY" in text
    assert "polos worker --dev-llm" in text and "not a model" in text


bad_request_agent = Agent("bad_request_agent")


@workflow
async def bad_request_wf(ctx: WorkflowContext, text: str) -> str:
    r = await ctx.step.agent_invoke_and_wait("ask", bad_request_agent.with_input(text))
    return str(r.result)


async def test_bad_request_fails_the_step_with_the_providers_message(
    env_factory: Any, llm: DevLLM
) -> None:
    bad_request_agent.config = dataclasses.replace(bad_request_agent.config, base_url=llm.url)
    llm.script(Reply.error(400, "unknown parameter: frobnicate"))
    env = await env_factory([bad_request_wf, agent_workflow])
    h = await env.client.start(bad_request_wf, "hi")
    with pytest.raises(WorkflowFailedError, match="unknown parameter: frobnicate"):
        await h.result(timeout=15)
    child_id = waiting.child_run_id(h.run_id, "ask", 0)
    failed = [e for _, e in await env.client.history(child_id) if isinstance(e, ev.StepFailed)]
    assert failed[0].kind == "llm" and failed[0].key == "ask/llm/1"
    assert failed[0].error["type"] == "BadRequestError"


streamer = Agent("streamer", stream=True)


@workflow
async def stream_wf(ctx: WorkflowContext, text: str) -> str:
    r = await ctx.step.agent_invoke_and_wait("talk", streamer.with_input(text))
    return str(r.result)


async def test_streaming_publishes_text_deltas_live(env_factory: Any, llm: DevLLM) -> None:
    streamer.config = dataclasses.replace(streamer.config, base_url=llm.url)
    text = "Durable agents stream their words while the log keeps the final message."
    llm.script(Reply.text(text))
    env = await env_factory([stream_wf, agent_workflow])
    run_id = "streamrun1"
    got: list[dict[str, Any]] = []
    finished = asyncio.Event()

    async def on_msg(msg: Any) -> None:
        doc = orjson.loads(msg.data)
        got.append(doc)
        if doc.get("done"):
            finished.set()

    sub = await env.client.nc.subscribe(f"{env.settings.prefix}.stream.{run_id}.>", cb=on_msg)
    h = await env.client.start(stream_wf, "talk to me", run_id=run_id)
    assert await h.result(timeout=15) == text
    await asyncio.wait_for(finished.wait(), 5)
    await sub.unsubscribe()
    deltas = [d for d in got if "delta" in d]
    assert len(deltas) > 3 and "".join(d["delta"] for d in deltas) == text
    assert [d["seq"] for d in deltas] == list(range(1, len(deltas) + 1))
    assert deltas[0]["step"] == "talk/llm/1"
    assert (
        stream_subject(env.settings.prefix, run_id, "talk/llm/1")
        == f"{env.settings.prefix}.stream.{run_id}.talk/llm/1"
    )
    assert llm.chat_requests[0].body["stream"] is True
    child_id = waiting.child_run_id(run_id, "talk", 0)
    assert deltas[0]["run_id"] == child_id  # published under the root run the client started
    llm_steps = [
        e
        for _, e in await env.client.history(child_id)
        if isinstance(e, ev.StepCompleted) and e.kind == "llm"
    ]
    assert len(llm_steps) == 1 and llm_steps[0].output["content"] == text  # the durable record
    print(f"\n{len(deltas)} deltas published for a {len(text)}-character answer")


async def test_agent_runs_as_its_own_run(env_factory: Any, llm: DevLLM) -> None:
    Agent("standalone", instructions="Answer briefly.", base_url=llm.url)
    llm.script(Reply.text("42"))
    env = await env_factory([agent_workflow])
    h = await env.client.start(
        agent_workflow, AgentRequest(agent="standalone", input="meaning of life?")
    )
    out = AgentResult.from_json(await h.result(timeout=15))
    assert out.result == "42" and out.agent == "standalone" and out.usage.llm_calls == 1
    keys = [e.key for _, e in await env.client.history(h.run_id) if isinstance(e, ev.StepCompleted)]
    assert keys == ["agent/llm/1", "agent/stopped"]


# --------------------------------------------------------------------------- shared memory


async def test_shared_memory_compare_and_set_loses_no_update(env_factory: Any) -> None:
    from polos.agent import SharedMemory

    env = await env_factory([])
    clients = [env.client]
    from polos import PolosClient

    for _ in range(2):
        clients.append(await PolosClient.connect(settings=env.settings))
    try:
        mems = [SharedMemory(c.js, env.settings.prefix, "session1") for c in clients]
        await asyncio.gather(
            *(m.append("notes", f"{i}-{j}") for i, m in enumerate(mems) for j in range(15))
        )
        notes = await mems[0].get("notes")
        assert len(notes) == 45 and len(set(notes)) == 45
        assert await mems[1].snapshot() == {"notes": notes}
        conflicts = sum(m.conflicts for m in mems)
        print(f"\n45 concurrent appends from 3 connections: {conflicts} CAS retries, none lost")
    finally:
        for c in clients[1:]:
            await c.close()


writer_agent = Agent("mem_writer", memory=True)
reader_agent = Agent("mem_reader", memory=True)


@workflow
async def memory_wf(ctx: WorkflowContext, session: str) -> Any:
    await ctx.step.agent_invoke_and_wait(
        "write", writer_agent.with_input("note it", session=session)
    )
    r = await ctx.step.agent_invoke_and_wait(
        "read", reader_agent.with_input("recall", session=session)
    )
    return r.result


async def test_agents_of_one_session_share_memory(env_factory: Any, llm: DevLLM) -> None:
    for a in (writer_agent, reader_agent):
        a.config = dataclasses.replace(a.config, base_url=llm.url)

    def responder(body: dict[str, Any]) -> Reply:
        msgs = body["messages"]
        if msgs[-1]["role"] == "tool":
            return Reply.text(msgs[-1]["content"])
        if msgs[-1]["content"] == "note it":
            return Reply.tools(("memory_append", {"key": "facts", "item": "customer is VIP"}))
        return Reply.tools(("memory_get", {"key": "facts"}))

    llm.responder = responder
    env = await env_factory([memory_wf, agent_workflow])
    out = await (await env.client.start(memory_wf, "sess42")).result(timeout=15)
    assert orjson.loads(out) == ["customer is VIP"]
    offered = [t["function"]["name"] for t in llm.chat_requests[0].body["tools"]]
    assert offered == ["memory_get", "memory_set", "memory_append"]


# --------------------------------------------------------------------------- approval


@tool(approval=True)
def refund(order_id: str, amount: float) -> str:
    """Refund an order.

    Args:
        order_id: the order
        amount: dollars to give back
    """
    CALLS["refund"] += 1
    return f"refunded {amount} on {order_id}"


approver = Agent("approver", tools=[refund, check_inventory])


@workflow
async def approval_wf(ctx: WorkflowContext, text: str) -> str:
    r = await ctx.step.agent_invoke_and_wait("support", approver.with_input(text))
    return str(r.result)


async def _resume(env: Any, run_id: str, key: str, data: Any) -> None:
    """A human's decision: client.resume when the waiting issue has wired it, else the same
    wake the orchestrator appends for a resume command (then a dispatch)."""
    if hasattr(env.client, "resume"):
        await env.client.resume(run_id, key, data)
        return

    state = await load_state(env.client.nc, env.client.names, run_id)
    seq = await wake(
        env.client.js,
        env.client.names,
        run_id,
        key,
        expected_seq=state.last_seq,
        reason="resume",
        cause="resume",
        kind="suspend",
        output={"data": data, "at": 0.0},
        workflow=state.workflow,
    )
    assert seq is not None
    await env.orchestrator.dispatch(run_id, str(state.workflow), seq)


async def _suspended(env: Any, run_id: str, nth: int) -> ev.RunSuspended:
    for _ in range(500):
        history = await env.client.history(run_id)
        if history and isinstance(history[-1][1], ev.RunSuspended):
            found = [e for _, e in history if isinstance(e, ev.RunSuspended)]
            assert len(found) == nth
            return found[-1]
        await asyncio.sleep(0.02)
    raise AssertionError("the run never suspended")


@pytest.mark.skipif(not hasattr(Step, "suspend"), reason="ctx.step.suspend (issue 3) not built yet")
async def test_approval_gated_tool_waits_for_a_human(env_factory: Any, llm: DevLLM) -> None:
    approver.config = dataclasses.replace(approver.config, base_url=llm.url)
    CALLS.clear()
    llm.script(
        Reply.tools(
            ("refund", {"order_id": "o1", "amount": 30}), ("check_inventory", {"sku": "A"})
        ),
        Reply.tools(("refund", {"order_id": "o2", "amount": 999})),
        Reply.text("refunded o1; o2 was declined"),
    )
    env = await env_factory([approval_wf, agent_workflow])
    h = await env.client.start(approval_wf, "refund o1 and o2")
    child_id = waiting.child_run_id(h.run_id, "support", 0)
    sus = await _suspended(env, child_id, 1)
    assert (sus.kind, sus.step) == ("suspend", "support/tool/1/refund/approval")
    assert sus.data["_tool"] == "refund" and sus.data["_source"] == "tool_approval"
    assert sus.data["_form"]["context"] == {
        "tool": "refund",
        "input": {"order_id": "o1", "amount": 30},
    }
    # The gated call waits; its sibling of the same turn ran (once: the replay repeats nothing).
    assert CALLS == {"check_inventory": 1}
    await _resume(env, child_id, sus.step, {"approved": True})
    sus2 = await _suspended(env, child_id, 2)
    assert sus2.step == "support/tool/3/refund/approval"
    await _resume(env, child_id, sus2.step, {"approved": False, "feedback": "too much"})
    assert await h.result(timeout=15) == "refunded o1; o2 was declined"
    assert CALLS == {"refund": 1, "check_inventory": 1}
    assert len(llm.chat_requests) == 3  # the resumed runs replayed the LLM calls, not repeated them
    declined = llm.chat_requests[2].body["messages"][-1]
    assert (
        declined["role"] == "tool"
        and 'Tool \\"refund\\" was rejected by the user. Feedback: too much' in declined["content"]
    )


# --------------------------------------------------------------------------- token rate limits

limited_agent = Agent("limited", model="gpt-4o-mini", tools=[check_inventory])


@workflow
async def limited_wf(ctx: WorkflowContext, text: str) -> int:
    r = await ctx.step.agent_invoke_and_wait("limited", limited_agent.with_input(text))
    return r.usage.llm_calls


async def test_llm_calls_go_through_the_shared_token_limiter(env_factory: Any, llm: DevLLM) -> None:
    from polos._private import limits
    from polos.queues import RateLimit

    limited_agent.config = dataclasses.replace(limited_agent.config, base_url=llm.url)
    env = await env_factory([limited_wf, agent_workflow])
    await limits.TokenLimiter.shared(
        env.client.nc, env.client.js, env.client.names, env.settings
    ).configure("model:gpt-4o-mini", RateLimit(requests_per_minute=240, burst_seconds=0.25))
    llm.script(
        Reply.tools(("check_inventory", {"sku": "A"})),
        Reply.tools(("check_inventory", {"sku": "B"})),
        Reply.text("ok"),
    )
    assert await (await env.client.start(limited_wf, "go")).result(timeout=20) == 3
    assert env.worker is not None
    limiter = limits.TokenLimiter.shared(
        env.worker._nc, env.worker._js, env.worker.names, env.settings
    )  # type: ignore[arg-type]
    assert limiter.waited > 0  # a one-request burst: the 2nd and 3rd calls had to wait
    print(
        f"\n3 LLM calls under 4 requests/s with a burst of 1: waited {limiter.waited:.2f}s in all"
    )


# --------------------------------------------------------------------------- the example


async def test_order_example_runs_on_the_dev_llm_default_rule(
    env_factory: Any, llm: DevLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_BASE_URL", llm.url)  # what examples/agents.py does without a key
    from examples.agents import ProcessOrderInput, process_order

    env = await env_factory([process_order, agent_workflow])
    order = ProcessOrderInput(id="o-7", sku="SKU-1", quantity=2, country="FR", amount=99.0)
    out = await (await env.client.start(process_order, order)).result(timeout=20)
    assert out.status == "completed" and out.payment_id
    first = llm.chat_requests[0].body
    assert [t["function"]["name"] for t in first["tools"]] == [
        "check_inventory",
        "calculate_shipping",
    ]
    assert len(llm.chat_requests) == 2  # every tool once, then the JSON answer


# --------------------------------------------------------------------------- big payloads


def fetch_document(name: str) -> str:
    """Fetch a (large) document.

    Args:
        name: which document
    """
    return "x" * 1_500_000


big_agent = Agent("big_reader", tools=[fetch_document])


@workflow
async def big_wf(ctx: WorkflowContext, name: str) -> int:
    r = await ctx.step.agent_invoke_and_wait(
        "read", big_agent.with_input(f"read {name}"), inline=True
    )
    return len(str(r.steps[1].output)) + len(str(r.result))


async def test_a_tool_result_bigger_than_a_nats_message_is_recorded(
    env_factory: Any, llm: DevLLM
) -> None:
    big_agent.config = dataclasses.replace(big_agent.config, base_url=llm.url)
    llm.script(Reply.tools(("fetch_document", {"name": "manual"})), Reply.text("read it"))
    env = await env_factory([big_wf])
    h = await env.client.start(big_wf, "manual")
    assert await h.result(timeout=20) == 1_500_000 + len("read it")
    steps = {
        e.key: e for _, e in await env.client.history(h.run_id) if isinstance(e, ev.StepCompleted)
    }
    assert len(steps["read/tool/1/fetch_document"].output) == 1_500_000
    assert len(steps["read/llm/2"].meta["messages"][-1]["content"]) == 1_500_000


async def test_plain_agent_run_with_settings_uses_shared_memory(settings: Any, llm: DevLLM) -> None:
    from polos import PolosClient
    from polos.agent import SharedMemory

    notes = Agent("plain_notes", memory=True, base_url=llm.url)
    llm.script(
        Reply.tools(("memory_set", {"key": "plan", "value": {"step": 1}})), Reply.text("noted")
    )
    r = await notes.run("remember the plan", session="plain1", settings=settings)
    assert r.result == "noted" and r.run_id is None
    async with await PolosClient.connect(settings=settings) as client:
        assert await SharedMemory(client.js, settings.prefix, "plain1").get("plan") == {"step": 1}
