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
from polos._private.model.values import BatchStepResult, WorkflowDefinition
from polos._private.run.definitions import registered_workflows
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
from polos.errors import ChildWorkflowError, StepExecutionError, WaitTimeoutError

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
    """What ``ctx.step.suspend`` returns: the resume's ``data`` (any JSON) and when it came.

    It also reads as the original SDK's resume event, a dict: ``resumed["data"]``,
    ``resumed.get("data")``, and its ``event_type`` (``resume_<key>``), ``created_at``...
    """

    key: str
    data: Any
    at: float

    def to_dict(self) -> dict[str, Any]:
        """The original SDK's shape of a resume event."""
        return {
            "id": f"{self.key}/resume",
            "sequence_id": None,
            "topic": None,
            "event_type": f"resume_{self.key}",
            "data": self.data,
            "created_at": datetime.fromtimestamp(self.at, tz=UTC).isoformat(),
        }

    def __getitem__(self, name: str) -> Any:
        return self.to_dict()[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self.to_dict().get(name, default)

    def __contains__(self, name: object) -> bool:
        return name in self.to_dict()

    def keys(self) -> list[str]:
        return list(self.to_dict())


@dataclass(frozen=True)
class ReceivedEvent:
    """What ``ctx.step.wait_for_event`` returns (and an event-triggered run's input)."""

    topic: str
    data: Any
    time: datetime
    seq: int
    event_type: str | None = None

    # The original SDK's ``EventPayload`` names of the same fields.
    @property
    def sequence_id(self) -> int:
        return self.seq

    @property
    def created_at(self) -> datetime:
        return self.time

    @property
    def id(self) -> str:
        return f"{self.topic}/{self.seq}"


@dataclass(frozen=True)
class ChildHandle:
    """A child run started by ``ctx.step.invoke``; ``client.get_handle(run_id)`` follows it."""

    run_id: str
    workflow: str
    key: str

    @property
    def id(self) -> str:
        """The child's run id (the original SDK's ``ExecutionHandle.id``)."""
        return self.run_id

    @property
    def workflow_id(self) -> str:
        return self.workflow


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
            event_type=out.get("event_type"),
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


async def sleep_until(
    x: RunExecution, key: str, when: datetime | float, *, past_ok: bool = True
) -> None:
    """``past_ok=False``: a due time already past raises (``wait_until``, as the original)."""
    due = when.timestamp() if isinstance(when, datetime) else float(when)
    if isinstance(when, datetime) and when.tzinfo is None:
        raise ValueError("sleep_until needs an aware datetime (with a tzinfo)")
    step_id, found = await _begin(x, key, "sleep")
    if found is not None:
        return
    if not past_ok and due <= time.time():
        raise StepExecutionError(
            f"Wait date {datetime.fromtimestamp(due, tz=UTC).isoformat()} is in the past "
            f"(step {step_id!r})"
        )
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
        # Defined in this process too: its output comes back typed, as for a definition.
        local = registered_workflows().get(wf)
        return wf, local.output_type if local is not None else None
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
    options: ChildOptions | None = None,
) -> ChildRequest:
    """``options``: what the child gets besides its input (queue, concurrency key, session,
    user, root workflow, initial state), as ``ChildCommand`` fields."""
    child = child_run_id(parent_run_id, step_id, index)
    body: ChildCommand = {
        "workflow": workflow,
        "input": to_json(input, what=f"the input of child {index} of step {step_id!r}"),
        "parent_run_id": parent_run_id,
        "parent_step": step_id,
        "root_run_id": root_run_id,
    }
    for name, value in (options or {}).items():
        if value is not None:
            body[name] = value  # type: ignore[literal-required]
    return ChildRequest(
        child,
        names.child_subject(parent_run_id, child),
        orjson.dumps(body),
        {MSG_ID: f"child/{child}"},
    )


ChildOptions = dict[str, Any]


def inherited(x: RunExecution) -> ChildOptions:
    """What every child of this run inherits: its session, its user and the root's workflow."""
    req = x.state.requested
    return {
        "session_id": req.session_id if req else None,
        "user_id": req.user_id if req else None,
        "root_workflow": (req.root_workflow if req else None) or x.workflow.name,
    }


