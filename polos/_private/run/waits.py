"""Waiting without compute: the steps that suspend a run, and the shared wake machinery.

A waiting step (``suspend``, ``wait_for_event``, ``sleep``, ``invoke_and_wait``...) whose key is
not in the history raises ``Suspend``: the worker records ``RunSuspended`` and releases the
task, so the run holds no worker and no slot. Whatever wakes it (the orchestrator for resumes,
events and children, the scheduler for timers) appends one ``RunWoken`` carrying the step's
outcome, fenced on the ``RunSuspended`` sequence, so a second waker (a duplicate, another
instance, a stale timer) fails the fence and changes nothing. The fold turns that outcome into
the step's ``StepCompleted``; replay returns it like any recorded step.

See docs/waiting.md for the subjects and the decisions.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid
import zoneinfo
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, NamedTuple

import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from polos import history as ev
from polos._private.run.signals import Suspend
from polos._private.store import (
    MSG_ID,
    REPLY_HEADER,
    FencedOut,
    Names,
    append,
    connection_of,
    last_for_subject,
    last_per_subject,
    payloads,
    read_subject,
    valid_token,
)
from polos.converter import from_json, to_json
from polos.errors import ChildWorkflowError, WaitTimeoutError

if TYPE_CHECKING:
    from polos._private.run.execution import RunExecution

# The kinds of RunSuspended this module owns (admission owns "slot" and "rate"; an LLM step's
# "rate" wait, with its wake_at, is a timer like a sleep: limits.reserve_for_step).
WAIT_KINDS = frozenset({"suspend", "event", "sleep", "child", "retry"})
_CHILD_NS = uuid.UUID("0b6f1c0e-9d57-4a8e-8a39-0b1e1f0c2d77")

# --------------------------------------------------------------------------- subject tokens

_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_ESC = re.compile(r"=([0-9A-F]{2})")


def encode_token(text: str) -> str:
    """One subject token (and KV key token) for any text, reversibly: letters, digits, '_' and
    '-' stay, every other byte of the UTF-8 text becomes ``=XX`` (hex). ``pickup/42`` ->
    ``pickup=2F42``."""
    if not text:
        raise ValueError("an empty name cannot be a subject token")
    out: list[str] = []
    for ch in text:
        if ch in _SAFE:
            out.append(ch)
        else:
            out.extend(f"={b:02X}" for b in ch.encode("utf-8"))
    return "".join(out)


def decode_token(token: str) -> str:
    raw = bytearray()
    i = 0
    while i < len(token):
        m = _ESC.match(token, i)
        if m:
            raw.append(int(m.group(1), 16))
            i = m.end()
        else:
            raw.extend(token[i].encode())
            i += 1
    return raw.decode("utf-8")


def topic_tokens(topic: str) -> str:
    """The subject tokens of a topic: split on '.', each part encoded (``encode_token``)."""
    if not isinstance(topic, str) or not topic:
        raise ValueError("an event topic must be a non-empty string")
    parts = topic.split(".")
    if any(not p for p in parts):
        raise ValueError(f"event topic {topic!r} has an empty part between dots")
    return ".".join(encode_token(p) for p in parts)


def topic_from_subject(names: Names, subject: str) -> str:
    head = f"{names.prefix}.event."
    if not subject.startswith(head):
        raise ValueError(f"{subject!r} is not an event subject")
    return ".".join(decode_token(t) for t in subject[len(head) :].split("."))


def event_subject(names: Names, topic: str) -> str:
    return names.event_subject(topic_tokens(topic))


def resume_subject(names: Names, run_id: str, key: str) -> str:
    return names.resume_subject(run_id, encode_token(key))


def child_run_id(parent_run_id: str, step_id: str, index: int) -> str:
    """The same child id every time the parent's code reaches the same step."""
    return uuid.uuid5(_CHILD_NS, f"{parent_run_id}/{step_id}/{index}").hex


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(stamp: str | None) -> float:
    """A JetStream timestamp (RFC 3339, nanoseconds) as epoch seconds."""
    if not stamp:
        return time.time()
    m = re.match(r"^(.*T\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$", stamp)
    if not m:
        return time.time()
    base = datetime.fromisoformat(m.group(1) + ("+00:00" if m.group(3) == "Z" else m.group(3)))
    frac = float("0." + m.group(2)) if m.group(2) else 0.0
    return base.timestamp() + frac


