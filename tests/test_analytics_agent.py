"""The views and spans over a real Agent run: the openai client over HTTP against the dev LLM,
inside a durable workflow on a real nats-server, exported to Parquet and followed into spans."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import polos_analytics as analytics
from polos import Agent, WorkflowContext, workflow
from polos._private.cli_analytics import trace_lines
from polos._private.telemetry import SpanFollower, trace_id_for
from polos.agent import agent_workflow
from polos.devllm import DevLLM, Reply
from polos_analytics.export import Exporter


def lookup_order(order_id: str) -> dict[str, Any]:
    """Find an order.

    Args:
        order_id: the order's id
    """
    return {"order_id": order_id, "status": "delivered", "amount": 40}


def refund(order_id: str, amount: float) -> dict[str, Any]:
    """Refund an order.

    Args:
        order_id: the order's id
        amount: how much
    """
    return {"refunded": amount}


def escalate(reason: str) -> str:
    """Hand over to a human.

    Args:
        reason: why
    """
    return "escalated"


support = Agent("support", model="gpt-4o", instructions="You resolve refunds.",
                tools=[lookup_order, refund, escalate])


@workflow
async def support_wf(ctx: WorkflowContext, text: str) -> str:
    r = await ctx.step.agent_invoke_and_wait("resolve", support.with_input(text))
    return str(r.result)


@pytest.fixture
async def llm() -> Any:
    async with DevLLM() as server:
        yield server


async def test_views_and_spans_over_a_real_agent_run(
    env_factory: Any, llm: DevLLM, tmp_path: Path
) -> None:
    support.config = support.config.__class__(**{**support.config.__dict__, "base_url": llm.url})
    llm.script(
        Reply.tools(("lookup_order", {"order_id": "o-7"}), reasoning="need the order state"),
        Reply.tools(("refund", {"order_id": "o-7", "amount": 40}), content="delivered: refund"),
        Reply.text("Refunded 40."),
    )
    env = await env_factory([support_wf, agent_workflow])
    h = await env.client.start(support_wf, "refund order o-7")
    assert await h.result(timeout=20) == "Refunded 40."

    out = tmp_path / "export"
    async with Exporter(env.as_role("service"), out) as exporter:
        await exporter.export_once()
    con = analytics.connect(out)
    decisions = con.execute(
        "select decision, chosen_tool, alternatives, reason, tool_result::VARCHAR "
        "from decisions order by seq").fetchall()
    print(decisions)
    assert [(d[0], d[1], d[2]) for d in decisions] == [
        ("resolve/llm/1", "lookup_order", ["refund", "escalate"]),
        ("resolve/llm/2", "refund", ["lookup_order", "escalate"]),
    ]
    assert decisions[0][3] == "need the order state"
    assert decisions[1][3] == "delivered: refund"
    assert '"delivered"' in decisions[0][4] and '"refunded"' in decisions[1][4]
    llm_rows = con.execute("select count(*), sum(total_tokens) > 0, sum(cost_usd) > 0, "
                           "min(n_messages) from llm_calls").fetchall()
    assert llm_rows == [(3, True, True, 2)]
    # The parent's wait for its child is a step too (the wake carries the child's result).
    assert con.execute(f"select key, kind from steps where run_id = '{h.run_id}'").fetchall() \
        == [("resolve", "child")]
    # The agent runs as a child run of the workflow: its cost rolls up to the root run.
    costs = con.execute("select workflow, root_run_id, agent, model, llm_calls "
                        "from costs").fetchall()
    assert costs == [("polos_agent", h.run_id, "support", "gpt-4o", 3)]

    exporter_spans = InMemorySpanExporter()
    async with SpanFollower(env.as_role("service"), exporter=exporter_spans) as follower:
        await follower.process_available()
    spans = exporter_spans.get_finished_spans()
    names = sorted(s.name for s in spans)
    assert names == sorted(["run support_wf", "run polos_agent", "chat gpt-4o", "chat gpt-4o",
                            "chat gpt-4o", "execute_tool lookup_order", "execute_tool refund",
                            "wait child resolve"])
    # One trace for the workflow and its agent child run.
    runs = {s.name: s for s in spans if s.name.startswith("run ")}
    assert runs["run support_wf"].attributes["polos.steps"] == 1
    wait = next(s for s in spans if s.name == "wait child resolve")
    assert runs["run polos_agent"].parent.span_id == wait.context.span_id
    assert runs["run polos_agent"].attributes["polos.root_run_id"] == h.run_id
    assert {s.context.trace_id for s in spans} == {trace_id_for(h.run_id)}
    chat = [s for s in spans if s.name == "chat gpt-4o"]
    assert all(s.attributes["gen_ai.usage.input_tokens"] > 0 for s in chat)
    assert all(s.attributes["gen_ai.agent.name"] == "support" for s in chat)

    tree = "\n".join(await trace_lines(env.client.nc, env.client.names, h.run_id))
    print(tree)
    assert "child run " in tree and "polos_agent  completed" in tree
    assert "decision: chose lookup_order of [lookup_order, refund, escalate]" in tree
    assert 'reason: "need the order state"' in tree
