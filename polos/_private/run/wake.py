"""Waking a suspended run: one ``RunWoken`` fenced on its ``RunSuspended``, and the first event
a waiter on a topic gets.

Whatever wakes a run (the orchestrator for resumes, events and children, the scheduler for
timers) appends one ``RunWoken`` carrying the step's outcome, fenced on the ``RunSuspended``
sequence, so a second waker (a duplicate, another instance, a stale timer) fails the fence and
changes nothing.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import orjson
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from polos import history as ev
from polos._private.model.values import EVENT_TYPE_HEADER
from polos._private.store import (
    FencedOut,
    Names,
    StaleRead,
    append,
    payloads,
    read_subject,
    reread_until,
)
from polos._private.store.tokens import event_subject, iso_time, parse_time


class Woken(NamedTuple):
    """A wake as appended: its sequence and the event."""

    seq: int
    event: ev.RunWoken


async def wake(
    js: JetStreamContext,
    names: Names,
    run_id: str,
    step: str,
    *,
    expected_seq: int,
    reason: str,
    cause: str,
    kind: ev.StepKind | None,
    output: Any = None,
    workflow: str | None = None,
) -> Woken | None:
    """Append the wake of a run suspended at ``expected_seq``; None if it moved on (someone
    else woke it, it was cancelled, or this wake is stale). ``cause`` names what woke it, so a
    different waker of the same step fails the fence instead of looking like a duplicate. The
    event is returned too: a waker that read the whole history can send it on in the task."""
    event = ev.RunWoken(
        run_id=run_id, step=step, reason=reason, kind=kind, output=output, workflow=workflow
    )
    try:
        seq = await append(
            js,
            names,
            run_id,
            event,
            expected_last_seq=expected_seq,
            msg_id=f"{run_id}/wake/{step}/{expected_seq}/{cause}",
        )
    except FencedOut:
        return None
    return Woken(seq, event)


async def first_event_after(
    nc: NATS,
    names: Names,
    topic: str,
    cursor: int,
    since: float | None,
    *,
    through: tuple[int, float] | None = None,
) -> dict[str, Any] | None:
    """The first well-formed event on ``topic`` after ``cursor`` (or, for a first wait, after
    the run started), as the step's recorded outcome.

    ``through``: the sequence and time of an event on the topic known to be stored (the one
    delivered, or the leader's last). A read that finds nothing before reaching it came from a
    replica behind the leader: it is made again, and ``StaleRead`` if it never gets there.
    """
    if through is not None:
        seq, at = through
        if seq <= cursor or (cursor == 0 and since is not None and at < since):
            through = None  # the known event does not count for this wait
    if through is None:
        found, _ = await _scan_events(nc, names, topic, cursor, since)
        return found

    async def scan() -> tuple[dict[str, Any] | None, int]:
        return await _scan_events(nc, names, topic, cursor, since)

    (found, ended_at), reached = await reread_until(
        scan, lambda got: got[0] is not None or got[1] > seq
    )
    if not reached:
        raise StaleRead(f"events on {topic!r}", seq, ended_at - 1)
    return found


async def _scan_events(
    nc: NATS, names: Names, topic: str, cursor: int, since: float | None
) -> tuple[dict[str, Any] | None, int]:
    """The first well-formed event after the cursor, and the sequence the scan had reached
    when it found nothing more (every event before it was read)."""
    subject = event_subject(names, topic)
    seq = cursor + 1
    for _ in range(100):
        if cursor == 0 and since is not None and seq == 1:
            msgs = await read_subject(
                nc, names.events_stream, subject, start_time=iso_time(since), limit=10
            )
        else:
            msgs = await read_subject(nc, names.events_stream, subject, start_seq=seq, limit=10)
        if not msgs:
            return None, seq
        for m in msgs:
            try:
                if m.headers and payloads.EVENT_REF in m.headers:
                    data = await payloads.event_value(nc.jetstream(), names, m.headers, m.data)
                else:
                    data = orjson.loads(m.data) if m.data else None
            except (ValueError, payloads.PayloadMissingError):  # JSONDecodeError included
                continue  # dead-lettered by the orchestrator; a waiter never sees it
            return {
                "topic": topic,
                "data": data,
                "time": parse_time(m.time),
                "seq": m.seq,
                "event_type": (m.headers or {}).get(EVENT_TYPE_HEADER),
            }, m.seq + 1
        seq = msgs[-1].seq + 1
    return None, seq


__all__ = ["Woken", "first_event_after", "wake"]
