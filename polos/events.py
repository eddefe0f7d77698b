"""Events, under the original Polos's names: publish to a topic, stream a topic, stream a run.

::

    from polos import events

    seq = await events.publish(polos, "orders/created", events.EventData(
        event_type="order_created", data={"id": "A-1"}))
    async for event in events.stream_workflow(polos, "process_order", handle.id):
        print(event.event_type, event.data)

A topic's events are messages of the events stream (``<prefix>.event.<topic>``, see
docs/waiting.md), so ``ctx.step.wait_for_event`` and event triggers see what ``publish``
sends; ``sequence_id`` is the message's stream sequence. Streams are live: each is a JetStream
ordered consumer, no polling.

``stream_workflow`` turns a run's history (and its children's, and its agents' live text)
into the original's event types: ``workflow_start`` / ``agent_start``, ``step_start`` and
``step_finish`` (both when the step's outcome is recorded), ``suspend_<key>`` (with the
suspend's data), ``resume_<key>``, ``text_delta`` (agents with ``stream=True``),
``workflow_finish`` / ``agent_finish``; and, where the original's stream would never end,
``workflow_fail`` and ``workflow_cancel``. Unlike the original, it starts at the run's
beginning (no event published before the call is missed) and ends when the run ends, however
it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
import pydantic
from nats.js.api import ConsumerConfig, DeliverPolicy

from polos import history as ev
from polos._private.model.values import BatchEventPayload, EventItem, EventPayload
from polos._private.store import payloads
from polos._private.store.tokens import event_subject, iso_time, topic_from_subject

if TYPE_CHECKING:
    from nats.aio.msg import Msg

    from polos.client import PolosClient

# The header that carries an event's type (``EventData.event_type``): the body stays the data
# itself, so raw publishers and ``wait_for_event`` see the same JSON as before.
EVENT_TYPE_HEADER = payloads.EVENT_TYPE


class EventData(pydantic.BaseModel):
    """One event to publish: its type (optional) and its data."""

    event_type: str | None = None
    data: dict[str, Any]


# EventPayload, EventItem and BatchEventPayload are the model's (what a triggered run and
# wait_for_event receive): one definition, re-exported here under the original's module.


class StreamEvent(pydantic.BaseModel):
    """One event of ``stream_topic`` / ``stream_workflow``."""

    id: str
    sequence_id: int
    topic: str
    event_type: str | None = None
    data: dict[str, Any] = {}
    created_at: str | None = None


@dataclass
class Event:
    """An event as the original's plain class describes one (nothing here returns it: the
    streams yield ``StreamEvent``); kept so code that builds or annotates with it runs."""

    id: str
    sequence_id: int
    topic: str
    event_type: str | None = None
    data: dict[str, Any] | None = None
    status: str = "valid"
    execution_id: str | None = None
    attempt_number: int = 0
    created_at: datetime | None = None


def _refuse(where: str, **options: Any) -> None:
    given = [n for n, v in options.items() if v is not None]
    if given:
        raise ValueError(
            f"{where}: {', '.join(given)} not supported here (an event belongs to its topic)"
        )


def _event_data(value: EventData | dict[str, Any], where: str) -> EventData:
    if isinstance(value, EventData):
        return value
    if isinstance(value, dict):
        try:
            return EventData.model_validate(value)
        except pydantic.ValidationError as exc:
            raise ValueError(f"{where}: not an EventData: {exc.errors()[0]['msg']}") from None
    raise TypeError(f"{where}: expected EventData(event_type=..., data={{...}}), got {value!r}")


async def publish(
    client: PolosClient,
    topic: str,
    event_data: EventData | dict[str, Any],
    execution_id: str | None = None,
    root_execution_id: str | None = None,
) -> int:
    """Publish one event on ``topic``; returns its sequence id."""
    _refuse("publish", execution_id=execution_id, root_execution_id=root_execution_id)
    one = _event_data(event_data, "publish")
    return await client.publish_event(topic, one.data, event_type=one.event_type)


async def batch_publish(
    client: PolosClient,
    topic: str,
    events: list[EventData | dict[str, Any]],
    execution_id: str | None = None,
    root_execution_id: str | None = None,
) -> list[int]:
    """Publish events on ``topic`` in order; their sequence ids (``[]`` for none)."""
    _refuse("batch_publish", execution_id=execution_id, root_execution_id=root_execution_id)
    checked = [_event_data(e, f"batch_publish event {i}") for i, e in enumerate(events)]
    return [await client.publish_event(topic, e.data, event_type=e.event_type) for e in checked]


def _start(last_sequence_id: int | None, last_timestamp: datetime | None) -> ConsumerConfig:
    """Where a stream starts: after ``last_sequence_id`` (it wins), else at ``last_timestamp``,
    else ``None`` (each caller's default)."""
    if last_sequence_id is not None:
        return ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=last_sequence_id + 1
        )
    if last_timestamp is not None:
        stamp = last_timestamp if last_timestamp.tzinfo else last_timestamp.replace(tzinfo=UTC)
        return ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_TIME,
            opt_start_time=stamp,
        )
    return ConsumerConfig(deliver_policy=DeliverPolicy.ALL)