async def _request_children(
    x: RunExecution,
    step_id: str,
    items: Sequence[tuple[str, Any]],
    first_index: int = 0,
    options: Sequence[ChildOptions | None] | None = None,
) -> list[str]:
    root = (x.state.requested.root_run_id if x.state.requested else None) or x.run_id
    base = inherited(x)
    opts = list(options or [])
    reqs = [
        child_request(
            x.names,
            x.run_id,
            root,
            step_id,
            i,
            name,
            value,
            {**base, **(opts[i - first_index] or {})} if i - first_index < len(opts) else base,
        )
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


async def invoke(
    x: RunExecution,
    key: str,
    wf: ChildWorkflow,
    input: Any = None,
    options: ChildOptions | None = None,
) -> ChildHandle:
    [handle] = await batch_invoke(x, key, [(wf, input)], [options], single=True)
    return handle


async def batch_invoke(
    x: RunExecution,
    key: str,
    items: Iterable[tuple[ChildWorkflow, Any]],
    options: Sequence[ChildOptions | None] | None = None,
    *,
    single: bool = False,
) -> list[ChildHandle]:
    """Start child runs (exactly once for this step) without waiting for them."""
    pairs = list(items)
    names = [_wf_name(wf)[0] for wf, _ in pairs]
    step_id, found = await _begin(x, key, "invoke")
    if found is not None:
        out = found.output or {}
        recorded = out.get("children") if not single else [out]
        return [
            ChildHandle(run_id=str(c["run_id"]), workflow=str(c["workflow"]), key=step_id)
            for c in recorded or []
        ]
    if not pairs:
        await x.record(
            ev.StepCompleted(key=step_id, kind="invoke", output={"children": []}),
            msg_id=f"{x.run_id}/s/{step_id}",
        )
        return []
    ids = await _request_children(
        x, step_id, [(n, v) for n, (_, v) in zip(names, pairs, strict=True)], options=options
    )
    children = [{"run_id": c, "workflow": n} for c, n in zip(ids, names, strict=True)]
    # One child keeps the shape earlier versions recorded (lineage reads ``run_id``).
    output: dict[str, Any] = children[0] if single else {"children": children}
    await x.record(
        ev.StepCompleted(key=step_id, kind="invoke", output=output),
        msg_id=f"{x.run_id}/s/{step_id}",
    )
    return [ChildHandle(run_id=c["run_id"], workflow=c["workflow"], key=step_id) for c in children]


def _outcomes(
    step_id: str, children: list[dict[str, Any]], out_types: list[Any], as_results: bool
) -> list[Any]:
    if not as_results:
        if any(c.get("status") != "completed" for c in children):
            raise ChildWorkflowError(step_id, children)
        return [from_json(c.get("output"), tp) for c, tp in zip(children, out_types, strict=False)]
    results = []
    for c, tp in zip(children, out_types, strict=False):
        ok = c.get("status") == "completed"
        err = c.get("error") or {}
        results.append(
            BatchStepResult(
                workflow_id=str(c.get("workflow")),
                success=ok,
                result=from_json(c.get("output"), tp) if ok else None,
                error=None
                if ok
                else str(err.get("message") if isinstance(err, dict) else err)
                or str(c.get("status")),
            )
        )
    return results


async def batch_invoke_and_wait(
    x: RunExecution,
    key: str,
    items: Iterable[tuple[ChildWorkflow, Any]],
    options: Sequence[ChildOptions | None] | None = None,
    *,
    as_results: bool = False,
) -> list[Any]:
    """The children's outputs in order (a failed child raises ``ChildWorkflowError``), or,
    ``as_results``, one ``BatchStepResult`` each (a failure is a result, never raised)."""
    resolved = [(_wf_name(wf), value) for wf, value in items]
    out_types = [out_type for (_, out_type), _ in resolved]
    step_id, found = await _begin(x, key, "child")
    if found is not None:
        children: list[dict[str, Any]] = list((found.output or {}).get("children") or [])
        return _outcomes(step_id, children, out_types, as_results)
    if not resolved:
        await x.record(
            ev.StepCompleted(key=step_id, kind="child", output={"children": []}),
            msg_id=f"{x.run_id}/s/{step_id}",
        )
        return []
    ids = await _request_children(x, step_id, [(n, v) for (n, _), v in resolved], options=options)
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


async def invoke_and_wait(
    x: RunExecution,
    key: str,
    wf: ChildWorkflow,
    input: Any = None,
    options: ChildOptions | None = None,
) -> Any:
    [result] = await batch_invoke_and_wait(x, key, [(wf, input)], [options])
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
    "batch_invoke",
    "batch_invoke_and_wait",
    "child_request",
    "child_run_id",
    "inherited",
    "invoke",
    "invoke_and_wait",
    "retry_later",
    "sleep",
    "sleep_until",
    "suspend",
    "wait_for_event",
]