# --------------------------------------------------------------------------- public results


@dataclass(frozen=True)
class Resumed:
    """What ``ctx.step.suspend`` returns: the resume's ``data`` (any JSON) and when it came."""

    key: str
    data: Any
    at: float


@dataclass(frozen=True)
class ReceivedEvent:
    """What ``ctx.step.wait_for_event`` returns (and an event-triggered run's input)."""

    topic: str
    data: Any
    time: datetime
    seq: int


@dataclass(frozen=True)
class ChildHandle:
    """A child run started by ``ctx.step.invoke``; ``client.get_handle(run_id)`` follows it."""

    run_id: str
    workflow: str
    key: str


# --------------------------------------------------------------------------- the steps


def _suspend(x: RunExecution, event: ev.RunSuspended, suffix: str = "") -> Suspend:
    return Suspend(event, msg_id=f"{x.run_id}/w/{event.step}{suffix}")


async def _begin(x: RunExecution, key: str | None, kind: str) -> tuple[str, ev.StepCompleted | None]:
    step_id = x.step_id(key, kind)
    found = x.recorded(step_id, kind, None)
    if isinstance(found, ev.StepCompleted):
        return step_id, found
    await x.check_new_step(step_id)
    return step_id, None


def _timeout_at(timeout: float | timedelta | None) -> float | None:
    if timeout is None:
        return None
    seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else float(timeout)
    if seconds < 0:
        raise ValueError("timeout must not be negative")
    return time.time() + seconds


async def suspend(
    x: RunExecution, key: str, data: Any = None, timeout: float | timedelta | None = None
) -> Resumed:
    step_id, found = await _begin(x, key, "suspend")
    if found is not None:
        out = found.output or {}
        if out.get("timeout"):
            raise WaitTimeoutError(step_id, "suspend", out.get("timeout_at"))
        return Resumed(key=step_id, data=out.get("data"), at=float(out.get("at") or found.at))
    shown = to_json(data, what=f"the data of suspend {step_id!r}")
    if x.settings.ui_url and isinstance(shown, dict) and APPROVAL_URL not in shown:
        # Where a human answers it: the workflow (or whoever reads the suspend) can send it on.
        shown = {**shown, APPROVAL_URL: approval_url(x.settings.ui_url, x.run_id, step_id)}
    raise _suspend(
        x,
        ev.RunSuspended(
            run_id=x.run_id,
            step=step_id,
            kind="suspend",
            data=shown,
            timeout_at=_timeout_at(timeout),
        ),
    )


APPROVAL_URL = "_approval_url"


def approval_url(ui_url: str, run_id: str, step_id: str) -> str:
    """The web UI's page for answering the suspend ``step_id`` of ``run_id`` (docs/ui.md)."""
    from urllib.parse import quote

    return f"{ui_url.rstrip('/')}/approve/{run_id}/{quote(step_id, safe='/')}"


async def wait_for_event(
    x: RunExecution, key: str, topic: str, timeout: float | timedelta | None = None
) -> ReceivedEvent:
    topic_tokens(topic)  # a bad topic fails here, before anything is recorded
    step_id, found = await _begin(x, key, "event")
    if found is not None:
        out = found.output or {}
        if out.get("timeout"):
            raise WaitTimeoutError(step_id, "event", out.get("timeout_at"))
        return ReceivedEvent(
            topic=str(out.get("topic", topic)),
            data=out.get("data"),
            time=datetime.fromtimestamp(float(out.get("time") or found.at), tz=UTC),
            seq=int(out.get("seq", 0)),
        )
    # Earlier waits of this run on the same topic consumed events up to here: a wait in a loop
    # gets each event once, in stream order.
    cursor = 0
    for step in x.state.steps.values():
        out = step.output if isinstance(step, ev.StepCompleted) and step.kind == "event" else None
        if isinstance(out, dict) and out.get("topic") == topic and out.get("seq"):
            cursor = max(cursor, int(out["seq"]))
    raise _suspend(
        x,
        ev.RunSuspended(
            run_id=x.run_id,
            step=step_id,
            kind="event",
            topic=topic,
            timeout_at=_timeout_at(timeout),
            cursor=cursor,
            since=x.state.created_at,
        ),
    )