def _created(msg: Msg) -> str | None:
    stamp = msg.metadata.timestamp
    return iso_time(stamp.timestamp()) if stamp else None


async def stream_topic(
    client: PolosClient,
    topic: str,
    last_sequence_id: int | None = None,
    last_timestamp: datetime | None = None,
) -> AsyncIterator[StreamEvent]:
    """The events of ``topic`` as they are published, for as long as the caller iterates:
    after ``last_sequence_id``, else from ``last_timestamp``, else from now on (as in the
    original: a topic's history may be long)."""
    config = _start(last_sequence_id, last_timestamp)
    if last_sequence_id is None and last_timestamp is None:
        config = ConsumerConfig(deliver_policy=DeliverPolicy.NEW)
    sub = await client.js.subscribe(
        event_subject(client.names, topic),
        stream=client.names.events_stream,
        ordered_consumer=True,
        config=config,
    )
    try:
        while True:
            msg = await sub.next_msg(timeout=None)
            headers = msg.headers or {}
            try:
                value = await payloads.event_value(client.js, client.names, headers, msg.data)
            except Exception:
                continue  # not JSON, or its object is gone: nothing to hand on
            seq = msg.metadata.sequence.stream
            yield StreamEvent(
                id=headers.get("Nats-Msg-Id") or str(seq),
                sequence_id=seq,
                topic=topic_from_subject(client.names, msg.subject),
                event_type=headers.get(EVENT_TYPE_HEADER),
                data=value if isinstance(value, dict) else {"value": value},
                created_at=_created(msg),
            )
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


# --------------------------------------------------------------------------- a run's events

_AGENT_WORKFLOW = "polos_agent"
_END = object()


class _RunFollower:
    """Follows a run and every descendant it starts (one ordered consumer per run, all into
    one queue) and the root's live agent deltas (core NATS)."""

    def __init__(self, client: PolosClient, root_workflow: str, root_run_id: str) -> None:
        self.client = client
        self.topic = f"workflow/{root_workflow}/{root_run_id}"
        self.root = root_run_id
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.subs: list[Any] = []
        self.following: set[str] = set()
        self.workflows: dict[str, str] = {}

    async def follow(self, run_id: str, config: ConsumerConfig) -> None:
        if run_id in self.following:
            return
        self.following.add(run_id)
        names = self.client.names

        async def on_msg(msg: Msg) -> None:
            self.queue.put_nowait((run_id, msg))

        self.subs.append(
            await self.client.js.subscribe(
                names.run_filter(run_id),
                stream=names.runs_stream,
                ordered_consumer=True,
                config=config,
                cb=on_msg,
            )
        )

    async def follow_deltas(self) -> None:
        async def on_delta(msg: Msg) -> None:
            self.queue.put_nowait((None, msg))

        self.subs.append(
            await self.client.nc.subscribe(
                f"{self.client.names.prefix}.stream.{self.root}.>", cb=on_delta
            )
        )

    async def close(self) -> None:
        for sub in self.subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    def event(
        self, seq: int, event_type: str, data: dict[str, Any], created: str | None
    ) -> StreamEvent:
        return StreamEvent(
            id=f"{seq}:{event_type}",
            sequence_id=seq,
            topic=self.topic,
            event_type=event_type,
            data=data,
            created_at=created,
        )

    def translate(self, run_id: str, msg: Msg) -> tuple[list[StreamEvent], list[str]]:
        """A history message as the original's events, and the child runs it names."""
        try:
            event = ev.decode(msg.data)
        except ev.EventDecodeError:
            return [], []
        seq = msg.metadata.sequence.stream
        created = _created(msg)
        if isinstance(event, ev.RunRequested):
            self.workflows[run_id] = event.workflow
        workflow = self.workflows.get(run_id)
        kind = "agent" if workflow == _AGENT_WORKFLOW else "workflow"
        meta = {"execution_id": run_id, "workflow_id": workflow}
        out: list[StreamEvent] = []
        children: list[str] = []
        if isinstance(event, ev.RunRequested):
            out.append(
                self.event(
                    seq, f"{kind}_start", {"payload": event.input, "_metadata": meta}, created
                )
            )
        elif isinstance(event, ev.StepCompleted | ev.StepFailed):
            body: dict[str, Any] = {"step_key": event.key, "step_type": event.kind}
            out.append(self.event(seq, "step_start", {**body, "_metadata": meta}, created))
            if isinstance(event, ev.StepCompleted):
                body["data"] = {"result": event.output}
                if event.kind == "invoke" and isinstance(event.output, dict):
                    children.append(str(event.output.get("run_id")))
            else:
                body["data"] = {"error": event.error}
            out.append(self.event(seq, "step_finish", {**body, "_metadata": meta}, created))
        elif isinstance(event, ev.RunSuspended):
            children.extend(event.children or [])
            if event.kind == "suspend":
                shown = event.data if isinstance(event.data, dict) else {"data": event.data}
                out.append(
                    self.event(seq, f"suspend_{event.step}", {**shown, "_metadata": meta}, created)
                )
        elif isinstance(event, ev.RunWoken) and event.kind == "suspend":
            resumed = event.output if isinstance(event.output, dict) else {}
            answer = resumed.get("data")
            given = answer if isinstance(answer, dict) else {"data": answer}
            out.append(
                self.event(seq, f"resume_{event.step}", {**given, "_metadata": meta}, created)
            )
        elif isinstance(event, ev.RunCompleted):
            out.append(
                self.event(
                    seq, f"{kind}_finish", {"result": event.output, "_metadata": meta}, created
                )
            )
        elif isinstance(event, ev.RunFailed):
            out.append(
                self.event(seq, f"{kind}_fail", {"error": event.error, "_metadata": meta}, created)
            )
        elif isinstance(event, ev.RunCancelled):
            out.append(
                self.event(
                    seq, "workflow_cancel", {"reason": event.reason, "_metadata": meta}, created
                )
            )
        return out, [c for c in children if c]

    def delta(self, msg: Msg, index: int) -> StreamEvent | None:
        try:
            body = orjson.loads(msg.data)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(body, dict) or "delta" not in body:
            return None  # the end-of-step marker: the step's own events say it ended
        run_id = str(body.get("run_id"))
        meta = {"execution_id": run_id, "workflow_id": self.workflows.get(run_id)}
        return StreamEvent(
            id=f"{run_id}:{body.get('step')}:{body.get('seq')}",
            sequence_id=0,  # live only, not stored: no stream sequence
            topic=self.topic,
            event_type="text_delta",
            data={
                "step": body.get("step"),
                "chunk_index": index,
                "content": body.get("delta"),
                "tool_call": None,
                "usage": None,
                "_metadata": meta,
            },
            created_at=None,
        )


