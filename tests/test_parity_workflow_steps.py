"""``ctx.step`` in the original Polos SDK's signatures and return shapes, and the context's
attributes, each through a real orchestrator, scheduler and worker under authentication
(every component as its own role)."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pydantic
import pytest

from polos import (
    Agent,
    BatchStepResult,
    BatchWorkflowInput,
    StepExecutionError,
    WorkflowContext,
    workflow,
)
from polos import history as ev
from polos._private.run.waits import child_run_id
from polos._private.store import MSG_ID
from polos.agent import AgentResult, agent_workflow
from polos.devllm import DevLLM, Reply
from tests.test_waiting import until_status

SEEN: dict[str, Any] = {}


# --------------------------------------------------------------------------- run


def flaky(n: int, **kwargs: Any) -> int:
    SEEN.setdefault("kwargs", []).append(kwargs)
    SEEN["calls"] = SEEN.get("calls", 0) + 1
    if SEEN["calls"] < 3:
        raise RuntimeError(f"try {SEEN['calls']}")
    return n * 2


def always_fails() -> None:
    raise RuntimeError("card declined")


@workflow(id="p_run")
async def p_run(ctx: WorkflowContext, n: int) -> dict[str, Any]:
    doubled = await ctx.step.run(
        "flaky", flaky, n, max_retries=2, base_delay=0.01, max_delay=0.02, note="kept"
    )
    try:
        await ctx.step.run("charge", always_fails, max_retries=0)
    except StepExecutionError as exc:
        caught = str(exc)
    return {"doubled": doubled, "caught": caught}


async def test_run_takes_max_retries_base_delay_max_delay_for_itself(env_factory: Any) -> None:
    SEEN.clear()
    env = await env_factory([p_run])
    handle = await env.client.start(p_run, 21)
    out = await handle.result(timeout=20)
    assert out["doubled"] == 42 and "card declined" in out["caught"]
    assert SEEN["calls"] == 3  # max_retries=2: three tries
    assert SEEN["kwargs"] == [{"note": "kept"}] * 3  # the step's options never reach fn
    # The run's own history (the run index, a projection, may not have the run yet).
    history = await env.client.history(handle.run_id)
    charge = [e for _, e in history if isinstance(e, ev.StepFailed) and e.key == "charge"]
    assert charge and charge[0].attempts == 1  # max_retries=0: tried once


# --------------------------------------------------------------------------- determinism, time


@workflow(id="p_values")
async def p_values(ctx: WorkflowContext) -> dict[str, Any]:
    now = await ctx.step.now("now")
    token = await ctx.step.uuid("token")
    dice = await ctx.step.random("dice")
    with ctx.step.trace("compute", {"what": "sum"}) as span:
        assert span is not None
    await ctx.step.suspend("gate")  # everything above replays after the resume
    return {"now": now, "token": token, "dice": dice}


async def test_now_is_epoch_ms_and_values_replay_unchanged(env_factory: Any) -> None:
    env = await env_factory([p_values])
    before = int(datetime.now(UTC).timestamp() * 1000)
    handle = await env.client.start(p_values)
    await until_status(env, handle.run_id, "suspended")
    recorded = {
        e.key: e.output
        for _, e in await env.client.history(handle.run_id)
        if isinstance(e, ev.StepCompleted)
    }
    await env.client.resume(handle.run_id, "gate", None)
    out = await handle.result(timeout=20)
    assert isinstance(out["now"], int) and before - 5 <= out["now"] <= before + 60_000
    assert out["now"] == int(float(recorded["now"]) * 1000)
    assert out["token"] == recorded["token"] and out["dice"] == recorded["dice"]


@workflow(id="p_waits")
async def p_waits(ctx: WorkflowContext) -> list[Any]:
    first = await ctx.step.wait_for("short", seconds=0.1, minutes=0.002)
    naive_soon = datetime.now(UTC).replace(tzinfo=None) + timedelta(seconds=0.2)
    second = await ctx.step.wait_until("until", naive_soon)
    errors = []
    for key, call in (
        ("zero", lambda: ctx.step.wait_for("zero", seconds=0)),
        ("past", lambda: ctx.step.wait_until("past", datetime(2001, 1, 1))),
    ):
        try:
            await call()
        except StepExecutionError as exc:
            errors.append(f"{key}: {exc}")
    return [first, second, errors]


async def test_wait_for_units_and_wait_until(env_factory: Any) -> None:
    env = await env_factory([p_waits])
    first, second, errors = await (await env.client.start(p_waits)).result(timeout=20)
    assert first is None and second is None
    assert "must be positive" in errors[0] and "is in the past" in errors[1]


# --------------------------------------------------------------------------- suspend, resume


@workflow(id="p_approval")
async def p_approval(ctx: WorkflowContext) -> dict[str, Any]:
    resume = await ctx.step.suspend("approve_deploy", data={"title": "deploy?"}, timeout=3600)
    # As the original's examples read it, and as ours does.
    return {
        "get": resume.get("data"),
        "item": resume["data"]["approved"],
        "attr": resume.data,
        "type": resume["event_type"],
        "has": "data" in resume,
    }


@workflow(id="p_resumer")
async def p_resumer(ctx: WorkflowContext, target: str) -> str:
    await ctx.step.resume("ok", "approve_deploy", target, "p_approval", {"approved": True})
    return "sent"


async def test_suspend_reads_as_the_resume_event_and_step_resume(env_factory: Any) -> None:
    env = await env_factory([p_approval, p_resumer])
    waiting = await env.client.start(p_approval)
    await until_status(env, waiting.run_id, "suspended")
    assert await (await env.client.start(p_resumer, waiting.run_id)).result(timeout=20) == "sent"
    assert await waiting.result(timeout=20) == {
        "get": {"approved": True},
        "item": True,
        "attr": {"approved": True},
        "type": "resume_approve_deploy",
        "has": True,
    }


# --------------------------------------------------------------------------- events


@workflow(id="p_events")
async def p_events(ctx: WorkflowContext, topic: str) -> dict[str, Any]:
    await ctx.step.publish_event("announce", topic=topic, data={"n": 1}, event_type="created")
    got = await ctx.step.wait_for_event("hear", topic=topic, timeout=30)
    await ctx.step.publish_workflow_event("progress", {"half": True}, event_type="progress")
    mine = await ctx.step.wait_for_event(
        "own", topic=f"workflow/{ctx.root_workflow_id}/{ctx.root_execution_id}"
    )
    return {
        "topic": got.topic,
        "type": got.event_type,
        "data": got.data,
        "seq": got.sequence_id,
        "own": [mine.event_type, mine.data],
    }


async def test_publish_event_wait_for_event_and_the_workflow_topic(env_factory: Any) -> None:
    env = await env_factory([p_events])
    handle = await env.client.start(p_events, "deploys.done")
    out = await handle.result(timeout=20)
    assert out["topic"] == "deploys.done" and out["type"] == "created" and out["data"] == {"n": 1}
    assert isinstance(out["seq"], int) and out["seq"] > 0
    assert out["own"] == ["progress", {"half": True}]
    published = [
        e
        for _, e in await env.client.history(handle.run_id)
        if isinstance(e, ev.StepCompleted) and e.kind == "publish"
    ]
    assert [e.key for e in published] == ["announce", "progress"]  # each recorded once


# --------------------------------------------------------------------------- children


@workflow(id="p_child")
async def p_child(ctx: WorkflowContext, x: int) -> dict[str, Any]:
    if x < 0:
        raise ValueError(f"negative: {x}")
    return {
        "x": x,
        "root": ctx.root_execution_id,
        "root_wf": ctx.root_workflow_id,
        "parent": ctx.parent_execution_id,
        "session": ctx.session_id,
        "user": ctx.user_id,
    }


@workflow(id="p_parent")
async def p_parent(ctx: WorkflowContext) -> dict[str, Any]:
    one = await ctx.step.invoke_and_wait(
        "one", p_child, 1, queue="lane", concurrency_key="tenant-1"
    )
    started = await ctx.step.invoke("fire", "p_child", 2)
    handles = await ctx.step.batch_invoke(
        "fan",
        [BatchWorkflowInput(id="p_child", payload=3), BatchWorkflowInput(id="p_child", payload=4)],
    )
    results = await ctx.step.batch_invoke_and_wait(
        "gather",
        [BatchWorkflowInput(id="p_child", payload=5), BatchWorkflowInput(id="p_child", payload=-1)],
    )
    try:
        await ctx.step.invoke("bad", p_child, 9, run_timeout_seconds=5)
    except ValueError as exc:
        refused = str(exc)
    return {
        "one": one,
        "started": started.id,
        "handles": [h.id for h in handles],
        "results": [r.model_dump() for r in results],
        "types": [type(r).__name__ for r in results],
        "refused": refused,
        "me": [ctx.execution_id, ctx.workflow_id, ctx.session_id, ctx.user_id, ctx.retry_count],
    }


async def test_children_options_batch_results_and_the_context(env_factory: Any) -> None:
    env = await env_factory([p_parent, p_child])
    # A start carrying a session and a user (what the original's invoke(session_id=...) sends).
    run_id = "parent-with-session"
    await env.client.js.publish(
        f"{env.prefix}.cmd.start.p_parent",
        orjson.dumps({"run_id": run_id, "session_id": "s-9", "user_id": "u-4"}),
        headers={MSG_ID: f"start/{run_id}", "Polos-Client": "test"},
    )
    out = await env.client.get_handle(run_id).result(timeout=30)
    assert out["me"] == [run_id, "p_parent", "s-9", "u-4", 0]
    assert out["one"] == {
        "x": 1,
        "root": run_id,
        "root_wf": "p_parent",
        "parent": run_id,
        "session": "s-9",
        "user": "u-4",
    }
    one_id = child_run_id(run_id, "one", 0)  # the same id every time the parent gets there
    requested = (await env.client.history(one_id))[0][1]
    assert (requested.queue, requested.concurrency_key) == ("lane", "tenant-1")
    for child in [out["started"], *out["handles"]]:
        assert (await env.client.get_handle(child).result(timeout=20))["parent"] == run_id
    ok, failed = out["results"]
    assert out["types"] == ["BatchStepResult", "BatchStepResult"]
    assert ok["success"] is True and ok["result"]["x"] == 5 and ok["workflow_id"] == "p_child"
    assert failed["success"] is False and "negative: -1" in failed["error"]
    assert "run_timeout_seconds is not supported" in out["refused"]


# --------------------------------------------------------------------------- agents


class Verdict(pydantic.BaseModel):
    ok: bool


judge = Agent("p_judge", instructions="Judge.", output_type=Verdict)


@workflow(id="p_agents")
async def p_agents(ctx: WorkflowContext) -> dict[str, Any]:
    fired = await ctx.step.agent_invoke("fire", judge.with_input("first"))
    handles = await ctx.step.batch_agent_invoke("fan", [judge.with_input("second")])
    results = await ctx.step.batch_agent_invoke_and_wait(
        "both", [judge.with_input("third"), judge.with_input("fourth")]
    )
    assert all(isinstance(r, BatchStepResult) for r in results)
    assert all(isinstance(r.result, AgentResult) for r in results)
    return {
        "fired": fired.id,
        "handles": [h.id for h in handles],
        "verdicts": [r.result.result.ok for r in results],
        "typed": [isinstance(r.result.result, Verdict) for r in results],
    }


async def test_agents_as_children_fire_and_forget_and_batched(env_factory: Any) -> None:
    async with DevLLM() as llm:
        judge.config = dataclasses.replace(judge.config, base_url=llm.url)
        llm.script(*[Reply.json({"ok": True}) for _ in range(4)])
        env = await env_factory([p_agents, agent_workflow])
        out = await (await env.client.start(p_agents)).result(timeout=30)
        assert out["verdicts"] == [True, True] and out["typed"] == [True, True]
        for child in [out["fired"], *out["handles"]]:
            done = await env.client.get_handle(child).result(timeout=20)
            assert done["agent"] == "p_judge"


def test_batch_items_are_checked_before_anything_runs() -> None:
    from polos.workflow import _batch_items, _child_options

    with pytest.raises(TypeError, match="BatchWorkflowInput"):
        _batch_items("batch_invoke('k')", [42])
    with pytest.raises(TypeError, match="not both"):
        _batch_items("batch_invoke('k')", [BatchWorkflowInput(id="a"), ("a", 1)])
    with pytest.raises(ValueError, match="run_timeout_seconds is not supported"):
        _child_options("invoke('k')", run_timeout_seconds=3)
    with pytest.raises(TypeError, match="initial_state must be a dict"):
        _child_options("invoke('k')", initial_state=[1])
    assert asyncio.iscoroutinefunction(p_parent.fn)
