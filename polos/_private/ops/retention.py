"""Retention: finished runs leave the hot history stream once analytics has exported them.

Reading a run's history gets slower as the history stream grows (a batch direct get walks the
stream's index), and finished runs are never replayed again. So, under this policy, a run's
history subjects are purged from ``<PREFIX>_RUNS`` and its large payload objects deleted when:

1. the run is finished (completed, failed or cancelled) according to the run index,
2. it finished more than ``older_than`` seconds ago (a grace period for clients still reading
   the result), and
3. every event of the run is already exported: its last event's stream sequence is at or below
   the export position of the ``history`` table (``analytics.export.exported_upto``). The
   exporter writes large payloads resolved, so nothing is lost to analytics.

The run's index entry stays, marked ``archived``, so ``polos runs`` still lists it.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import nats.js.errors
import orjson

from polos._private.store import Names, is_live, last_per_subject, payloads, snapshots
from polos._private.store.tokens import parse_time

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS
    from nats.js import JetStreamContext

TERMINAL = ("completed", "failed", "cancelled")


@dataclass
class RetentionResult:
    archived: list[str] = field(default_factory=list)
    kept_not_exported: int = 0
    kept_too_recent: int = 0
    payload_objects_deleted: int = 0
    seconds: float = 0.0


async def archive_exported_runs(
    nc: NATS,
    js: JetStreamContext,
    names: Names,
    *,
    exported_upto: int,
    older_than: float,
    now: float | None = None,
    dry_run: bool = False,
) -> RetentionResult:
    """Purge the history of every finished run that is exported and older than ``older_than``."""
    t0 = time.perf_counter()
    now = time.time() if now is None else now
    result = RetentionResult()
    bucket = names.runs_bucket
    index = await js.key_value(bucket)
    entries = await last_per_subject(nc, f"KV_{bucket}", f"$KV.{bucket}.>")
    # The run's payload objects, listed once: names are "<run_id>/<sha256>". External events'
    # objects ("event:<id>") go when their event has aged out of the events stream; a run
    # woken by one keeps its own copy.
    objects: dict[str, list[str]] = {}
    aged_events: list[str] = []
    obs = None
    with contextlib.suppress(nats.js.errors.NotFoundError):
        await js.stream_info(f"OBJ_{payloads.bucket_name(names)}")
        obs = await payloads.store(js, names)
        events_age = (await js.stream_info(names.events_stream)).config.max_age or 0.0
        for info in await obs.list(ignore_deletes=True):
            if info.name.startswith(payloads.EVENT_PREFIX):
                if events_age and now - parse_time(info.mtime) > events_age:
                    aged_events.append(info.name)
                continue
            objects.setdefault(info.name.split("/", 1)[0], []).append(info.name)
    for name in [] if dry_run else aged_events:
        assert obs is not None
        await obs.delete(name)
        result.payload_objects_deleted += 1
    for msg in entries:
        if not is_live(msg):
            continue
        entry: dict[str, Any] = orjson.loads(msg.data)
        if entry.get("archived") or entry.get("status") not in TERMINAL:
            continue
        run_id = entry["run_id"]
        # The terminal event is the run's last append, and the entry's seq is that event's.
        if int(entry.get("seq") or 0) > exported_upto or not entry.get("seq"):
            result.kept_not_exported += 1
            continue
        ended = entry.get("ended_at") or entry.get("updated_at") or now
        if now - float(ended) < older_than:
            result.kept_too_recent += 1
            continue
        result.archived.append(run_id)
        if dry_run:
            continue
        await js.purge_stream(names.runs_stream, subject=names.run_filter(run_id))
        # A replay snapshot left behind (a worker lost before the run ended); its object, if
        # any, is one of the run's payload objects removed below.
        with contextlib.suppress(Exception):
            await snapshots.purge(nc, names, run_id)
        for name in objects.get(run_id, []):
            assert obs is not None
            await obs.delete(name)
            result.payload_objects_deleted += 1
        entry.update(archived=True, archived_at=now)
        # A concurrent index update (another retention pass) is harmless: it says the same.
        with contextlib.suppress(
            nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.BadRequestError
        ):
            await index.update(run_id, orjson.dumps(entry), last=msg.seq)
    result.seconds = time.perf_counter() - t0
    return result


__all__ = ["RetentionResult", "archive_exported_runs"]