async def sleep_until(x: RunExecution, key: str, when: datetime | float) -> None:
    due = when.timestamp() if isinstance(when, datetime) else float(when)
    if isinstance(when, datetime) and when.tzinfo is None:
        raise ValueError("sleep_until needs an aware datetime (with a tzinfo)")
    step_id, found = await _begin(x, key, "sleep")
    if found is not None:
        return
    if due <= time.time():
        await x.record(
            ev.StepCompleted(key=step_id, kind="sleep", output={"due": due, "at": time.time()}),
            msg_id=f"{x.run_id}/s/{step_id}",
        )
        return
    raise _suspend(
        x, ev.RunSuspended(run_id=x.run_id, step=step_id, kind="sleep", wake_at=due)
    )


async def sleep(x: RunExecution, key: str, duration: float | timedelta) -> None:
    seconds = duration.total_seconds() if isinstance(duration, timedelta) else float(duration)
    # The due time is fixed when the code first reaches the sleep; replay never recomputes it
    # because the run stays suspended until the timer's wake is in the history.
    await sleep_until(x, key, time.time() + seconds)


def retry_later(x: RunExecution, step_id: str, attempt: int, delay: float) -> None:
    """Suspend the run for a long retry back-off; the scheduler wakes it for the next attempt."""
    raise _suspend(
        x,
        ev.RunSuspended(
            run_id=x.run_id,
            step=step_id,
            kind="retry",
            wake_at=time.time() + delay,
            data={"attempt": attempt},
        ),
        suffix=f"/{attempt}",
    )


def _wf_name(wf: Any) -> tuple[str, Any]:
    from polos._private.model.values import WorkflowDefinition

    if isinstance(wf, WorkflowDefinition):
        return wf.name, wf.output_type
    if isinstance(wf, str) and valid_token(wf):
        return wf, None
    raise TypeError(f"a child workflow is a @workflow or its name, got {wf!r}")


class ChildRequest(NamedTuple):
    """One child run's request command, as the parent's worker publishes it."""

    run_id: str
    subject: str
    body: bytes
    headers: dict[str, str]


def child_request(
    names: Names, parent_run_id: str, root_run_id: str, step_id: str, index: int,
    workflow: str, input: Any,
) -> ChildRequest:
    child = child_run_id(parent_run_id, step_id, index)
    body = {
        "workflow": workflow,
        "input": to_json(input, what=f"the input of child {index} of step {step_id!r}"),
        "parent_run_id": parent_run_id,
        "parent_step": step_id,
        "root_run_id": root_run_id,
    }
    return ChildRequest(
        child, names.child_subject(parent_run_id, child), orjson.dumps(body),
        {MSG_ID: f"child/{child}"},
    )


async def _request_children(
    x: RunExecution, step_id: str, items: Sequence[tuple[str, Any]], first_index: int = 0
) -> list[str]:
    root = (x.state.requested.root_run_id if x.state.requested else None) or x.run_id
    reqs = [
        child_request(x.names, x.run_id, root, step_id, i, name, value)
        for i, (name, value) in enumerate(items, start=first_index)
    ]
    limit = payloads.inline_limit(x.nc)
    for i, r in enumerate(reqs):
        if len(r.body) > limit:
            # Too big for a command message: the input travels through the Object Store.
            body = orjson.loads(r.body)
            ref = await payloads.put_value(x.js, x.names, r.run_id, orjson.dumps(body.pop("input")))
            reqs[i] = r._replace(body=orjson.dumps({**body, "input_ref": ref}))
    # Stored in the command stream before the parent records anything: a crash before the
    # record replays to the same child id, and the message id makes the repeat a no-op. A
    # cancel of the parent in between finds the request there (services/orchestrator/waiting).
    await asyncio.gather(*(
        x.js.publish(r.subject, r.body, headers=r.headers, timeout=x.settings.request_timeout)
        for r in reqs
    ))
    return [r.run_id for r in reqs]


async def invoke(x: RunExecution, key: str, wf: Any, input: Any = None) -> ChildHandle:
    name, _ = _wf_name(wf)
    step_id, found = await _begin(x, key, "invoke")
    if found is not None:
        out = found.output or {}
        return ChildHandle(run_id=str(out["run_id"]), workflow=str(out["workflow"]), key=step_id)
    [child] = await _request_children(x, step_id, [(name, input)])
    await x.record(
        ev.StepCompleted(key=step_id, kind="invoke", output={"run_id": child, "workflow": name}),
        msg_id=f"{x.run_id}/s/{step_id}",
    )
    return ChildHandle(run_id=child, workflow=name, key=step_id)


