"""Workflows (no tests) whose steps are recorded in the agreed LLM/tool format, through the real write path
(RunExecution.record, fenced and replayed like any step), for the analytics and telemetry tests.
Until polos/agent.py lands, this is how an agent's history looks on the log."""

from __future__ import annotations

from typing import Any

from polos import WorkflowContext, workflow
from polos import history as ev

TOOLS = ["lookup_order", "refund", "escalate"]


async def record_step(
    ctx: WorkflowContext,
    key: str,
    kind: str,
    name: str,
    output: Any,
    meta: dict[str, Any],
    duration_ms: float,
) -> Any:
    """Record one step of ``kind`` the way the agent code does; replay returns the record."""
    x = ctx._x
    step_id = x.step_id(key, kind)
    found = x.recorded(step_id, kind, name)
    if isinstance(found, ev.StepCompleted):
        return found.output
    await x.check_new_step(step_id)
    await x.record(
        ev.StepCompleted(
            key=step_id, kind=kind, name=name, output=output, duration_ms=duration_ms, meta=meta
        ),
        msg_id=f"{x.run_id}/s/{step_id}",
    )
    return output


def llm_meta(messages: int, prompt: int, completion: int, cost: float) -> dict[str, Any]:
    return {
        "agent": "support",
        "provider": "devllm",
        "model": "dev-small",
        "base_url": "http://127.0.0.1:0/v1",
        "messages": [{"role": "user", "content": f"m{i}"} for i in range(messages)],
        "tools_offered": TOOLS,
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "cached_tokens": 0,
            "total_tokens": prompt + completion,
        },
        "latency_ms": 12.5,
        "finish_reason": "tool_calls",
        "cost_usd": cost,
        "temperature": 0.0,
    }


@workflow
async def support_agent(ctx: WorkflowContext, order_id: str) -> str:
    """Two LLM decisions: look the order up, then refund it; then a final answer."""
    first = await record_step(
        ctx,
        "llm:1",
        "llm",
        "dev-small",
        {
            "content": "I need the order first.",
            "reasoning": "check order state before refund",
            "tool_calls": [
                {"id": "call_1", "name": "lookup_order", "arguments": {"order_id": order_id}}
            ],
        },
        llm_meta(2, 100, 20, 0.001),
        13.0,
    )
    call = first["tool_calls"][0]
    await record_step(
        ctx,
        "tool:lookup_order",
        "tool",
        "lookup_order",
        {"status": "delivered", "amount": 40},
        {
            "agent": "support",
            "arguments": call["arguments"],
            "decision": "llm:1",
            "tool_call_id": call["id"],
            "error": None,
        },
        3.0,
    )
    second = await record_step(
        ctx,
        "llm:2",
        "llm",
        "dev-small",
        {
            "content": "Delivered and under 50: refund.",
            "reasoning": "",
            "tool_calls": [{"id": "call_2", "name": "refund", "arguments": {"amount": 40}}],
        },
        llm_meta(4, 180, 25, 0.002),
        15.0,
    )
    call = second["tool_calls"][0]
    await record_step(
        ctx,
        "tool:refund",
        "tool",
        "refund",
        {"refunded": 40},
        {
            "agent": "support",
            "arguments": call["arguments"],
            "decision": "llm:2",
            "tool_call_id": call["id"],
            "error": None,
        },
        4.0,
    )
    final = await record_step(
        ctx,
        "llm:3",
        "llm",
        "dev-small",
        {"content": "Refunded 40.", "reasoning": None, "tool_calls": []},
        {**llm_meta(6, 220, 10, 0.003), "finish_reason": "stop"},
        9.0,
    )
    return str(final["content"])


@workflow
async def plain_steps(ctx: WorkflowContext, n: int) -> int:
    total = 0
    for i in range(n):
        total += await ctx.step.run(f"s{i}", lambda i=i: i)
    return total
