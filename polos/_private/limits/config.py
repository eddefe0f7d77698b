"""Queue and rate-limit configuration: the plain KV bucket ``<prefix>_queues``.

Workers register the ``Queue`` objects of their workflows there, operators may put their own;
``LimitsConfig`` reads it with a short cache (how long a changed limit takes to apply).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from polos._private.limits.slots import store_for, token
from polos._private.model.aio import Flights
from polos._private.model.values import Queue, RateLimit
from polos._private.store import (
    Names,
)

if TYPE_CHECKING:
    from polos._private.model.values import WorkflowDefinition
    from polos.config import Settings

log = logging.getLogger("polos.limits")


# --------------------------------------------------------------------------- configuration


def queue_key(name: str) -> str:
    return f"queue.{name}"


def rate_key(scope: str) -> str:
    return f"rate.{token(scope)}"


async def put_queue(js: JetStreamContext, names: Names, queue: Queue) -> None:
    kv = await js.key_value(names.queues_bucket)
    await kv.put(queue_key(queue.name), orjson.dumps(queue.to_dict()))


async def put_rate_limit(
    js: JetStreamContext, names: Names, scope: str, limit: RateLimit | None
) -> None:
    kv = await js.key_value(names.queues_bucket)
    if limit is None:
        with contextlib.suppress(nats.js.errors.KeyNotFoundError):
            await kv.delete(rate_key(scope))
        return
    await kv.put(rate_key(scope), orjson.dumps({"scope": scope, **limit.to_dict()}))


async def register_queues(
    nc: NATS | None,
    js: JetStreamContext | None,
    names: Names,
    settings: Settings,
    workflows: Iterable[WorkflowDefinition[Any, Any]],
) -> None:
    """Publish the ``Queue`` objects of these workflows so orchestrators know their limits."""
    queues = [wf.options.get("queue_def") for wf in workflows]
    found = [q for q in queues if isinstance(q, Queue)]
    if not found:
        return
    assert nc is not None and js is not None, "not connected"
    for q in found:
        await put_queue(js, names, q)


class LimitsConfig:
    """Queue and rate-limit configuration as read from the queues bucket, cached briefly.

    ``ttl`` bounds how long a changed limit takes to apply everywhere.
    """

    def __init__(self, js: JetStreamContext, names: Names, ttl: float = 1.0) -> None:
        self._js = js
        self._names = names
        self._ttl = ttl
        self._cache: dict[str, tuple[float, Any]] = {}
        # Reads in flight, by cache key: when an entry expires under load, every lookup until
        # the first read returns would otherwise make its own (hundreds of dispatches at once
        # each paid a KV read once a second: 3-5 % of the orchestrator's CPU at 700 runs/s).
        self._reads: Flights[Any] = Flights()
        # ``js.key_value`` asks the server for the bucket's stream info every time: a round
        # trip per lookup on the orchestrator's hot path, so the handle is kept.
        self._buckets: dict[str, Any] = {}

    async def _get(self, bucket: str, key: str) -> bytes | None:
        kv = self._buckets.get(bucket)
        if kv is None:
            kv = self._buckets[bucket] = await self._js.key_value(bucket)
        try:
            entry = await kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            return None
        return entry.value or None

    async def _cached(self, bucket: str, key: str, fresh: bool = False) -> Any:
        ck = f"{bucket}/{key}"
        now = time.monotonic()
        if fresh:
            self._reads.forget(ck)  # not one that began before the caller asked
        else:
            hit = self._cache.get(ck)
            if hit is not None and now - hit[0] < self._ttl:
                return hit[1]

        async def read() -> Any:
            raw = await self._get(bucket, key)
            return orjson.loads(raw) if raw else None

        def keep(value: Any) -> None:
            self._cache[ck] = (now, value)

        return await self._reads.get(ck, read, keep)

    @property
    def reads(self) -> int:
        """How many reads of the bucket this has made (lookups that shared one count once)."""
        return self._reads.fetches

    async def queue(self, name: str, *, fresh: bool = False) -> Queue | None:
        """The queue's limits, or None when it has none (every workflow's default queue).
        ``fresh``: read the bucket now, not the cache."""
        data = await self._cached(self._names.queues_bucket, queue_key(name), fresh)
        if not data:
            return None
        q = Queue.from_dict(data)
        return q if q.limited else None

    async def workflow_queue(self, workflow: str) -> str:
        """The queue a workflow's runs go to when the start names none: its ``@workflow(queue=)``
        or, by default, its own name."""
        data = await self._cached(self._names.workflows_bucket, workflow)
        return str((data or {}).get("queue") or workflow)

    def forget(self, *, workflow: str | None = None, queue: str | None = None) -> None:
        """Drop what is cached about a workflow and a queue (a worker said it is out of date)."""
        keys = []
        if workflow is not None:
            keys.append(f"{self._names.workflows_bucket}/{workflow}")
        if queue is not None:
            keys.append(f"{self._names.queues_bucket}/{queue_key(queue)}")
        for ck in keys:
            self._cache.pop(ck, None)
            self._reads.forget(ck)  # a read that began before this is neither shared nor kept

    async def rate_limit(self, scope: str) -> RateLimit | None:
        data = await self._cached(self._names.queues_bucket, rate_key(scope))
        if not data:
            return None
        return RateLimit.from_dict(data)


# --------------------------------------------------------------------------- stats


async def queue_stats(nc: NATS, js: JetStreamContext, names: Names) -> list[dict[str, Any]]:
    """Per queue and concurrency key: runs waiting for admission and slots held."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}

    def row(q: str, k: str) -> dict[str, Any]:
        return rows.setdefault(
            (q, k),
            {"queue": q, "key": k, "waiting": 0, "active": 0, "limit": None, "per_key": None},
        )

    with contextlib.suppress(nats.js.errors.NotFoundError):
        info = await js.stream_info(names.admit_stream, subjects_filter=names.admit_filter())
        for subj, count in (info.state.subjects or {}).items():
            parts = subj.split(".")
            row(parts[2], parts[3])["waiting"] += int(count)
    store = store_for(nc, js, names)
    with contextlib.suppress(Exception):
        for e in await store.entries("q.>"):
            parts = e.key.split(".")
            if len(parts) == 4 and parts[2] == "all":
                row(parts[1], "*")["active"] += 1
            elif len(parts) == 5 and parts[2] == "key":
                row(parts[1], parts[3])["active"] += 1
    config = LimitsConfig(js, names)
    for (q, _), r in rows.items():
        with contextlib.suppress(Exception):
            cfg = await config.queue(q)
            if cfg is not None:
                r["limit"], r["per_key"] = cfg.concurrency, cfg.per_key
    return sorted(rows.values(), key=lambda r: (r["queue"], r["key"]))


__all__ = [
    "LimitsConfig",
    "put_queue",
    "put_rate_limit",
    "queue_key",
    "queue_stats",
    "rate_key",
    "register_queues",
]
