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
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, NamedTuple

import orjson

from polos import history as ev
from polos._private.model.values import WorkflowDefinition
from polos._private.run.signals import Suspend
from polos._private.store import (
    MSG_ID,
    Names,
    payloads,
    valid_token,
)
from polos._private.store.commands import ChildCommand
from polos._private.store.tokens import topic_tokens
from polos.converter import from_json, to_json
from polos.errors import ChildWorkflowError, WaitTimeoutError

if TYPE_CHECKING:
    from polos._private.run.execution import RunExecution

# The kinds of RunSuspended this module owns (admission owns "slot" and "rate"; an LLM step's
# "rate" wait, with its wake_at, is a timer like a sleep: limits.reserve_for_step).
WAIT_KINDS = frozenset({"suspend", "event", "sleep", "child", "retry"})
_CHILD_NS = uuid.UUID("0b6f1c0e-9d57-4a8e-8a39-0b1e1f0c2d77")


def child_run_id(parent_run_id: str, step_id: str, index: int) -> str:
    """The same child id every time the parent's code reaches the same step."""
    return uuid.uuid5(_CHILD_NS, f"{parent_run_id}/{step_id}/{index}").hex


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


async def _begin(
    x: RunExecution, key: str | None, kind: str
) -> tuple[str, ev.StepCompleted | None]:
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
    raise _suspend(x, ev.RunSuspended(run_id=x.run_id, step=step_id, kind="sleep", wake_at=due))


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


ChildWorkflow = WorkflowDefinition[Any, Any] | str  # a child: its definition, or its name


def _wf_name(wf: ChildWorkflow) -> tuple[str, Any]:
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
    names: Names,
    parent_run_id: str,
    root_run_id: str,
    step_id: str,
    index: int,
    workflow: str,
    input: Any,
) -> ChildRequest:
    child = child_run_id(parent_run_id, step_id, index)
    body: ChildCommand = {
        "workflow": workflow,
        "input": to_json(input, what=f"the input of child {index} of step {step_id!r}"),
        "parent_run_id": parent_run_id,
        "parent_step": step_id,
        "root_run_id": root_run_id,
    }
    return ChildRequest(
        child,
        names.child_subject(parent_run_id, child),
        orjson.dumps(body),
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
    await asyncio.gather(
        *(
            x.js.publish(r.subject, r.body, headers=r.headers, timeout=x.settings.request_timeout)
            for r in reqs
        )
    )
    return [r.run_id for r in reqs]


async def invoke(x: RunExecution, key: str, wf: ChildWorkflow, input: Any = None) -> ChildHandle:
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
    x: RunExecution, key: str, items: Iterable[tuple[ChildWorkflow, Any]]
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


async def invoke_and_wait(x: RunExecution, key: str, wf: ChildWorkflow, input: Any = None) -> Any:
    [result] = await batch_invoke_and_wait(x, key, [(wf, input)])
    return result


# --------------------------------------------------------------------------- wake machinery


__all__ = [
    "APPROVAL_URL",
    "WAIT_KINDS",
    "ChildHandle",
    "ChildRequest",
    "ReceivedEvent",
    "Resumed",
    "approval_url",
    "batch_invoke_and_wait",
    "child_request",
    "child_run_id",
    "invoke",
    "invoke_and_wait",
    "retry_later",
    "sleep",
    "sleep_until",
    "suspend",
    "wait_for_event",
]
