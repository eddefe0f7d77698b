"""``polos.events`` and ``polos.schedules`` under the original's names, under authentication:
published as the client role, streamed live (JetStream ordered consumers), a run's history as
the original's event types."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from typing import Any

import pytest

from polos import (
    Agent,
    Polos,
    RunNotFoundError,
    WorkflowContext,
    events,
    schedules,
    workflow,
)
from polos.devllm import DevLLM, Reply
from polos.features import events as features_events
from polos.features import schedules as features_schedules
from polos.testing import PolosEnvironment, RoleSettings

pytestmark = pytest.mark.slow


@workflow(name="pe_child")
async def pe_child(ctx: WorkflowContext, n: int) -> int:
    return await ctx.step.run("square", lambda: n * n)


@workflow(name="pe_flow")
async def pe_flow(ctx: WorkflowContext, n: int) -> dict[str, Any]:
    first = await ctx.step.run("first", lambda: n + 1)
    answer = await ctx.step.suspend("approve", data={"n": first})
    squared = await ctx.step.invoke_and_wait("child", pe_child, first)
    return {"first": first, "approved": answer.data["ok"], "squared": squared}


@workflow(name="pe_listener")
async def pe_listener(ctx: WorkflowContext, topic: str) -> Any:
    got = await ctx.step.wait_for_event("order", topic)
    return got.data


pe_talker = Agent("pe_talker", stream=True)


@workflow(name="pe_talk")
async def pe_talk(ctx: WorkflowContext, text: str) -> str:
    said = await ctx.step.agent_invoke_and_wait("talk", pe_talker.with_input(text))
    return str(said.result)


async def _collect(stream: Any, into: list[Any], limit: int) -> None:
    async for item in stream:
        into.append(item)
        if len(into) >= limit:
            return


async def test_the_original_module_paths() -> None:
    assert features_events.publish is events.publish
    assert events.events.publish is events.publish  # the original's convenience object
    assert events.events.stream_workflow is events.stream_workflow
    assert events.Event(id="1", sequence_id=1, topic="t").status == "valid"
    assert features_schedules.create is schedules.create
    from polos import BatchEventPayload, EventPayload, SchedulePayload

    assert BatchEventPayload is events.BatchEventPayload
    assert EventPayload is events.EventPayload
    assert SchedulePayload is schedules.SchedulePayload


async def test_publish_batch_publish_and_stream_topic(
    stack: PolosEnvironment, settings: RoleSettings
) -> None:
    client = stack.client  # the client role publishes and streams
    first = await events.publish(
        client, "orders/created", events.EventData(event_type="created", data={"id": 1})
    )
    more = await events.batch_publish(
        client,
        "orders/created",
        [events.EventData(data={"id": 2}), {"event_type": "created", "data": {"id": 3}}],
    )
    assert more == sorted(more) and more[0] > first
    assert await events.batch_publish(client, "orders/created", []) == []

    got: list[events.StreamEvent] = []
    await asyncio.wait_for(
        _collect(events.stream_topic(client, "orders/created", last_sequence_id=first - 1), got, 3),
        20,
    )
    assert [(e.sequence_id, e.event_type, e.data) for e in got] == [
        (first, "created", {"id": 1}),
        (more[0], None, {"id": 2}),
        (more[1], "created", {"id": 3}),
    ]
    assert all(e.topic == "orders/created" and e.created_at for e in got)

    # Live: with no cursor it starts now and sees what comes next, without polling.
    live: list[events.StreamEvent] = []
    task = asyncio.create_task(_collect(events.stream_topic(client, "orders/created"), live, 1))
    await asyncio.sleep(0.3)  # let the consumer be created before publishing
    seq = await events.publish(client, "orders/created", events.EventData(data={"id": 4}))
    await asyncio.wait_for(task, 20)
    assert [(e.sequence_id, e.data) for e in live] == [(seq, {"id": 4})]

    with pytest.raises(ValueError, match="execution_id not supported"):
        await events.publish(client, "t", events.EventData(data={}), execution_id="x")
    with pytest.raises(TypeError, match="expected EventData"):
        await events.publish(client, "t", "not an event")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_publish event 0: not an EventData"):
        await events.batch_publish(client, "t", [{"event_type": "x"}])


async def test_a_published_event_reaches_wait_for_event(
    stack: PolosEnvironment, settings: RoleSettings
) -> None:
    await stack.add_worker([pe_listener])
    handle = await stack.client.start(pe_listener, "pickup/7")
    for _ in range(400):  # once it waits (before: not recorded yet, or not there yet)
        with contextlib.suppress(RunNotFoundError):
            if (await handle.info()).status == "suspended":
                break
        await asyncio.sleep(0.05)
    await events.publish(
        stack.client, "pickup/7", events.EventData(event_type="picked", data={"dock": 4})
    )
    assert await handle.result(timeout=20) == {"dock": 4}  # the data, not an envelope


async def test_stream_workflow_follows_a_run_and_its_child_to_the_end(
    stack: PolosEnvironment, settings: RoleSettings
) -> None:
    async with Polos(settings=settings) as polos:
        handle = await pe_flow.invoke(polos, 2)
        seen: list[events.StreamEvent] = []

        async def follow() -> None:
            async for event in events.stream_workflow(
                polos, handle.root_workflow_id or "", handle.id
            ):
                seen.append(event)
                if event.event_type == "suspend_approve":
                    # As the original's examples do: resume from what the stream showed.
                    assert event.data["n"] == 3
                    await polos.resume(
                        suspend_workflow_id="pe_flow",
                        suspend_execution_id=handle.id,
                        suspend_step_key="approve",
                        data={"ok": True},
                    )

        await asyncio.wait_for(follow(), 30)  # it ends by itself after the run's finish
        types = [e.event_type for e in seen]
        assert types[0] == "workflow_start" and types[-1] == "workflow_finish"
        assert seen[0].data["payload"] == 2
        assert seen[-1].data["result"] == {"first": 3, "approved": True, "squared": 9}
        assert seen[-1].data["_metadata"]["execution_id"] == handle.id
        for kind in ("step_start", "step_finish", "suspend_approve", "resume_approve"):
            assert kind in types, types
        # The child's own events, on the same stream, named by their execution.
        child = [e for e in seen if e.data["_metadata"]["workflow_id"] == "pe_child"]
        assert [e.event_type for e in child] == [
            "workflow_start",
            "step_start",
            "step_finish",
            "workflow_finish",
        ]
        assert child[-1].data["result"] == 9
        assert all(e.topic == f"workflow/pe_flow/{handle.id}" for e in seen)

        # Resumed after a sequence id: only what came after it (the stream's end included).
        cut = next(e for e in seen if e.event_type == "resume_approve")
        later: list[events.StreamEvent] = []
        async for event in events.stream_workflow(
            polos, "pe_flow", handle.id, last_sequence_id=cut.sequence_id
        ):
            later.append(event)
        assert later and all(e.sequence_id > cut.sequence_id for e in later)
        assert later[-1].event_type == "workflow_finish"


async def test_stream_workflow_ends_on_failure_too(
    stack: PolosEnvironment, settings: RoleSettings
) -> None:
    async with Polos(settings=settings) as polos:
        handle = await polos.invoke("pe_child", "not a number")
        types = []
        async with asyncio.timeout(30):
            async for event in events.stream_workflow(polos, "pe_child", handle.id):
                types.append(event.event_type)
        assert types[0] == "workflow_start" and types[-1] == "workflow_fail"


async def test_schedules_create_upserts_a_keyed_cron_schedule(
    stack: PolosEnvironment, settings: RoleSettings
) -> None:
    client = stack.client
    sid = await schedules.create(client, workflow="pe_child", cron="0 3 * * *")
    assert sid == "pe_child--global"
    again = await schedules.create(
        client, workflow=pe_child, cron="30 4 * * *", timezone="Europe/Paris", key="user-42"
    )
    assert again == "pe_child--user-42"
    await schedules.create(client, workflow="pe_child", cron="15 5 * * *")  # replaces global
    found = {s["key"]: s for s in await client.list_schedules()}
    assert found[sid]["cron"] == "15 5 * * *" and found[sid]["timezone"] == "UTC"
    assert found[again]["timezone"] == "Europe/Paris" and found[again]["workflow"] == "pe_child"
    with pytest.raises(ValueError, match="schedule key 'a b'"):
        await schedules.create(client, workflow="pe_child", cron="0 3 * * *", key="a b")
    with pytest.raises(ValueError, match="unknown time zone"):
        await schedules.create(client, workflow="pe_child", cron="0 3 * * *", timezone="Mars/X")
    with contextlib.suppress(Exception):
        await client.delete_schedule(sid)
    assert await client.delete_schedule(again) is True


async def test_polos_serves_a_defined_agent_and_the_stream_carries_its_text(
    stack: PolosEnvironment, settings: RoleSettings
) -> None:
    """The agent is defined, not handed to anyone: Polos serves it (its child run) and
    ``stream_workflow`` yields its live text as ``text_delta`` between its start and finish."""
    text = "Durable agents stream their words while the log keeps the final message."
    async with DevLLM() as llm:
        pe_talker.config = dataclasses.replace(pe_talker.config, base_url=llm.url)
        llm.script(Reply.text(text))
        async with Polos(settings=settings) as polos:
            run_id = uuid.uuid4().hex
            seen: list[events.StreamEvent] = []
            # Deltas are live only: follow before the run starts.
            follow = asyncio.create_task(
                _collect(events.stream_workflow(polos, "pe_talk", run_id), seen, 10_000)
            )
            await asyncio.sleep(0.5)
            handle = await polos.start(pe_talk, "talk to me", run_id=run_id)
            assert await handle.result(timeout=30) == text
            await asyncio.wait_for(follow, 30)  # ended by itself at the run's finish
    types = [e.event_type for e in seen]
    assert types[0] == "workflow_start" and types[-1] == "workflow_finish"
    start, finish = types.index("agent_start"), types.index("agent_finish")
    deltas = [e for e in seen if e.event_type == "text_delta"]
    assert len(deltas) > 3 and "".join(d.data["content"] for d in deltas) == text
    assert all(start < types.index("text_delta") < finish for _ in deltas[:1])
    assert [d.data["chunk_index"] for d in deltas] == list(range(len(deltas)))
    assert seen[finish].data["_metadata"]["workflow_id"] == "polos_agent"