async def batch_invoke_and_wait(
    x: RunExecution, key: str, items: Iterable[tuple[Any, Any]]
) -> list[Any]:
    resolved = [(_wf_name(wf), value) for wf, value in items]
    step_id, found = await _begin(x, key, "child")
    if found is not None:
        children: list[dict[str, Any]] = list((found.output or {}).get("children") or [])
        if any(c.get("status") != "completed" for c in children):
            raise ChildWorkflowError(step_id, children)
        return [
            from_json(c.get("output"), out_type)
            for c, ((_, out_type), _) in zip(children, resolved, strict=False)
        ]
    if not resolved:
        await x.record(
            ev.StepCompleted(key=step_id, kind="child", output={"children": []}),
            msg_id=f"{x.run_id}/s/{step_id}",
        )
        return []
    ids = await _request_children(x, step_id, [(n, v) for (n, _), v in resolved])
    raise _suspend(
        x,
        ev.RunSuspended(
            run_id=x.run_id,
            step=step_id,
            kind="child",
            children=ids,
            data={"workflows": [n for (n, _), _ in resolved]},
        ),
    )


async def invoke_and_wait(x: RunExecution, key: str, wf: Any, input: Any = None) -> Any:
    [result] = await batch_invoke_and_wait(x, key, [(wf, input)])
    return result


# --------------------------------------------------------------------------- wake machinery


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
    kind: str | None,
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
    nc: NATS, names: Names, topic: str, cursor: int, since: float | None
) -> dict[str, Any] | None:
    """The first well-formed event on ``topic`` after ``cursor`` (or, for a first wait, after
    the run started), as the step's recorded outcome."""
    subject = event_subject(names, topic)
    seq = cursor + 1
    for _ in range(100):
        if cursor == 0 and since is not None and seq == 1:
            msgs = await read_subject(
                nc, names.events_stream, subject, start_time=_iso(since), limit=10
            )
        else:
            msgs = await read_subject(nc, names.events_stream, subject, start_seq=seq, limit=10)
        if not msgs:
            return None
        for m in msgs:
            try:
                if m.headers and payloads.EVENT_REF in m.headers:
                    data = await payloads.event_value(nc.jetstream(), names, m.headers, m.data)
                else:
                    data = orjson.loads(m.data) if m.data else None
            except (ValueError, payloads.PayloadMissingError):  # JSONDecodeError included
                continue  # dead-lettered by the orchestrator; a waiter never sees it
            return {"topic": topic, "data": data, "time": parse_time(m.time), "seq": m.seq}
        seq = msgs[-1].seq + 1
    return None


# --------------------------------------------------------------------------- timers

TIMER_LEAD = 0.5  # seconds a timer fires early; more than the server's schedule tick (250 ms)


async def schedule_timer(
    js: JetStreamContext, names: Names, run_id: str, seq: int, due: float, body: dict[str, Any]
) -> None:
    """A one-shot timer for the run suspended at ``seq``: a message schedule the server holds
    (durable across restarts) and fires onto the timers' fire subject at ``due``."""
    target = names.timer_fire_subject(run_id, seq)
    payload = orjson.dumps({**body, "run_id": run_id, "seq": seq, "due": due})
    # The server checks schedules every ~250 ms; it fires TIMER_LEAD early and the scheduler
    # sleeps the rest in memory, so a timer is on time to the millisecond, not to the tick.
    fire_at = due - TIMER_LEAD
    if fire_at <= time.time() + 0.01:
        await js.publish(target, payload, headers={MSG_ID: f"fire/{run_id}/{seq}"})
        return
    await js.publish(
        names.timer_subject(run_id, seq),
        payload,
        headers={
            "Nats-Schedule": f"@at {_iso(fire_at)}",
            "Nats-Schedule-Target": target,
            MSG_ID: f"timer/{run_id}/{seq}",
        },
    )


async def clear_timers(js: JetStreamContext, names: Names, run_id: str) -> None:
    """Drop a run's pending timers (a cancelled run)."""
    with contextlib.suppress(nats.js.errors.NotFoundError):
        await js.purge_stream(names.timers_stream, subject=f"{names.prefix}.timer.at.{run_id}.>")


# --------------------------------------------------------------------------- cron schedules


