"""The task message: what a worker gets to execute a run, defined once for every writer (the
orchestrator's dispatch, admission) and reader (the worker, the worker's side of admission).

On ``<p>.task.<workflow>`` (stream ``<P>_TASKS``, a work queue), one JSON object:

- ``run_id``, ``workflow``: the run to execute;
- ``seq`` and ``history``: the run's whole stored history up to ``seq`` (``[[seq, event], ...]``),
  when the dispatcher had it (a new run, a woken one): the worker claims fenced on ``seq``
  without reading (a fence that fails means the run moved on, and the worker reads it);
- ``queue``, ``slots``, ``adm``, ``lease``: for a run admitted to a limited queue, the queue,
  the slot keys it holds, the admission's sequence and the slots' lease.

Published once per cause (message id ``<run>/t/<cause seq>``), through the retrying path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from nats.aio.client import Client as NATS

from polos import history as ev
from polos._private.store.names import Names
from polos._private.store.writes import MSG_ID, publish, retry_transient

# The most history a task carries, in bytes of stored events (more: the worker reads it).
INLINE_HISTORY = 32 * 1024


class TaskDecodeError(ValueError):
    """A message on a task subject that is not a task (dead-lettered by the worker)."""


@dataclass(frozen=True, slots=True)
class Task:
    run_id: str
    workflow: str
    # The history the task carries: (seq, event) up to ``seq``; empty when it carries none.
    seq: int | None = None
    history: tuple[tuple[int, ev.Event], ...] = ()
    # An admission to a limited queue.
    queue: str | None = None
    slots: tuple[str, ...] = ()
    adm: int | None = None
    lease: float = 30.0
    # The sequence of the run's event the task was put out for (its request, a wake, an
    # admission): a worker's read of the run that does not reach it came from a replica behind
    # the leader. None in a task from an orchestrator that did not say.
    cause: int | None = None

    @property
    def admitted(self) -> bool:
        """Whether the task was admitted under ``queue`` (a limited queue's admission)."""
        return self.adm is not None and self.queue is not None

    def carried_state(self) -> ev.RunState | None:
        """The run's state from the history the task carries, or None (it carries none, or
        one that does not begin with the run's request and end at ``seq``). Only a guess until
        the claim lands: the claim is fenced on ``seq``."""
        if not self.history or self.seq is None:
            return None
        if any(getattr(e, "run_id", self.run_id) != self.run_id for _, e in self.history):
            return None
        try:
            state = ev.RunState.fold(self.run_id, list(self.history))
        except ev.SequenceError:
            return None
        if not isinstance(self.history[0][1], ev.RunRequested) or state.last_seq != self.seq:
            return None
        return state


def encode_task(
    run_id: str,
    workflow: str,
    *,
    history: list[tuple[int, bytes]] | None = None,
    queue: str | None = None,
    slots: list[str] | None = None,
    adm: int | None = None,
    lease: float | None = None,
    cause: int | None = None,
) -> bytes:
    """A task's message. ``history``: the run's stored event bodies by sequence, carried when
    they fit in ``INLINE_HISTORY`` (the bodies go in as they were stored, not re-encoded).
    ``cause``: the sequence of the event it is put out for (``Task.cause``)."""
    body: dict[str, Any] = {"run_id": run_id, "workflow": workflow}
    if cause is not None:
        body["cause"] = cause
    if history and sum(len(b) for _, b in history) <= INLINE_HISTORY:
        body["seq"] = history[-1][0]
        body["history"] = [[seq, orjson.Fragment(b)] for seq, b in history]
    if queue is not None:
        body.update(queue=queue, slots=list(slots or []), adm=adm, lease=lease)
    return orjson.dumps(body)


def decode_task(data: bytes) -> Task:
    """The task in a message; ``TaskDecodeError`` saying what is wrong with one that is not.
    A carried history that cannot be read is dropped (the worker reads the run instead)."""
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise TaskDecodeError(f"malformed task: not JSON ({exc})") from exc
    if not isinstance(body, dict):
        raise TaskDecodeError(f"malformed task: not a JSON object but {type(body).__name__}")
    run_id, workflow = body.get("run_id"), body.get("workflow")
    if not isinstance(run_id, str) or not isinstance(workflow, str):
        raise TaskDecodeError("malformed task: run_id and workflow must be strings")
    slots = body.get("slots") or []
    adm, lease, queue = body.get("adm"), body.get("lease", 30.0), body.get("queue")
    if (
        not isinstance(slots, list)
        or not all(isinstance(s, str) for s in slots)
        or not (adm is None or _is_int(adm))
        or not isinstance(lease, int | float)
        or not (queue is None or isinstance(queue, str))
    ):
        raise TaskDecodeError("malformed task: queue, slots, adm or lease of the wrong type")
    seq = body.get("seq")
    if not (isinstance(seq, int) and not isinstance(seq, bool) and seq > 0):
        seq = None
    history = _history(body.get("history")) if seq is not None else ()
    given: Any = body.get("cause")
    # Not a sequence: the worker reads the run as before, without the check.
    cause: int | None = given if _is_int(given) and given > 0 else None
    return Task(
        run_id,
        workflow,
        seq if history else None,
        history,
        queue,
        tuple(slots),
        adm,
        float(lease),
        cause,
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _history(carried: Any) -> tuple[tuple[int, ev.Event], ...]:
    if not isinstance(carried, list):
        return ()
    out: list[tuple[int, ev.Event]] = []
    for item in carried:
        if not (
            isinstance(item, list)
            and len(item) == 2
            and _is_int(item[0])
            and isinstance(item[1], dict)
        ):
            return ()
        try:
            out.append((item[0], ev.decode_body(item[1])))
        except ev.EventDecodeError:
            return ()
    return tuple(out)


async def publish_task(
    nc: NATS,
    names: Names,
    run_id: str,
    workflow: str,
    cause_seq: int,
    task: bytes,
    *,
    timeout: float,
) -> bool:
    """Put ``task`` on the workflow's task subject, once per cause (message id
    ``<run>/t/<cause seq>``). False when an earlier dispatch of this cause had put it out
    already (the stream dropped this copy); a retry that finds its own first try stored counts
    as putting it out. Retried through a leader election: the run's history already says it is
    due, and nothing else would put its task out (the message id drops a second copy)."""
    subject = names.task_subject(workflow)
    headers = {MSG_ID: task_msg_id(run_id, cause_seq)}

    async def once(attempt: int) -> bool:
        ack = await publish(nc, subject, task, headers=headers, timeout=timeout)
        # After a first try whose answer was lost, "duplicate" is most likely that try.
        return not ack.duplicate or attempt > 0

    return await retry_transient(once, timeout=timeout, what=f"task of run {run_id}")


def task_msg_id(run_id: str, cause_seq: int) -> str:
    return f"{run_id}/t/{cause_seq}"


__all__ = [
    "INLINE_HISTORY",
    "Task",
    "TaskDecodeError",
    "decode_task",
    "encode_task",
    "publish_task",
    "task_msg_id",
]
