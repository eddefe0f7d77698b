"""Concurrency slots and rate limits that hold across every process of a namespace.

Both live in one KV bucket, ``<prefix>_slots`` (stream ``KV_<prefix>_slots``), written with raw
publishes so that every write is a compare-and-set on the key's revision:

* a **slot** is the key ``<pool>.<i>`` (``i`` < the pool's size). Taking it is a publish with
  ``Nats-Expected-Last-Subject-Sequence: 0`` (only one taker can win) and ``Nats-TTL`` (the
  lease). The holder renews by publishing again, expecting its own revision and sending the TTL
  again (``kv.update`` would drop the per-key TTL: DESIGN.md's nats-py trap). Giving a slot back
  deletes exactly the revision that was read, so a release never removes someone else's lease.
  A holder that dies simply stops renewing and the server removes the key when the TTL ends.
  The bucket has no ``subject_delete_marker_ttl`` (limit markers): an expired key leaves no
  message behind, so "free" is always "no message on the subject".
* a **rate bucket** is the key ``rate.<scope>``: a token bucket (``tok`` tokens, ``req``
  requests, refilled continuously at the per-minute rate, capped at the burst) updated by
  compare-and-set. Reservations take from it, settlements give back or take more, a provider's
  429 blocks it until its Retry-After.

Queue and rate-limit configuration is in a plain KV bucket, ``<prefix>_queues``: workers
register the ``Queue`` objects of their workflows there, operators may put their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import random
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from polos import history as ev
from polos._private.model.values import Queue, RateLimit
from polos._private.run.signals import Suspend
from polos._private.store import (
    EXPECTED_LAST_SUBJECT_SEQ,
    WRONG_LAST_SEQUENCE,
    FencedOut,
    Names,
    append,
    last_for_subject,
    last_per_subject,
    load_state,
    valid_token,
)
from polos._private.store.names import kv_stream

if TYPE_CHECKING:
    from polos._private.model.values import WorkflowDefinition
    from polos._private.run.execution import RunExecution
    from polos.config import Settings

log = logging.getLogger("polos.limits")

DEFAULT_KEY = "_"  # the concurrency key of runs started without one
TTL_HEADER = "Nats-TTL"


# --------------------------------------------------------------------------- names


# In the catalogue (polos/_private/store/names.py); these keep the callers' spelling.


def slots_bucket(names: Names) -> str:
    return names.slots_bucket


def slots_stream(names: Names) -> str:
    return kv_stream(names.slots_bucket)


def queues_bucket(names: Names) -> str:
    return names.queues_bucket


def admit_stream(names: Names) -> str:
    return names.admit_stream


def admit_subject(names: Names, queue: str, key_tok: str) -> str:
    """Where a run waiting for admission to ``queue`` under one concurrency key is kept."""
    return names.admit_subject(queue, key_tok)


def admit_filter(names: Names, queue: str | None = None) -> str:
    return names.admit_filter(queue)


def token(value: str) -> str:
    """``value`` as one subject/KV token: itself when it is a plain word, else a hash.

    Concurrency keys are user data (e-mail addresses, tenant names with dots); the raw value is
    always kept next to the token.
    """
    if valid_token(value) and len(value) <= 64 and not value.startswith("h-"):
        return value
    return "h-" + hashlib.sha1(value.encode()).hexdigest()[:20]


def pool_names(queue: Queue, key_tok: str) -> list[tuple[str, int]]:
    """The slot pools a run of ``queue`` under ``key_tok`` needs, widest first."""
    pools: list[tuple[str, int]] = []
    if queue.concurrency is not None:
        pools.append((f"q.{queue.name}.all", queue.concurrency))
    if queue.per_key is not None:
        pools.append((f"q.{queue.name}.key.{key_tok}", queue.per_key))
    return pools


# --------------------------------------------------------------------------- topology
# The slots bucket, the queues bucket and the admission stream are rows of the one topology
# (polos/_private/store/topology.py), created by the services at start; nothing here creates.


# --------------------------------------------------------------------------- configuration


def queue_key(name: str) -> str:
    return f"queue.{name}"


def rate_key(scope: str) -> str:
    return f"rate.{token(scope)}"


async def put_queue(js: JetStreamContext, names: Names, queue: Queue) -> None:
    kv = await js.key_value(queues_bucket(names))
    await kv.put(queue_key(queue.name), orjson.dumps(queue.to_dict()))


async def put_rate_limit(
    js: JetStreamContext, names: Names, scope: str, limit: RateLimit | None
) -> None:
    kv = await js.key_value(queues_bucket(names))
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
        hit = self._cache.get(f"{bucket}/{key}")
        now = time.monotonic()
        if hit is not None and now - hit[0] < self._ttl and not fresh:
            return hit[1]
        raw = await self._get(bucket, key)
        value = orjson.loads(raw) if raw else None
        self._cache[f"{bucket}/{key}"] = (now, value)
        return value

    async def queue(self, name: str, *, fresh: bool = False) -> Queue | None:
        """The queue's limits, or None when it has none (every workflow's default queue).
        ``fresh``: read the bucket now, not the cache."""
        data = await self._cached(queues_bucket(self._names), queue_key(name), fresh)
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
        if workflow is not None:
            self._cache.pop(f"{self._names.workflows_bucket}/{workflow}", None)
        if queue is not None:
            self._cache.pop(f"{queues_bucket(self._names)}/{queue_key(queue)}", None)

    async def rate_limit(self, scope: str) -> RateLimit | None:
        data = await self._cached(queues_bucket(self._names), rate_key(scope))
        if not data:
            return None
        return RateLimit.from_dict(data)


# --------------------------------------------------------------------------- raw KV ops


@dataclass(frozen=True, slots=True)
class Entry:
    key: str
    revision: int
    value: dict[str, Any]


def _ttl(seconds: float) -> str:
    # The server's TTL granularity is a second.
    return f"{max(1, math.ceil(seconds))}s"


class SlotStore:
    """Compare-and-set operations on the slots bucket. One per connection is plenty."""

    def __init__(self, nc: NATS, js: JetStreamContext, names: Names) -> None:
        self.nc = nc
        self.js = js
        self.names = names
        self.bucket = slots_bucket(names)
        self.stream = slots_stream(names)

    def subject(self, key: str) -> str:
        return f"$KV.{self.bucket}.{key}"

    async def entries(self, key_filter: str) -> list[Entry]:
        """Every live key matching ``key_filter`` (one direct-get request)."""
        msgs = await last_per_subject(self.nc, self.stream, self.subject(key_filter))
        out = []
        for m in msgs:
            if not m.data or (m.headers or {}).get("KV-Operation") in ("DEL", "PURGE"):
                continue
            out.append(Entry(m.subject[len(self.bucket) + 5 :], m.seq, orjson.loads(m.data)))
        return out

    async def get(self, key: str) -> Entry | None:
        m = await last_for_subject(self.nc, self.stream, self.subject(key))
        if m is None or not m.data or (m.headers or {}).get("KV-Operation") in ("DEL", "PURGE"):
            return None
        return Entry(key, m.seq, orjson.loads(m.data))

    async def put(
        self, key: str, value: dict[str, Any], *, expected: int, ttl: float | None = None
    ) -> int | None:
        """Write ``value`` iff the key's revision is ``expected`` (0: absent). The new revision,
        or None when someone else wrote first."""
        headers = {EXPECTED_LAST_SUBJECT_SEQ: str(expected)}
        if ttl is not None:
            headers[TTL_HEADER] = _ttl(ttl)
        try:
            ack = await self.js.publish(self.subject(key), orjson.dumps(value), headers=headers)
        except nats.js.errors.APIError as exc:
            if exc.err_code == WRONG_LAST_SEQUENCE:
                return None
            raise
        return int(ack.seq)

    async def delete(self, revision: int) -> bool:
        """Delete exactly this revision: False when it is already gone (renewed or released)."""
        resp = await self.nc.request(
            f"$JS.API.STREAM.MSG.DELETE.{self.stream}",
            orjson.dumps({"seq": revision, "no_erase": True}),
            timeout=5.0,
        )
        body = orjson.loads(resp.data)
        return bool(body.get("success"))

    # ------------------------------------------------------------------ slots

    async def acquire(
        self, pool: str, size: int, run_id: str, adm: int, lease: float
    ) -> str | None:
        """Take a free slot of ``pool`` for run ``run_id`` (admission ``adm``): its key or None."""
        value = {"run": run_id, "adm": adm, "at": time.time(), "lease": lease}
        if size > 2:
            # A blind try at a random slot first: one round trip when the pool has room.
            key = f"{pool}.{random.randrange(size)}"
            if await self.put(key, value, expected=0, ttl=lease) is not None:
                return key
        for _ in range(10):
            held = {e.key for e in await self.entries(f"{pool}.*")}
            free = [i for i in range(size) if f"{pool}.{i}" not in held]
            if not free:
                return None
            for i in free:
                key = f"{pool}.{i}"
                if await self.put(key, value, expected=0, ttl=lease) is not None:
                    return key
            # Every free slot we saw was taken meanwhile: look again, a release may have come.
        return None

    async def acquire_all(
        self, pools: list[tuple[str, int]], run_id: str, adm: int, lease: float
    ) -> tuple[list[str] | None, str | None]:
        """One slot of each pool, or none at all: (keys, None) or (None, the full pool)."""
        got: list[str] = []
        for pool, size in pools:
            key = await self.acquire(pool, size, run_id, adm, lease)
            if key is None:
                await self.release_keys(got, run_id)
                return None, pool
            got.append(key)
        return got, None

    async def release_keys(self, keys: Iterable[str], run_id: str, before: int | None = None) -> int:
        """Give back these slots if ``run_id`` still holds them (admitted before ``before``)."""
        n = 0
        for key in keys:
            for _ in range(5):
                e = await self.get(key)
                if e is None or e.value.get("run") != run_id:
                    break
                if before is not None and int(e.value.get("adm", 0)) >= before:
                    break
                if await self.delete(e.revision):
                    n += 1
                    break
                # Renewed between our read and our delete: read the new revision.
        return n

    async def release_run(
        self, pools: list[tuple[str, int]], run_id: str, before: int | None = None
    ) -> int:
        """Give back every slot of these pools that ``run_id`` holds from an admission older
        than ``before`` (a later admission of the same run keeps its slots)."""
        n = 0
        retry: list[str] = []
        for pool, _ in pools:
            for e in await self.entries(f"{pool}.*"):
                if e.value.get("run") != run_id:
                    continue
                if before is not None and int(e.value.get("adm", 0)) >= before:
                    continue
                # The listing gave the revision: delete it directly; a renewal in between
                # makes that fail, and the key is read again.
                if await self.delete(e.revision):
                    n += 1
                else:
                    retry.append(e.key)
        return n + (await self.release_keys(retry, run_id, before) if retry else 0)


# --------------------------------------------------------------------------- worker side


class SlotLease:
    """The slots a worker's run holds, kept alive while it executes."""

    def __init__(self, store: SlotStore, run_id: str, adm: int, lease: float) -> None:
        self.store = store
        self.run_id = run_id
        self.adm = adm
        self.lease = lease
        self.revisions: dict[str, int] = {}
        self.lost: list[str] = []

    async def take_over(self, keys: list[str]) -> bool:
        """Adopt the slots the orchestrator took for this run. A slot whose lease ran out (the
        task waited, or the last worker died) is taken again if it is free; False if another
        run has it now."""
        for key in keys:
            e = await self.store.get(key)
            if e is not None and e.value.get("run") == self.run_id:
                self.revisions[key] = e.revision
                continue
            if e is None:
                value = {"run": self.run_id, "adm": self.adm, "at": time.time(), "lease": self.lease}
                rev = await self.store.put(key, value, expected=0, ttl=self.lease)
                if rev is not None:
                    self.revisions[key] = rev
                    continue
            await self.store.release_keys(list(self.revisions), self.run_id)
            self.revisions.clear()
            return False
        return True

    async def renew(self) -> None:
        for key, rev in list(self.revisions.items()):
            value = {"run": self.run_id, "adm": self.adm, "at": time.time(), "lease": self.lease}
            new = await self.store.put(key, value, expected=rev, ttl=self.lease)
            if new is None:
                # Released (the run ended or suspended) or expired and taken: stop renewing.
                self.revisions.pop(key, None)
                self.lost.append(key)
            else:
                self.revisions[key] = new

    async def keep_alive(self) -> None:
        # A third of the lease: two renewals may be lost before the lease runs out.
        while self.revisions:
            await asyncio.sleep(self.lease / 3)
            with contextlib.suppress(Exception):
                await self.renew()


