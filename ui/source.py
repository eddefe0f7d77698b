"""Everything the UI reads from Polos below the public client, in one module.

The UI is a client: it connects with the client role and uses ``PolosClient`` for what the
client offers. What the client does not offer yet (raw history messages with their payload
references unresolved, objects of the payload store, the queues bucket, the KV watch of the
run index, the LLM helpers ``polos trace`` uses) comes from Polos internals, imported here and
nowhere else in ``polos_ui`` so that a reorganisation of ``polos._private`` has one place to
repoint.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import orjson

from polos import history as ev
from polos._private import limits
from polos._private.agents.decisions import decision_of
from polos._private.agents.pricing import LLMTotals
from polos._private.model.lineage import children_named
from polos._private.store import kv_entries, kv_stream, payloads, read_run
from polos._private.store.tokens import encode_token
from polos.client import PolosClient

__all__ = [
    "LLMTotals",
    "RawEvent",
    "children_named",
    "decision_of",
    "encode_token",
    "load_payload",
    "queue_rows",
    "raw_history",
    "run_subjects",
    "runs_bucket_stream",
    "workflow_docs",
]

REFS = payloads.REFS


@dataclass
class RawEvent:
    """One stored event of a run, decoded without fetching what lives in the Object Store:
    ``refs`` maps a field (or ``field.member``) to the object holding its value."""

    seq: int
    event: ev.Event
    refs: dict[str, str] = field(default_factory=dict)
    size: int = 0


async def raw_history(client: PolosClient, run_id: str) -> list[RawEvent]:
    """The run's events in order, large fields left as references (``load_payload``)."""
    msgs = await read_run(client.nc, client.names, run_id)
    out: list[RawEvent] = []
    for m in msgs:
        body = orjson.loads(m.data)
        refs: dict[str, str] = {}
        if isinstance(body, dict):
            refs = body.pop(REFS, None) or {}
        try:
            event = ev.decode_body(body, m.data)
        except ev.EventDecodeError:
            continue  # not an event (the orchestrator dead-letters those); nothing to show
        out.append(RawEvent(m.seq, event, dict(refs), len(m.data)))
    return out


async def load_payload(client: PolosClient, run_id: str, name: str) -> Any:
    """The value of one payload object of ``run_id`` (only that run's objects)."""
    if not name.startswith(f"{run_id}/"):
        raise ValueError(f"object {name!r} is not one of run {run_id}'s payloads")
    return await payloads.get_value(client.js, client.names, name)


def run_subjects(client: PolosClient, run_id: str) -> list[str]:
    """The subjects a run's history is appended to (live updates of a run page)."""
    return [client.names.run_subject(run_id, kind) for kind in ev.HISTORY_KINDS]


def runs_bucket_stream(client: PolosClient) -> tuple[str, str]:
    """The run index's stream and its subject filter (the projection watches it)."""
    bucket = client.names.runs_bucket
    return kv_stream(bucket), f"$KV.{bucket}.>"


async def _bucket_entries(client: PolosClient, bucket: str) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    with contextlib.suppress(Exception):  # a bucket nobody created yet: nothing in it
        for e in await kv_entries(client.nc, bucket):
            with contextlib.suppress(orjson.JSONDecodeError):
                out.append((e.key, orjson.loads(e.value)))
    return out


async def workflow_docs(client: PolosClient) -> list[dict[str, Any]]:
    """What workers registered about each workflow (input schema, queue, trigger, schedule)."""
    docs = [
        doc
        for _, doc in await _bucket_entries(client, client.names.workflows_bucket)
        if isinstance(doc, dict)
    ]
    return sorted(docs, key=lambda d: str(d.get("name")))


async def queue_rows(client: PolosClient) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Each queue with its limits, slots held and runs waiting; and the rate limits."""
    stats = await limits.queue_stats(client.nc, client.js, client.names)
    queues: dict[str, dict[str, Any]] = {}
    rates: list[dict[str, Any]] = []
    for key, doc in await _bucket_entries(client, client.names.queues_bucket):
        if not isinstance(doc, dict):
            continue
        kind, _, name = key.partition(".")
        if kind == "queue":
            queues[name] = {
                "queue": name,
                "concurrency": doc.get("concurrency"),
                "per_key": doc.get("per_key"),
                "rate_limit": doc.get("rate_limit"),
                "active": 0,
                "waiting": 0,
                "keys": [],
            }
        elif kind == "rate":
            rates.append({"scope": doc.get("scope") or name, **doc})
    for r in stats:
        q = queues.setdefault(
            r["queue"],
            {
                "queue": r["queue"],
                "concurrency": r["limit"],
                "per_key": r["per_key"],
                "rate_limit": None,
                "active": 0,
                "waiting": 0,
                "keys": [],
            },
        )
        if r["key"] == "*":
            q["active"] += r["active"]
            q["waiting"] += r["waiting"]
        else:
            q["keys"].append(r)
            q["waiting"] += r["waiting"]
            if q["concurrency"] is None:
                q["active"] += r["active"]
    return sorted(queues.values(), key=lambda q: q["queue"]), rates
