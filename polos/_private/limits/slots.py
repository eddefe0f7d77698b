"""Concurrency slots: leases in the slots bucket, taken and renewed by compare-and-set.

A **slot** is the key ``<pool>.<i>`` (``i`` < the pool's size) of ``<prefix>_slots``. Taking
it is a publish with ``Nats-Expected-Last-Subject-Sequence: 0`` (only one taker can win) and
``Nats-TTL`` (the lease). The holder renews by publishing again, expecting its own revision and
sending the TTL again (``kv.update`` would drop the per-key TTL). Giving a slot back deletes
exactly the revision that was read, so a release never removes someone else's lease. A holder
that dies simply stops renewing and the server removes the key when the TTL ends. The bucket has
no ``subject_delete_marker_ttl`` (limit markers): an expired key leaves no message behind, so
"free" is always "no message on the subject".
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from polos._private.model.values import Queue
from polos._private.store import (
    EXPECTED_LAST_SUBJECT_SEQ,
    WRONG_LAST_SEQUENCE,
    Names,
    kv_entries,
    kv_entry,
    namespace,
    valid_token,
)
from polos._private.store.names import kv_stream

if TYPE_CHECKING:
    pass

log = logging.getLogger("polos.limits")

DEFAULT_KEY = "_"  # the concurrency key of runs started without one
TTL_HEADER = "Nats-TTL"


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
        self.bucket = names.slots_bucket
        self.stream = kv_stream(names.slots_bucket)

    def subject(self, key: str) -> str:
        return f"$KV.{self.bucket}.{key}"

    async def entries(self, key_filter: str) -> list[Entry]:
        """Every live key matching ``key_filter`` (one direct-get request)."""
        return [
            Entry(e.key, e.revision, orjson.loads(e.value))
            for e in await kv_entries(self.nc, self.bucket, key_filter)
        ]

    async def get(self, key: str) -> Entry | None:
        e = await kv_entry(self.nc, self.bucket, key)
        return None if e is None else Entry(key, e.revision, orjson.loads(e.value))

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

    async def release_keys(
        self, keys: Iterable[str], run_id: str, before: int | None = None
    ) -> int:
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
                value = {
                    "run": self.run_id,
                    "adm": self.adm,
                    "at": time.time(),
                    "lease": self.lease,
                }
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


def store_for(nc: NATS, js: JetStreamContext, names: Names) -> SlotStore:
    """The namespace's one slot store on this connection (it caches its bucket handles)."""
    return namespace(js, names, nc=nc).feature(SlotStore, lambda: SlotStore(nc, js, names))


__all__ = ["DEFAULT_KEY", "Entry", "SlotLease", "SlotStore", "pool_names", "store_for", "token"]