_stores: weakref.WeakKeyDictionary[NATS, dict[str, SlotStore]] = weakref.WeakKeyDictionary()


def store_for(nc: NATS, js: JetStreamContext, names: Names) -> SlotStore:
    by_prefix = _stores.setdefault(nc, {})
    s = by_prefix.get(names.prefix)
    if s is None:
        s = by_prefix[names.prefix] = SlotStore(nc, js, names)
    return s


NOT_ADMITTED = "not admitted under its workflow's queue"


def declared_queues(workflows: Iterable[WorkflowDefinition[Any, Any]]) -> dict[str, Queue]:
    """The limited queues these workflows declare in code (``@workflow(queue=Queue(...))``)."""
    out: dict[str, Queue] = {}
    for wf in workflows:
        q = wf.options.get("queue_def")
        if isinstance(q, Queue) and q.limited:
            out[q.name] = q
    return out


def task_queue(task: dict[str, Any]) -> str | None:
    """The queue a task was admitted under: its ``queue``, or for a task from an orchestrator
    that did not write one, the queue its slot keys name (``q.<queue>.…``)."""
    name = task.get("queue")
    if isinstance(name, str):
        return name
    slots = task.get("slots") or []
    if slots and isinstance(slots[0], str) and slots[0].startswith("q."):
        return slots[0].split(".")[1]
    return None


