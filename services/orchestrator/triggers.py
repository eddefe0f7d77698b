"""Event-triggered workflows: ``@workflow(trigger_on_event=topic)``, one event a run, or a
batch of events a run (``batch_size`` / ``batch_timeout_seconds``).

One event a run: the run id is derived from (workflow, event sequence), so a redelivery or a
second orchestrator starts it once.

Batches are cut from the events stream itself. A trigger's cursor (the last event sequence a
batch took) is kept in the waiters bucket at ``trigger/<workflow>`` (a key no topic's waiter
can have: a topic token never holds ``/``), moved only by a compare-and-set. A batch's run id
is derived from its first event's sequence, and the run is requested *before* the cursor
moves: a crash in between requests the same run again (a no-op), and the cursor then goes past
the events the existing run holds (read from its ``RunRequested``), whatever was computed this
time. So an orchestrator SIGKILLed at any point loses no event and starts no batch twice; the
events waiting for their batch are in the stream, the cursor in the bucket, and the timeout's
timer in the timers stream (the scheduler fires it as a ``trigger`` command).
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Any

import nats.js.errors
import orjson
from nats.aio.msg import Msg

from polos import history as ev
from polos._private.model.values import EVENT_TYPE_HEADER
from polos._private.run.timers import schedule_timer
from polos._private.store import kv_entries, load_state, payloads, read_subject, valid_token
from polos._private.store.tokens import event_subject, iso_time, parse_time

from .commands import CommandError, derive_run_id, parse_object

if TYPE_CHECKING:
    from nats.js.kv import KeyValue

    from .orchestrator import Orchestrator

# The timer of a batch that waits for its timeout is a run timer of this pseudo run id.
TIMER_PREFIX = "batch-"


def event_item(
    topic: str, seq: int, data: Any, at: float, headers: dict[str, str] | None
) -> dict[str, Any]:
    """One event as a triggered run receives it: the original SDK's ``EventPayload`` fields
    (``id``, ``sequence_id``, ``topic``, ``event_type``, ``data``, ``created_at``) and ours
    (``seq``, ``time``: epoch seconds)."""
    return {
        "id": f"{topic}/{seq}",
        "sequence_id": seq,
        "topic": topic,
        "event_type": (headers or {}).get(EVENT_TYPE_HEADER),
        "data": data,
        "created_at": iso_time(at),
        "seq": seq,
        "time": at,
    }


def _batched(doc: dict[str, Any]) -> bool:
    return int(doc.get("batch_size") or 1) != 1 or doc.get("batch_timeout_seconds") is not None


class Triggers:
    """Starts the runs of event-triggered workflows (the orchestrator's event consumer calls
    ``on_event``; the scheduler's batch timers come back as ``trigger`` commands)."""

    def __init__(self, orch: Orchestrator) -> None:
        self.orch = orch
        self._kv: KeyValue | None = None
        self.batches_started = 0

    async def _waits(self) -> KeyValue:
        if self._kv is None:
            self._kv = await self.orch.js.key_value(self.orch.names.waits_bucket)
        return self._kv

    async def on_event(
        self, topic: str, seq: int, data: Any, at: float, headers: dict[str, str] | None
    ) -> None:
        o = self.orch
        for m in await kv_entries(o.nc, o.names.workflows_bucket):
            doc = orjson.loads(m.value)
            if not isinstance(doc, dict) or doc.get("trigger_on_event") != topic:
                continue
            name = doc.get("name")
            if not isinstance(name, str) or not valid_token(name):
                continue  # not a registration a worker made; nothing to start
            if _batched(doc):
                await self.flush(doc, topic, seq)
                continue
            await o.request_run(
                ev.RunRequested(
                    # One run per (workflow, event), however often the event is delivered.
                    run_id=derive_run_id(o.names.prefix, f"event/{name}/{seq}"),
                    workflow=name,
                    input=event_item(topic, seq, data, at, headers),
                    source="event",
                )
            )

    async def on_command(self, msg: Msg, tokens: list[str]) -> dict[str, Any]:
        """``<p>.cmd.trigger.<workflow>`` ``{"first_seq": n}``: the batch starting at event
        ``n`` waited ``batch_timeout_seconds``; start it with the events there are."""
        o = self.orch
        if len(tokens) != 1 or not valid_token(tokens[0]):
            raise CommandError(f"a trigger goes to {o.names.prefix}.cmd.trigger.<workflow>")
        body = parse_object(msg)
        first = body.get("first_seq")
        if set(body) != {"first_seq"} or not isinstance(first, int):
            raise CommandError('a trigger command is {"first_seq": <int>}', field="first_seq")
        kv = await o.js.key_value(o.names.workflows_bucket)
        try:
            entry = await kv.get(tokens[0])
        except nats.js.errors.KeyNotFoundError:
            return {"ok": True, "started": 0, "message": f"workflow {tokens[0]!r} is gone"}
        doc = orjson.loads(entry.value or b"{}")
        topic = doc.get("trigger_on_event")
        if not isinstance(topic, str) or not _batched(doc):
            return {"ok": True, "started": 0, "message": "no batched trigger any more"}
        started = await self.flush(doc, topic, first, due_first=first)
        return {"ok": True, "started": started}

    async def _events(self, topic: str, after: int, limit: int) -> list[dict[str, Any]]:
        """Up to ``limit`` well-formed events on ``topic`` after sequence ``after``."""
        o = self.orch
        subject = event_subject(o.names, topic)
        out: list[dict[str, Any]] = []
        start = after + 1
        while len(out) < limit:
            msgs = await read_subject(
                o.nc, o.names.events_stream, subject, start_seq=start, limit=limit - len(out)
            )
            if not msgs:
                break
            for m in msgs:
                try:
                    data = await payloads.event_value(o.js, o.names, m.headers, m.data)
                except (ValueError, payloads.PayloadMissingError):
                    continue  # dead-lettered by the event consumer; no batch holds it
                out.append(event_item(topic, m.seq, data, parse_time(m.time), m.headers))
            start = msgs[-1].seq + 1
        return out

    async def flush(
        self, doc: dict[str, Any], topic: str, seen: int, *, due_first: int | None = None
    ) -> int:
        """Start every batch there is for ``doc``'s trigger; with ``due_first``, also the
        partial batch whose first event is that one (its timeout is over). ``seen``: an event
        on the topic, where a trigger that has no cursor yet starts. Returns the runs started."""
        o = self.orch
        name = str(doc["name"])
        size = int(doc.get("batch_size") or 1)
        timeout = doc.get("batch_timeout_seconds")
        kv = await self._waits()
        slot = f"trigger/{name}"
        started = 0
        for _ in range(100):
            try:
                entry = await kv.get(slot)
                cursor, rev = (
                    int(orjson.loads(entry.value or b"{}").get("cursor", 0)),
                    entry.revision,
                )
            except nats.js.errors.KeyNotFoundError:
                # A new trigger begins with the first event it sees, not with the topic's past.
                cursor = seen - 1
                try:
                    rev = await kv.create(slot, orjson.dumps({"cursor": cursor, "topic": topic}))
                except nats.js.errors.KeyWrongLastSequenceError:
                    continue
            events = await self._events(topic, cursor, size)
            if not events:
                return started
            forced = due_first is not None and events[0]["sequence_id"] <= due_first
            if len(events) < size and not forced:
                if timeout is not None:
                    first = events[0]
                    await schedule_timer(
                        o.js,
                        o.names,
                        f"{TIMER_PREFIX}{name}",
                        int(first["sequence_id"]),
                        float(first["time"]) + float(timeout),
                        {"kind": "batch", "workflow": name},
                    )
                return started
            run_id = derive_run_id(o.names.prefix, f"batch/{name}/{events[0]['sequence_id']}")
            answer = await o.request_run(
                ev.RunRequested(
                    run_id=run_id, workflow=name, input={"events": events}, source="event"
                )
            )
            last = int(events[-1]["sequence_id"])
            if answer.get("existing"):
                # Requested before (a crash before the cursor moved, or a race with a timeout):
                # the cursor goes past what that run holds.
                state = await load_state(o.nc, o.names, run_id, kinds=("ctl",))
                held = state.requested.input if state.requested else None
                with contextlib.suppress(KeyError, TypeError, ValueError):
                    last = max(int(e["sequence_id"]) for e in held["events"])  # type: ignore[index]
            else:
                started += 1
                self.batches_started += 1
            with contextlib.suppress(nats.js.errors.KeyWrongLastSequenceError):
                await kv.update(
                    slot,
                    orjson.dumps({"cursor": max(last, cursor), "topic": topic, "at": time.time()}),
                    last=rev,
                )
            due_first = None  # the forced batch is out; the rest wait for their own turn
        raise RuntimeError(f"trigger of {name!r}: the cursor kept racing with other writers")


__all__ = ["TIMER_PREFIX", "Triggers", "event_item"]
