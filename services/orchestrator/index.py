"""The run index as the orchestrator keeps it: one entry per run in ``<prefix>_runs``, each
control event folded in by compare-and-set (``store.index.fold_index``), with the entries it
wrote last cached (a read saved before every update).

The orchestrator's features read it through ``cached`` (what this process wrote last, no round
trip) and ``read`` (the bucket's entry now); nothing else of it.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

import nats.js.errors
import orjson
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from polos import history as ev
from polos._private.store import EXPECTED_LAST_SUBJECT_SEQ, WRONG_LAST_SEQUENCE, Names, publish
from polos._private.store.index import IndexEntry, fold_index


class RunIndex:
    """The orchestrator's writer of the run index, and its cache of what it wrote."""

    def __init__(self, names: Names, *, cache_size: int, timeout: float) -> None:
        self.names = names
        self._cache_size = cache_size
        self._timeout = timeout
        self._nc: NATS | None = None
        self._kv: KeyValue | None = None
        # run_id -> (entry, kv revision): saves a read before every index update.
        self._cache: OrderedDict[str, tuple[IndexEntry, int]] = OrderedDict()
        self._locks: dict[str, _RunLock] = {}
        self.conflicts = 0

    async def open(self, nc: NATS, js: JetStreamContext) -> None:
        self._nc = nc
        self._kv = await js.key_value(self.names.runs_bucket)

    @property
    def nc(self) -> NATS:
        assert self._nc is not None, "run index not opened"
        return self._nc

    def cached(self, run_id: str) -> IndexEntry | None:
        """The entry this process wrote last for the run, if it is still cached."""
        hit = self._cache.get(run_id)
        return hit[0] if hit is not None else None

    async def read(self, run_id: str) -> IndexEntry | None:
        """The run's entry as the bucket holds it now (None: no entry)."""
        assert self._kv is not None, "run index not opened"
        try:
            entry = await self._kv.get(run_id)
        except nats.js.errors.KeyNotFoundError:
            return None
        value: IndexEntry = orjson.loads(entry.value or b"{}")
        return value

    async def update(self, run_id: str, seq: int, event: ev.Event) -> None:
        """Fold one control event into the run's index entry, by compare-and-set.

        Instances may see a run's events out of order; the entry remembers the last sequence it
        folded and ignores anything older.
        """
        # One write at a time per run in this process: control events are handled concurrently,
        # and two of one run (a wake and the claim that follows it) would otherwise race, one
        # failing its compare-and-set and paying a read and a second write.
        held = self._locks.get(run_id)
        if held is None:
            held = self._locks[run_id] = _RunLock()
        held.users += 1  # waiting or holding: the last one out removes the lock
        try:
            async with held.lock:
                await self._update(run_id, seq, event)
        finally:
            held.users -= 1
            if not held.users:
                del self._locks[run_id]

    async def _update(self, run_id: str, seq: int, event: ev.Event) -> None:
        assert self._kv is not None, "run index not opened"
        for attempt in range(10):
            cached = self._cache.get(run_id)
            current: IndexEntry | None
            revision: int | None
            if cached is None and attempt == 0 and isinstance(event, ev.RunRequested):
                # A new run has no entry yet: create it without reading first (one round trip
                # less per run). If it exists after all, the create fails and we read.
                current, revision = None, None
            elif cached is None:
                try:
                    entry = await self._kv.get(run_id)
                    current = orjson.loads(entry.value or b"{}")
                    revision = entry.revision
                except nats.js.errors.KeyNotFoundError as exc:
                    # A deleted entry (its run was purged) is written over its delete marker.
                    marker = getattr(exc, "entry", None)
                    current, revision = None, getattr(marker, "revision", None)
            else:
                current, revision = {**cached[0]}, cached[1]
            stale = current is not None and current.get("seq", 0) >= seq
            if stale and not (
                isinstance(event, ev.RunRequested) and "workflow" not in (current or {})
            ):
                return
            new = fold_index(current or {"run_id": run_id}, seq, event, stale=stale)
            try:
                # What ``kv.create`` / ``kv.update`` send (a put fenced on the key's last
                # revision, 0 for none), through the cheaper publish of the append path: three
                # index writes per run make this the orchestrator's most frequent request.
                ack = await publish(
                    self.nc,
                    f"$KV.{self.names.runs_bucket}.{run_id}",
                    orjson.dumps(new),
                    headers={EXPECTED_LAST_SUBJECT_SEQ: str(revision or 0)},
                    timeout=self._timeout,
                )
                rev = ack.seq
            except nats.js.errors.APIError as exc:
                if exc.err_code != WRONG_LAST_SEQUENCE:
                    raise
                self.conflicts += 1  # another instance wrote it: read and fold again
                self._cache.pop(run_id, None)
                continue
            self._cache[run_id] = (new, rev)
            self._cache.move_to_end(run_id)
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            return
        raise RuntimeError(f"index update for run {run_id} kept conflicting")


class _RunLock:
    """One run's index-write lock and how many handlers use it."""

    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


__all__ = ["RunIndex"]