CRON_TOMBSTONE_TTL = "60s"  # how long a deleted schedule's empty tombstone stays


def cron_expression(spec: str) -> str:
    """The server's cron form (seconds first) of a 5-field cron, a 6-field cron or ``@every``."""
    spec = " ".join(spec.split())
    if spec.startswith("@"):
        return spec
    fields = spec.split(" ")
    if len(fields) == 5:
        return "0 " + spec
    if len(fields) == 6:
        return spec
    raise ValueError(f"schedule {spec!r}: expected 5 cron fields (min hour day month weekday)")


async def put_schedule(
    js: JetStreamContext,
    names: Names,
    key: str,
    workflow: str,
    cron: str,
    *,
    timezone: str | None = None,
    input: Any = None,
) -> dict[str, Any]:
    """Create or replace the keyed schedule ``key``."""
    if not valid_token(key):
        raise ValueError(f"schedule key {key!r} must be 1-128 letters, digits, '_' or '-'")
    if not valid_token(workflow):
        raise ValueError(f"workflow name {workflow!r} is not valid")
    if timezone is not None:
        try:
            zoneinfo.ZoneInfo(timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {timezone!r}") from exc
    doc = {
        "kind": "cron",
        "key": key,
        "workflow": workflow,
        "cron": cron,
        "timezone": timezone,
        "input": to_json(input, what="the schedule's input"),
        "created_at": time.time(),
    }
    headers = {
        "Nats-Schedule": cron_expression(cron),
        "Nats-Schedule-Target": names.cron_fire_subject(key),
        "Nats-Rollup": "sub",  # replaces the key's previous schedule
    }
    if timezone:
        headers["Nats-Schedule-Time-Zone"] = timezone
    try:
        await js.publish(names.cron_subject(key), orjson.dumps(doc), headers=headers)
    except nats.js.errors.APIError as exc:
        raise ValueError(f"schedule {cron!r} rejected by the server: {exc.description}") from exc
    return doc


async def list_schedules(nc: NATS, names: Names) -> list[dict[str, Any]]:
    msgs = await last_per_subject(nc, names.timers_stream, f"{names.prefix}.timer.cron.>")
    out = []
    for m in msgs:
        with contextlib.suppress(orjson.JSONDecodeError):
            out.append(orjson.loads(m.data))
    return sorted(out, key=lambda d: str(d.get("key")))


async def delete_schedule(js: JetStreamContext, names: Names, key: str) -> bool:
    if not valid_token(key):
        raise ValueError(f"schedule key {key!r} is not valid")
    last = await last_for_subject(connection_of(js), names.timers_stream, names.cron_subject(key))
    if last is None or not last.data:
        return False
    # Rolled up to an empty tombstone that expires, not purged: a client may write its
    # schedules' subjects but not purge the timers stream (every run's timers are in it).
    await js.publish(
        names.cron_subject(key), b"",
        headers={"Nats-Rollup": "sub", "Nats-TTL": CRON_TOMBSTONE_TTL},
    )
    return True


__all__ = [
    "ChildHandle",
    "ReceivedEvent",
    "Resumed",
    "decode_token",
    "encode_token",
    "topic_tokens",
]


# --------------------------------------------------------------------------- client side


async def send_command(
    nc: NATS,
    js: JetStreamContext,
    subject: str,
    body: dict[str, Any],
    *,
    msg_id: str,
    timeout: float,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Store a command and wait for the orchestrator's answer (on the ``Polos-Reply`` inbox).

    Raises ``CommandRejectedError`` with the orchestrator's reason when it refused the command,
    and ``TimeoutError`` when no orchestrator answered (the command is stored all the same and
    will be processed when one runs).
    """
    from polos.errors import CommandRejectedError

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, max_msgs=1)
    try:
        await js.publish(
            subject,
            orjson.dumps(body),
            headers={MSG_ID: msg_id, REPLY_HEADER: inbox, "Polos-Client": "python",
                     **(headers or {})},
        )
        try:
            msg = await sub.next_msg(timeout)
        except nats.errors.TimeoutError as exc:
            raise TimeoutError(
                f"no orchestrator answered within {timeout}s; the command is stored on "
                f"{subject} and will be processed when one runs"
            ) from exc
        answer: dict[str, Any] = orjson.loads(msg.data)
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    if not answer.get("ok"):
        raise CommandRejectedError(str(answer.get("error")), answer)
    return answer
