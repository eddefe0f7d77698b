"""The worker's side of admission: a run of a limited queue executes only under an admission
of that queue, keeping its slot leases alive while it runs; anything else goes back to wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from polos import history as ev
from polos._private.limits.slots import DEFAULT_KEY, SlotLease, store_for
from polos._private.model.values import Queue
from polos._private.store import (
    FencedOut,
    Names,
    append,
    load_state,
)
from polos._private.store.task import Task

if TYPE_CHECKING:
    from polos._private.model.values import WorkflowDefinition

log = logging.getLogger("polos.limits")


NOT_ADMITTED = "not admitted under its workflow's queue"


def declared_queues(workflows: Iterable[WorkflowDefinition[Any, Any]]) -> dict[str, Queue]:
    """The limited queues these workflows declare in code (``@workflow(queue=Queue(...))``)."""
    out: dict[str, Queue] = {}
    for wf in workflows:
        q = wf.options.get("queue_def")
        if isinstance(q, Queue) and q.limited:
            out[q.name] = q
    return out


def admission_needed(
    declared: dict[str, Queue],
    wf: WorkflowDefinition[Any, Any],
    task: Task,
    requested: ev.RunRequested,
) -> str | None:
    """The queue a run must be admitted under before this worker may execute it, or None.

    A worker knows the limited queues its own workflows declare; the orchestrator only knows
    what some worker registered and it cached (nothing yet for a run started before the first
    worker came up, or a moment before a deploy). So the worker refuses a run of a declared
    limited queue whose task was not admitted under that queue (``adm`` and ``queue``), and
    the run goes back to admission instead. A start that names another queue is ruled by that
    queue's registered limits (the worker has no code for them)."""
    if not declared:
        return None
    name = requested.queue or wf.task_queue
    if name not in declared:
        return None
    if task.admitted and task.queue == name:
        return None
    return name


async def send_to_admission(
    js: JetStreamContext, names: Names, state: ev.RunState, queue: str | None, reason: str
) -> int:
    """Record ``RunSuspended(kind="slot", step="admission")`` fenced on the state's last event:
    the orchestrator puts the run in line for ``queue`` (None: the one it resolves) and admits
    it when there is room. Raises ``FencedOut`` when the run moved on meanwhile."""
    requested = state.requested
    assert requested is not None
    data: dict[str, Any] = {"reason": reason}
    if queue is not None:
        data.update(
            queue=queue,
            concurrency_key=requested.concurrency_key or DEFAULT_KEY,
            workflow=requested.workflow,
        )
    event = ev.RunSuspended(run_id=state.run_id, step="admission", kind="slot", data=data)
    return await append(
        js,
        names,
        state.run_id,
        event,
        expected_last_seq=state.last_seq,
        msg_id=f"{state.run_id}/w/{state.last_seq}",
    )


async def requeue_for_slot(
    nc: NATS, js: JetStreamContext, names: Names, run_id: str, queue: str | None = None
) -> None:
    """Send a run whose slot was lost back to admission: it waits again, holding no worker."""
    for _ in range(5):
        state = await load_state(nc, names, run_id)
        if state.done or state.status == "suspended" or state.requested is None:
            return
        try:
            await send_to_admission(js, names, state, queue, "slot lease lost")
            return
        except FencedOut:
            continue


async def run_holding_slots(
    nc: NATS, js: JetStreamContext, names: Names, task: Task, execute: Callable[[], Awaitable[str]]
) -> str:
    """Run ``execute`` while keeping the task's slot leases alive (a no-op for unlimited runs).

    Called once the worker has claimed the run, so a stale task (the run moved on) never
    takes a slot. The orchestrator releases the slots when the run's history says it ended or
    suspended; if this worker dies the leases run out.
    """
    if not task.slots:
        return await execute()
    store = store_for(nc, js, names)
    run_id = task.run_id
    lease = SlotLease(store, run_id, task.adm or 0, task.lease)
    if not await lease.take_over(list(task.slots)):
        log.info("run %s: its slot was taken while it waited; back to admission", run_id)
        await requeue_for_slot(nc, js, names, run_id, task.queue)
        return "done"
    keeper = asyncio.create_task(lease.keep_alive(), name=f"lease-{run_id}")
    try:
        return await execute()
    finally:
        keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await keeper


__all__ = [
    "NOT_ADMITTED",
    "admission_needed",
    "declared_queues",
    "requeue_for_slot",
    "run_holding_slots",
    "send_to_admission",
]