def admission_needed(
    declared: dict[str, Queue], wf: WorkflowDefinition[Any, Any], task: dict[str, Any],
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
    if task.get("adm") is not None and task_queue(task) == name:
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
        data.update(queue=queue, concurrency_key=requested.concurrency_key or DEFAULT_KEY,
                    workflow=requested.workflow)
    event = ev.RunSuspended(run_id=state.run_id, step="admission", kind="slot", data=data)
    return await append(
        js, names, state.run_id, event, expected_last_seq=state.last_seq,
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
    worker: Any, task: dict[str, Any], execute: Callable[[], Awaitable[str]]
) -> str:
    """Run ``execute`` while keeping the task's slot leases alive (a no-op for unlimited runs).

    Called once the worker has claimed the run, so a stale task (the run moved on) never
    takes a slot. The orchestrator releases the slots when the run's history says it ended or
    suspended; if this worker dies the leases run out.
    """
    keys = task.get("slots")
    if not keys:
        return await execute()
    nc, js = worker._nc, worker._js
    store = store_for(nc, js, worker.names)
    run_id = str(task["run_id"])
    lease = SlotLease(store, run_id, int(task.get("adm", 0)), float(task.get("lease", 30.0)))
    if not await lease.take_over([str(k) for k in keys]):
        log.info("run %s: its slot was taken while it waited; back to admission", run_id)
        await requeue_for_slot(nc, js, worker.names, run_id, task_queue(task))
        return "done"
    keeper = asyncio.create_task(lease.keep_alive(), name=f"lease-{run_id}")
    try:
        return await execute()
    finally:
        keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await keeper


# --------------------------------------------------------------------------- rate limits


class RateLimited(Exception):
    """A reservation would have to wait longer than allowed. ``retry_at`` is when to try again
    (epoch seconds): an LLM step suspends durably until then instead of holding its worker."""

    def __init__(self, scope: str, retry_at: float) -> None:
        super().__init__(f"rate limit {scope!r}: capacity again at {retry_at:.3f}")
        self.scope = scope
        self.retry_at = retry_at


class RateStore:
    """Token buckets in the slots bucket, shared by every process, updated by compare-and-set."""

    def __init__(self, store: SlotStore) -> None:
        self.store = store

    @staticmethod
    def _refill(value: dict[str, Any] | None, limit: RateLimit, now: float) -> dict[str, float]:
        if value is None:
            return {"tok": limit.token_capacity, "req": limit.request_capacity, "at": now,
                    "until": 0.0, "due": 0.0, "booked": 0.0}
        dt = max(0.0, now - float(value.get("at", now)))
        tok = float(value.get("tok", 0.0))
        req = float(value.get("req", 0.0))
        if limit.tokens_per_minute:
            tok = min(limit.token_capacity, tok + dt * limit.tokens_per_minute / 60.0)
        if limit.requests_per_minute:
            req = min(limit.request_capacity, req + dt * limit.requests_per_minute / 60.0)
        return {"tok": tok, "req": req, "at": now, "until": float(value.get("until", 0.0)),
                "due": float(value.get("due", 0.0)), "booked": float(value.get("booked", 0.0))}

    async def _update(
        self,
        scope: str,
        limit: RateLimit,
        change: Callable[[dict[str, float], float], float],
    ) -> float:
        """Apply ``change`` (returns seconds to wait; 0 = it applied) by compare-and-set."""
        key = rate_key(scope)
        for _ in range(50):
            e = await self.store.get(key)
            now = time.time()
            state = self._refill(e.value if e else None, limit, now)
            wait = change(state, now)
            if wait > 0:
                return wait
            state["scope"] = scope  # type: ignore[assignment]
            if await self.store.put(key, state, expected=e.revision if e else 0) is not None:
                return 0.0
        raise RuntimeError(f"rate limit {scope!r}: too much contention")

    async def take(self, scope: str, limit: RateLimit, *, tokens: float, requests: float) -> float:
        """Take ``tokens`` and ``requests`` now, or return how long until they are there."""

        def change(s: dict[str, float], now: float) -> float:
            if max(s["until"], s["due"]) > now:
                return max(s["until"], s["due"]) - now  # blocked, or bookings wait ahead
            wait = 0.0
            if limit.tokens_per_minute and tokens > 0:
                # A request bigger than the burst waits until the bucket is full, then goes
                # (the balance goes negative): it must not wait forever.
                need = min(tokens, limit.token_capacity)
                if s["tok"] < need:
                    wait = max(wait, (need - s["tok"]) * 60.0 / limit.tokens_per_minute)
            if limit.requests_per_minute and requests > 0 and s["req"] < requests:
                wait = max(wait, (requests - s["req"]) * 60.0 / limit.requests_per_minute)
            if wait > 0:
                return wait
            s["tok"] -= tokens if limit.tokens_per_minute else 0
            s["req"] -= requests if limit.requests_per_minute else 0
            return 0.0

        return await self._update(scope, limit, change)

    async def book(
        self, scope: str, limit: RateLimit, *, tokens: float, requests: float
    ) -> tuple[float, int, float]:
        """Take ``tokens`` and ``requests`` in line: at once, whether or not the bucket holds
        them. The balance may go negative; whoever books next waits behind this booking, so
        bookings are served in the order they were made (FIFO). Returns when the booking's
        capacity should be there (epoch seconds, ``<= now``: at once), the bucket revision it
        was written at (the bookings of a scope are ordered by it) and its place in line (the
        tokens booked so far, this booking included) for ``shortfall``."""
        key = rate_key(scope)
        for _ in range(50):
            e = await self.store.get(key)
            now = time.time()
            s = self._refill(e.value if e else None, limit, now)
            # Never before a booking made earlier: capacity given back (a settled over-estimate)
            # must not let a newer booking overtake one that already waits for its time.
            ready = max(now, s["until"], s["due"])
            if limit.tokens_per_minute and tokens > 0:
                # A booking bigger than the burst waits for a full bucket, then goes (as in
                # ``take``): it must not wait forever.
                need = min(tokens, limit.token_capacity)
                if s["tok"] < need:
                    ready = max(ready, now + (need - s["tok"]) * 60.0 / limit.tokens_per_minute)
                s["tok"] -= tokens
                s["booked"] += tokens
            if limit.requests_per_minute and requests > 0:
                if s["req"] < requests:
                    wait = (requests - s["req"]) * 60.0 / limit.requests_per_minute
                    ready = max(ready, now + wait)
                s["req"] -= requests
            s["due"] = ready
            value: dict[str, Any] = {**s, "scope": scope}
            rev = await self.store.put(key, value, expected=e.revision if e else 0)
            if rev is not None:
                return ready, rev, s["booked"]
        raise RuntimeError(f"rate limit {scope!r}: too much contention")

    async def shortfall(self, scope: str, limit: RateLimit, *, place: float, tokens: float) -> float:
        """Seconds until a booking of ``tokens`` at ``place`` in line (``book``) is covered:
        0 when it is. The time ``book`` gave is an estimate made before the calls ahead settled;
        one that used more than it reserved is charged to the balance, and so delays every
        booking behind it (and a 429 since blocks them all)."""
        e = await self.store.get(rate_key(scope))
        now = time.time()
        s = self._refill(e.value if e else None, limit, now)
        wait = max(0.0, s["until"] - now)
        if limit.tokens_per_minute and tokens > 0:
            # The balance as it would be had this booking just been made: plus its own
            # tokens, plus those booked after it.
            available = s["tok"] + tokens + (s["booked"] - place)
            need = min(tokens, limit.token_capacity)
            if available < need:
                wait = max(wait, (need - available) * 60.0 / limit.tokens_per_minute)
        return wait

    async def give(
        self, scope: str, limit: RateLimit, *, tokens: float, requests: float = 0
    ) -> None:
        """Settle: ``tokens`` > 0 gives back an over-estimate, < 0 charges an under-estimate
        (the balance may go negative: the next callers wait the debt off). ``requests``: a
        booking given back unused."""
        tokens = tokens if limit.tokens_per_minute else 0
        requests = requests if limit.requests_per_minute else 0
        if tokens == 0 and requests == 0:
            return

        def change(s: dict[str, float], now: float) -> float:
            s["tok"] = min(limit.token_capacity, s["tok"] + tokens)
            s["req"] = min(limit.request_capacity, s["req"] + requests)
            return 0.0

        await self._update(scope, limit, change)

    async def block(self, scope: str, limit: RateLimit, until: float) -> None:
        """Nobody takes from this bucket before ``until`` (a provider's 429 Retry-After)."""

        def change(s: dict[str, float], now: float) -> float:
            s["until"] = max(s["until"], until)
            return 0.0

        await self._update(scope, limit, change)


def scopes(model: str | None, provider: str | None) -> list[str]:
    out = []
    if provider:
        out.append(f"provider:{provider}")
    if model:
        out.append(f"model:{model}")
    return out


@dataclass
class Reservation:
    """Tokens reserved for one LLM call. Call ``settle(actual)`` with the usage the provider
    reported; without it the estimate stands."""

    limiter: TokenLimiter
    held: list[tuple[str, RateLimit]]
    estimate: float
    settled: float | None = None

    def settle(self, actual_tokens: float) -> None:
        self.settled = float(actual_tokens)

    async def _finish(self) -> None:
        if self.settled is None:
            return
        delta = self.estimate - self.settled
        for scope, limit in self.held:
            await self.limiter.rates.give(scope, limit, tokens=delta)

    async def __aenter__(self) -> Reservation:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._finish()


@dataclass
class Booking:
    """Capacity taken in line from every scope of a call (``TokenLimiter.book``): it is the
    caller's at ``ready_at``. ``order``: each scope's bucket revision of this booking."""

    held: list[tuple[str, RateLimit]]
    tokens: float
    requests: float
    ready_at: float
    order: dict[str, int]
    place: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "requests": self.requests, "ready_at": self.ready_at,
                "order": self.order, "place": self.place,
                "scopes": [{"scope": sc, **lim.to_dict()} for sc, lim in self.held]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Booking:
        return cls(
            held=[(str(d["scope"]), RateLimit.from_dict(d)) for d in data.get("scopes") or []],
            tokens=float(data.get("tokens") or 0), requests=float(data.get("requests") or 0),
            ready_at=float(data.get("ready_at") or 0), order=dict(data.get("order") or {}),
            place={k: float(v) for k, v in (data.get("place") or {}).items()},
        )


class TokenLimiter:
    """System-wide request and token limits for LLM calls, per model and per provider.

    ::

        limiter = TokenLimiter.shared(nc, js, names)
        async with limiter.reserve(model="gpt-4o", provider="openai", tokens=est) as r:
            response = await client.chat.completions.create(...)
            r.settle(response.usage.total_tokens)

    ``reserve`` waits (in the worker) up to ``max_wait`` seconds for capacity, then raises
    ``RateLimited`` with the time to come back, so the caller can suspend durably instead.
    A provider's 429: ``await limiter.backoff(provider=..., retry_after=seconds)``.
    """

    def __init__(self, nc: NATS, js: JetStreamContext, names: Names, settings: Settings) -> None:
        self.nc = nc
        self.js = js
        self.names = names
        self.settings = settings
        self.rates = RateStore(store_for(nc, js, names))
        self.config = LimitsConfig(js, names)
        self.local: dict[str, RateLimit] = {}  # limits given in code, before the KV ones
        self.waited = 0.0

    @classmethod
    def shared(
        cls, nc: NATS, js: JetStreamContext, names: Names, settings: Settings
    ) -> TokenLimiter:
        by_prefix = _limiters.setdefault(nc, {})
        lim = by_prefix.get(names.prefix)
        if lim is None:
            lim = by_prefix[names.prefix] = cls(nc, js, names, settings)
        return lim

    @classmethod
    def for_context(cls, ctx: Any) -> TokenLimiter:
        """The limiter of the worker executing ``ctx`` (a ``WorkflowContext``)."""
        x = ctx._x
        return cls.shared(x.nc, x.js, x.names, x.settings)

    async def configure(self, scope: str, limit: RateLimit | None) -> None:
        """Set (or with None remove) the system-wide limit of ``model:<m>`` / ``provider:<p>``."""
        await put_rate_limit(self.js, self.names, scope, limit)
        self.config._cache.clear()

    async def _limits(self, model: str | None, provider: str | None) -> list[tuple[str, RateLimit]]:
        out = []
        for scope in scopes(model, provider):
            limit = self.local.get(scope) or await self.config.rate_limit(scope)
            if limit is not None and limit.limited:
                out.append((scope, limit))
        return out

    @contextlib.asynccontextmanager
    async def reserve(
        self,
        *,
        model: str | None = None,
        provider: str | None = None,
        tokens: float = 0,
        requests: float = 1,
        max_wait: float | None = None,
    ) -> AsyncIterator[Reservation]:
        held = await self._take_all(model, provider, tokens, requests, max_wait)
        r = Reservation(self, held, float(tokens))
        try:
            yield r
        finally:
            await r._finish()

    async def book(
        self,
        *,
        model: str | None = None,
        provider: str | None = None,
        tokens: float = 0,
        requests: float = 1,
    ) -> Booking:
        """Take ``tokens`` and ``requests`` from every configured scope, in line: the booking
        is the caller's at ``ready_at`` (now, or when the bookings made before it have been
        served). ``cancel`` gives an unused booking back."""
        held = await self._limits(model, provider)
        ready, order, place = time.time(), {}, {}
        for scope, limit in held:
            at, order[scope], place[scope] = await self.rates.book(
                scope, limit, tokens=tokens, requests=requests
            )
            ready = max(ready, at)
        return Booking(held, float(tokens), float(requests), ready, order, place)

    async def cancel(self, booking: Booking) -> None:
        for scope, limit in booking.held:
            await self.rates.give(scope, limit, tokens=booking.tokens, requests=booking.requests)

    async def shortfall(self, booking: Booking) -> float:
        """Seconds until every scope of ``booking`` covers it (0: go), as the buckets say now:
        calls ahead of it that used more than they reserved, or a 429, push it back."""
        wait = 0.0
        for scope, limit in booking.held:
            wait = max(wait, await self.rates.shortfall(
                scope, limit, place=booking.place.get(scope, 0.0), tokens=booking.tokens))
        return wait

    async def _take_all(
        self,
        model: str | None,
        provider: str | None,
        tokens: float,
        requests: float,
        max_wait: float | None,
    ) -> list[tuple[str, RateLimit]]:
        booking = await self.book(model=model, provider=provider, tokens=tokens, requests=requests)
        # Granted at once when it was covered at booking time; else wait for the time it gave,
        # and check then (calls ahead may have used more than they reserved).
        wait = booking.ready_at - time.time()
        while wait > 0:
            if max_wait is not None and wait > max_wait:
                # This call does not happen now: the capacity goes back to the others.
                await self.cancel(booking)
                scope = booking.held[0][0] if booking.held else "?"
                raise RateLimited(scope, time.time() + wait)
            if max_wait is not None:
                max_wait -= wait
            self.waited += wait
            await asyncio.sleep(wait)
            wait = await self.shortfall(booking)
        return booking.held

    async def backoff(
        self, *, model: str | None = None, provider: str | None = None, retry_after: float
    ) -> None:
        """Every process stops calling this model/provider for ``retry_after`` seconds."""
        until = time.time() + max(0.0, retry_after)
        for scope, limit in await self._limits(model, provider):
            await self.rates.block(scope, limit, until)


_limiters: weakref.WeakKeyDictionary[NATS, dict[str, TokenLimiter]] = weakref.WeakKeyDictionary()


async def reserve_for_step(
    exe: RunExecution,
    step_id: str,
    limiter: TokenLimiter,
    *,
    model: str | None,
    provider: str | None,
    tokens: float,
) -> Reservation:
    """The tokens of the LLM step ``step_id`` of a run, waited for without holding a worker.

    The capacity is booked in line (``TokenLimiter.book``: FIFO per scope). If it is there
    within ``settings.rate_wait_limit`` the step waits here. Otherwise the run suspends with
    ``RunSuspended(kind="rate", step=step_id, wake_at=<when it is there>)`` holding the booking
    in its data: no task and no slot on any worker. The scheduler wakes it at that
    time (a durable timer), and the step, replayed to this point on whichever worker gets the
    run, calls with the booked tokens instead of taking them again, so runs waiting on one
    scope go in the order they booked.

    A booking counts once: if the execution that was woken with it died before the step was
    recorded (the call may have been made), the next one books again.
    """
    sus = exe.state.rate_waits.get(step_id)
    data = sus.data if sus is not None and isinstance(sus.data, dict) else None
    if data is not None and data.get("attempt") == exe.attempt - 1:
        # Woken with its booking, by the first execution since the wait: the tokens are ours
        # once the bucket says the calls ahead (and any 429 since) are paid for.
        booking = Booking.from_json(data)
        wait = await limiter.shortfall(booking)
    else:
        booking = await limiter.book(model=model, provider=provider, tokens=tokens)
        wait = booking.ready_at - time.time()
    while wait > 0:
        _suspend_if_long(exe, step_id, booking, wait)
        limiter.waited += wait
        await asyncio.sleep(wait)
        wait = await limiter.shortfall(booking)
    return Reservation(limiter, booking.held, booking.tokens)


def _suspend_if_long(exe: RunExecution, step_id: str, booking: Booking, wait: float) -> None:
    """Suspend the run for a wait longer than ``settings.rate_wait_limit``."""
    if wait <= exe.settings.rate_wait_limit:
        return
    event = ev.RunSuspended(
        run_id=exe.run_id, step=step_id, kind="rate", wake_at=time.time() + wait,
        data={**booking.to_json(), "attempt": exe.attempt},
    )
    raise Suspend(event, msg_id=f"{exe.run_id}/w/{step_id}/rate/{exe.attempt}")


def retry_after_seconds(headers: Any, default: float = 1.0) -> float:
    """Seconds to wait from a 429's headers (``retry-after-ms``, ``retry-after``)."""
    if headers is None:
        return default
    get = headers.get
    with contextlib.suppress(TypeError, ValueError):
        ms = get("retry-after-ms")
        if ms is not None:
            return max(0.0, float(ms) / 1000.0)
    raw = get("retry-after")
    if raw is None:
        return default
    try:
        return max(0.0, float(raw))
    except ValueError:
        from email.utils import parsedate_to_datetime

        with contextlib.suppress(TypeError, ValueError):
            return max(0.0, parsedate_to_datetime(raw).timestamp() - time.time())
    return default


# --------------------------------------------------------------------------- stats


async def queue_stats(nc: NATS, js: JetStreamContext, names: Names) -> list[dict[str, Any]]:
    """Per queue and concurrency key: runs waiting for admission and slots held."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}

    def row(q: str, k: str) -> dict[str, Any]:
        return rows.setdefault((q, k), {"queue": q, "key": k, "waiting": 0, "active": 0,
                                        "limit": None, "per_key": None})

    with contextlib.suppress(nats.js.errors.NotFoundError):
        info = await js.stream_info(admit_stream(names), subjects_filter=admit_filter(names))
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
    "DEFAULT_KEY",
    "Booking",
    "LimitsConfig",
    "RateLimited",
    "RateStore",
    "Reservation",
    "SlotLease",
    "SlotStore",
    "TokenLimiter",
    "admit_filter",
    "admit_stream",
    "admit_subject",
    "pool_names",
    "queue_stats",
    "register_queues",
    "reserve_for_step",
    "retry_after_seconds",
    "run_holding_slots",
    "token",
]
