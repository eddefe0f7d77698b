"""The views and spans over a real Agent run: the openai client over HTTP against the dev LLM,
inside a durable workflow on a real nats-server, exported to Parquet and followed into spans."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import orjson
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import polos_analytics as analytics
from polos import Agent, WorkflowContext, workflow
from polos.agent import agent_workflow
from polos.cli.trace import trace_lines
from polos.devllm import DevLLM, Reply
from polos_analytics.export import Exporter
from polos_analytics.spans import SpanFollower, trace_id_for


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


support = Agent(
    "support",
    model="gpt-4o",
    instructions="You resolve refunds.",
    tools=[lookup_order, refund, escalate],
)


@workflow
async def support_wf(ctx: WorkflowContext, text: str) -> str:
    r = await ctx.step.agent_invoke_and_wait("resolve", support.with_input(text))
    return str(r.result)


DOC = Path(__file__).resolve().parents[1] / "docs" / "observability.md"


def _doc_query(title: str) -> str:
    """The documented query whose introducing sentence contains ``title``."""
    found = re.findall(r"((?:[^\n]+\n)+)\n```sql\n(.*?)```", DOC.read_text(), flags=re.S)
    [query] = [q for intro, q in found if title in " ".join(intro.split())]
    return query


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
        "from decisions order by seq"
    ).fetchall()
    print(decisions)
    assert [(d[0], d[1], d[2]) for d in decisions] == [
        ("resolve/llm/1", "lookup_order", ["refund", "escalate"]),
        ("resolve/llm/2", "refund", ["lookup_order", "escalate"]),
    ]
    assert decisions[0][3] == "need the order state"
    assert decisions[1][3] == "delivered: refund"
    assert '"delivered"' in decisions[0][4] and '"refunded"' in decisions[1][4]
    llm_rows = con.execute(
        "select count(*), sum(total_tokens) > 0, sum(cost_usd) > 0, min(n_messages) from llm_calls"
    ).fetchall()
    assert llm_rows == [(3, True, True, 2)]
    # The parent's wait for its child is a step too (the wake carries the child's result).
    assert con.execute(f"select key, kind from steps where run_id = '{h.run_id}'").fetchall() == [
        ("resolve", "child")
    ]
    # The agent runs as a child run of the generic polos_agent workflow: its cost rolls up to
    # the root run, the workflow that was started, and the agent's own name.
    costs = con.execute(
        "select workflow, root_run_id, root_workflow, agent, model, llm_calls from costs"
    ).fetchall()
    assert costs == [("polos_agent", h.run_id, "support_wf", "support", "gpt-4o", 3)]
    spent, tokens = con.execute("select sum(cost_usd), sum(total_tokens) from llm_calls").fetchone()
    assert spent > 0 and tokens > 0
    by_run = con.execute(
        "select workflow, root_workflow, llm_calls, total_tokens, cost_usd "
        "from runs order by created_at"
    ).fetchall()
    assert [r[:4] for r in by_run] == [
        ("support_wf", "support_wf", 3, tokens),
        ("polos_agent", "support_wf", 3, tokens),
    ]
    assert all(abs(r[4] - spent) < 1e-12 for r in by_run)
    # The documented question "what does each workflow cost per run" answers support_wf.
    per_run = con.execute(_doc_query("costs per run")).fetchall()
    assert len(per_run) == 1 and per_run[0][:3] == ("support_wf", 1, 3)
    assert abs(per_run[0][3] - round(spent, 6)) < 1e-12
    per_model = con.execute(_doc_query("per workflow and model")).fetchall()
    assert [r[:4] for r in per_model] == [("support_wf", "support", "gpt-4o", 3)]

    exporter_spans = InMemorySpanExporter()
    async with SpanFollower(env.as_role("service"), exporter=exporter_spans) as follower:
        await follower.process_available()
    spans = exporter_spans.get_finished_spans()
    names = sorted(s.name for s in spans)
    assert names == sorted(
        [
            "run support_wf",
            "run polos_agent",
            "chat gpt-4o",
            "chat gpt-4o",
            "chat gpt-4o",
            "execute_tool lookup_order",
            "execute_tool refund",
            "wait child resolve",
            "step resolve/stopped",  # the agent's stop record
        ]
    )
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
    # Every chat span names what its cost rolls up to; run spans carry the totals.
    assert {
        (s.attributes["polos.root_run_id"], s.attributes["polos.root_workflow"]) for s in chat
    } == {(h.run_id, "support_wf")}
    for run_span in runs.values():
        assert run_span.attributes["polos.total.llm_calls"] == 3
        assert run_span.attributes["polos.total.tokens"] == tokens
        assert abs(run_span.attributes["polos.total.cost_usd"] - spent) < 1e-9
    assert runs["run polos_agent"].attributes["gen_ai.agent.name"] == "support"
    # A follower that forgets runs between their events (a restart, a full cache) reads the
    # totals back from the log: the same figures.
    forgetful = InMemorySpanExporter()
    async with SpanFollower(
        env.as_role("service"), exporter=forgetful, batch=2, cache_size=1, position_key="forgetful"
    ) as follower:
        await follower.process_available()
    again = {s.name: s for s in forgetful.get_finished_spans() if s.name.startswith("run ")}
    for name, run_span in runs.items():
        for attr in ("polos.total.llm_calls", "polos.total.tokens", "polos.root_workflow"):
            assert again[name].attributes[attr] == run_span.attributes[attr], (name, attr)
        assert abs(again[name].attributes["polos.total.cost_usd"] - spent) < 1e-9

    tree = "\n".join(await trace_lines(env.client.nc, env.client.names, h.run_id))
    print(tree)
    assert "child run " in tree and "polos_agent  completed" in tree
    # The root run (no LLM call of its own) shows what it cost with its agent.
    assert tree.splitlines()[0].endswith(
        f"total with 1 child run: 3 llm calls  tokens {tokens}  cost ${spent:.4f}"
    )
    assert "decision: chose lookup_order of [lookup_order, refund, escalate]" in tree
    assert 'reason: "need the order state"' in tree


triage = Agent(
    "decider",
    model="gpt-4o",
    instructions="You resolve refunds.",
    tools=[lookup_order, refund, escalate],
)
triage_streaming = Agent(
    "decider_streaming",
    model="gpt-4o",
    instructions="You resolve refunds.",
    tools=[lookup_order, refund, escalate],
    stream=True,
)


@workflow
async def triage_wf(ctx: WorkflowContext, streaming: bool) -> str:
    agent = triage_streaming if streaming else triage
    r = await ctx.step.agent_invoke_and_wait("triage", agent.with_input("refund o-7"))
    return str(r.result)


@pytest.mark.parametrize("streaming", [False, True])
async def test_parallel_decisions_name_only_unchosen_alternatives_and_keep_the_reason(
    env_factory: Any, llm: DevLLM, tmp_path: Path, streaming: bool
) -> None:
    for agent in (triage, triage_streaming):
        agent.config = agent.config.__class__(**{**agent.config.__dict__, "base_url": llm.url})
    llm.script(
        # Two tools at once, with the model's text before the calls.
        Reply.tools(
            ("lookup_order", {"order_id": "o-7"}),
            ("refund", {"order_id": "o-7", "amount": 40}),
            content="Look the order up and refund it in one go.",
        ),
        # A reasoning model's reasoning, no text (streamed the way Ollama sends it).
        Reply.tools(
            ("escalate", {"reason": "asked for a human"}),
            reasoning="Refund done, but the customer asked for a person.",
            reasoning_as="reasoning" if streaming else "reasoning_content",
        ),
        # A final answer: no decision, so no reason (the answer is not one).
        Reply.text("Refunded 40 and escalated."),
    )
    env = await env_factory([triage_wf, agent_workflow])
    h = await env.client.start(triage_wf, streaming)
    assert await h.result(timeout=20) == "Refunded 40 and escalated."

    out = tmp_path / "export"
    async with Exporter(env.as_role("service"), out) as exporter:
        await exporter.export_once()
    con = analytics.connect(out)
    rows = con.execute(
        "select decision, chosen_tool, alternatives, reason from decisions "
        "order by seq, chosen_tool"
    ).fetchall()
    print(rows)
    both = "Look the order up and refund it in one go."
    why = "Refund done, but the customer asked for a person."
    assert rows == [
        ("triage/llm/1", "lookup_order", ["escalate"], both),
        ("triage/llm/1", "refund", ["escalate"], both),
        ("triage/llm/2", "escalate", ["lookup_order", "refund"], why),
    ]
    # The record is written with the call, in the llm step's meta.
    choices = con.execute(
        "select key, meta->'choice' from steps where kind = 'llm' order by seq"
    ).fetchall()
    assert [(k, orjson.loads(c)) for k, c in choices] == [
        (
            "triage/llm/1",
            {"chosen": ["lookup_order", "refund"], "alternatives": ["escalate"], "reason": both},
        ),
        (
            "triage/llm/2",
            {
                "chosen": ["escalate"],
                "alternatives": ["lookup_order", "refund"],
                "reason": why,
                "reasoning": why,  # said as reasoning_content: kept whole beside the reason
            },
        ),
        (
            "triage/llm/3",
            {"chosen": [], "alternatives": ["lookup_order", "refund", "escalate"], "reason": None},
        ),
    ]
    assert con.execute(
        "select key, alternatives, reason from llm_calls order by seq"
    ).fetchall() == [
        ("triage/llm/1", ["escalate"], both),
        ("triage/llm/2", ["lookup_order", "refund"], why),
        ("triage/llm/3", ["lookup_order", "refund", "escalate"], None),
    ]

    spans = InMemorySpanExporter()
    async with SpanFollower(env.as_role("service"), exporter=spans) as follower:
        await follower.process_available()
    chat = sorted(
        (s for s in spans.get_finished_spans() if s.name == "chat gpt-4o"),
        key=lambda s: s.attributes["polos.seq"],
    )
    assert [
        (
            tuple(s.attributes["polos.decision.chosen"]),
            tuple(s.attributes["polos.decision.alternatives"]),
            s.attributes["polos.decision.reason"],
        )
        for s in chat[:2]
    ] == [
        (("lookup_order", "refund"), ("escalate",), both),
        (("escalate",), ("lookup_order", "refund"), why),
    ]
    assert "polos.decision.reason" not in chat[2].attributes

    tree = "\n".join(await trace_lines(env.client.nc, env.client.names, h.run_id))
    print(tree)
    assert "decision: chose lookup_order, refund of [lookup_order, refund, escalate]" in tree
    assert f'reason: "{both}"' in tree and f'reason: "{why}"' in tree
    assert tree.count("reason: ") == 2
