"""The run index entry: one KV entry per run in ``<prefix>_runs``, a projection of the run's
control events kept by the orchestrator (``fold_index``, by compare-and-set) and read by
``PolosClient.list_runs``, ``polos runs``, the web UI, retention and the orchestrator itself.

It can be rebuilt from the log at any time; ``seq`` is the last control event folded in, so an
instance that sees a run's events out of order ignores anything older.
"""

from __future__ import annotations

from typing import Any, TypedDict

from polos import history as ev


class Waiting(TypedDict):
    """What a suspended run waits for (from its ``RunSuspended``)."""

    step: str
    kind: str
    data: Any
    topic: str | None
    wake_at: float | None
    timeout_at: float | None


class IndexEntry(TypedDict, total=False):
    run_id: str
    seq: int
    status: ev.RunStatus
    workflow: str
    queue: str | None
    concurrency_key: str | None
    parent_run_id: str | None
    source: str
    created_at: float
    updated_at: float
    started_at: float
    ended_at: float
    worker_id: str
    attempt: int
    waiting: Waiting | None
    error: dict[str, Any]
    # The queue whose slots the run holds since its last admission: the one its release must
    # give back to.
    admitted_queue: str
    # Set by retention once the run's history is archived (the entry stays listed).
    archived: bool
    archived_at: float


def waiting_of(event: ev.RunSuspended) -> Waiting:
    return {
        "step": event.step,
        "kind": event.kind,
        "data": event.data,
        "topic": event.topic,
        "wake_at": event.wake_at,
        "timeout_at": event.timeout_at,
    }


def fold_index(entry: IndexEntry, seq: int, event: ev.Event, *, stale: bool = False) -> IndexEntry:
    """The entry with one control event folded in. ``stale``: a newer event was folded first
    (instances race), so only the run's identity is taken from this (its ``RunRequested``)."""
    e: IndexEntry = {**entry}
    if stale:
        # A newer event was folded first (instances race): keep its status, add the run's
        # identity from the request.
        assert isinstance(event, ev.RunRequested)
        e.update(
            {
                "workflow": event.workflow,
                "created_at": event.at,
                "queue": event.queue,
                "concurrency_key": event.concurrency_key,
                "parent_run_id": event.parent_run_id,
                "source": event.source,
            }
        )
        return e
    e["seq"] = seq
    e["updated_at"] = event.at
    if isinstance(event, ev.RunRequested):
        e.update(
            {
                "workflow": event.workflow,
                "status": "queued",
                "created_at": event.at,
                "queue": event.queue,
                "concurrency_key": event.concurrency_key,
                "parent_run_id": event.parent_run_id,
                "source": event.source,
            }
        )
    elif isinstance(event, ev.RunClaimed):
        e.update({"status": "running", "worker_id": event.worker_id, "attempt": event.attempt})
        e.setdefault("started_at", event.at)
    elif isinstance(event, ev.RunSuspended):
        e.update({"status": "suspended", "waiting": waiting_of(event)})
    elif isinstance(event, ev.RunWoken):
        e.update({"status": "queued", "waiting": None})
        if isinstance(event, ev.RunAdmitted):
            # The queue whose slots the run holds: the one its release must give back to.
            e.update({"admitted_queue": event.queue})
    elif isinstance(event, ev.RunCompleted):
        e.update({"status": "completed", "ended_at": event.at, "waiting": None})
    elif isinstance(event, ev.RunFailed):
        e.update({"status": "failed", "ended_at": event.at, "error": event.error, "waiting": None})
    elif isinstance(event, ev.RunCancelled):
        e.update({"status": "cancelled", "ended_at": event.at, "waiting": None})
    return e


__all__ = ["IndexEntry", "Waiting", "fold_index", "waiting_of"]