async def stream_workflow(
    client: PolosClient,
    workflow_id: str,
    workflow_run_id: str,
    last_sequence_id: int | None = None,
    last_timestamp: datetime | None = None,
) -> AsyncIterator[StreamEvent]:
    """The events of run ``workflow_run_id`` (a run of ``workflow_id``) and of every run it
    starts, live, in the original's event types; ends after the run's own finish (or fail, or
    cancel) event. From the run's beginning, else after ``last_sequence_id`` (a
    ``sequence_id`` this stream yielded), else from ``last_timestamp``."""
    follower = _RunFollower(client, workflow_id, workflow_run_id)
    config = _start(last_sequence_id, last_timestamp)
    chunks = 0
    try:
        await follower.follow_deltas()
        await follower.follow(workflow_run_id, config)
        while True:
            run_id, msg = await follower.queue.get()
            if run_id is None:
                delta = follower.delta(msg, chunks)
                if delta is not None:
                    chunks += 1
                    yield delta
                continue
            out, children = follower.translate(run_id, msg)
            for child in children:
                # A child's whole history: it begins after the parent's step that named it.
                await follower.follow(child, ConsumerConfig(deliver_policy=DeliverPolicy.ALL))
            for one in out:
                yield one
                if run_id == workflow_run_id and one.event_type in _ENDINGS:
                    return
    finally:
        await follower.close()


_ENDINGS = frozenset(
    f"{k}_{end}" for k in ("workflow", "agent") for end in ("finish", "fail", "cancel")
)


class _Events:
    """The original's module-level ``events`` object: the same four functions as attributes
    (``from polos.events import events; await events.publish(client, ...)``)."""

    publish = staticmethod(publish)
    batch_publish = staticmethod(batch_publish)
    stream_topic = staticmethod(stream_topic)
    stream_workflow = staticmethod(stream_workflow)


events = _Events()

__all__ = [
    "EVENT_TYPE_HEADER",
    "BatchEventPayload",
    "Event",
    "EventData",
    "EventItem",
    "EventPayload",
    "StreamEvent",
    "batch_publish",
    "events",
    "publish",
    "stream_topic",
    "stream_workflow",
]
