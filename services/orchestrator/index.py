"""The run index as the orchestrator keeps it: one entry per run in ``<prefix>_runs``, each
control event folded in by compare-and-set (``store.index.fold_index``), with the entries it
wrote last cached (a read saved before every update).

A run's ``RunRequested`` and ``RunClaimed``, and a ``RunWoken`` whose task this process put
out itself, are held for up to ``window`` seconds: when the run's next control event comes
within it (the claim after the request or the wake; a fast run's end or suspension after its
claim), one write folds them all. No feature acts on those events (a wake's one hook repeats
its dispatch, which a wake dispatched here does not need), and whoever handles an event learns
only once the write that holds it is stored (its handler then acks it), so nothing is
acknowledged that the index does not have; a crash before the write redelivers the events. The
index is at most ``window`` late for a run's start and for such a wake.

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
from polos._private.store import (
    EXPECTED_LAST_SUBJECT_SEQ,
    WRONG_LAST_SEQUENCE,
    Names,
    is_live,
    kv_stream,
    leader_last,
    publish,
)
from polos._private.store.index import IndexEntry, fold_index


class RunIndex:
    """The orchestrator's writer of the run index, and its cache of what it wrote."""

    def __init__(
        self, names: Names, *, cache_size: int, timeout: float, window: float = 0.0
    ) -> None:
        self.names = names
        self._window = window
        # run_id -> its held events, written together when the window ends or the run's next
        # event comes (whichever first).
        self._held: dict[str, _Held] = {}
        self._flushes: set[asyncio.Task[None]] = set()
        self.writes = 0
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
        """The run's entry as the bucket's leader holds it now (None: no entry). Another
        instance's write of it is acknowledged by the leader; a replica may not hold it yet."""
        assert self._nc is not None, "run index not opened"
        bucket = self.names.runs_bucket
        m = await leader_last(self._nc, kv_stream(bucket), f"$KV.{bucket}.{run_id}")
        if m is None or not is_live(m):
            return None
        value: IndexEntry = orjson.loads(m.data or b"{}")
        return value

    async def update(self, run_id: str, seq: int, event: ev.Event, *, hold: bool = False) -> None:
        """Fold one control event into the run's index entry, by compare-and-set; return once
        the write that holds it is stored. ``hold``: no feature acts on this one either (a
        wake whose task this process put out itself), so it may wait with the others.

        Instances may see a run's events out of order; the entry remembers the last sequence it
        folded and ignores anything older.
        """
        held = self._held.get(run_id)
        if self._window > 0 and (hold or type(event) in _HELD_KINDS):
            if held is None:
                held = self._held[run_id] = _Held()
                held.timer = asyncio.get_running_loop().call_later(
                    self._window, self._window_over, run_id, held
                )
            held.events.append((seq, event))
            # Shielded: one handler given up (a stopping loop) does not cancel the others' write.
            await asyncio.shield(held.done)
            return
        events = [(seq, event)]
        if held is not None:  # the run's next event: write what was held with it, now
            del self._held[run_id]
            held.cancel_timer()
            events = [*held.events, *events]
        try:
            await self._write(run_id, events)
        except BaseException as exc:
            if held is not None:  # their handlers nak them: redelivered, folded again
                held.settle(exc if isinstance(exc, Exception) else RuntimeError("interrupted"))
            raise
        if held is not None:
            held.settle(None)

    def flush_held(self) -> None:
        """Write every held run now (the orchestrator stops: its handlers may then ack)."""
        for run_id, held in list(self._held.items()):
            held.cancel_timer()
            self._window_over(run_id, held)

    def _window_over(self, run_id: str, held: _Held) -> None:
        if self._held.get(run_id) is not held:
            return  # the run's next event took them
        del self._held[run_id]
        task = asyncio.get_running_loop().create_task(self._flush(run_id, held))
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    async def _flush(self, run_id: str, held: _Held) -> None:
        try:
            await self._write(run_id, held.events)
        except Exception as exc:
            held.settle(exc)  # each held handler naks its event: redelivered, folded again
        else:
            held.settle(None)

    async def _write(self, run_id: str, events: list[tuple[int, ev.Event]]) -> None:
        # One write at a time per run in this process: control events are handled concurrently,
        # and two of one run (a wake and the claim that follows it) would otherwise race, one
        # failing its compare-and-set and paying a read and a second write.
        lock = self._locks.get(run_id)
        if lock is None:
            lock = self._locks[run_id] = _RunLock()
        lock.users += 1  # waiting or holding: the last one out removes the lock
        try:
            async with lock.lock:
                await self._update(run_id, sorted(events, key=lambda se: se[0]))
        finally:
            lock.users -= 1
            if not lock.users:
                del self._locks[run_id]

    async def _update(self, run_id: str, events: list[tuple[int, ev.Event]]) -> None:
        """Fold ``events`` (in stream order) into the entry; one write, or none if all are old."""
        assert self._kv is not None, "run index not opened"
        for attempt in range(10):
            cached = self._cache.get(run_id)
            current: IndexEntry | None
            revision: int | None
            if cached is None and attempt == 0 and isinstance(events[0][1], ev.RunRequested):
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
            new = current or {"run_id": run_id}
            folded = False
            for seq, event in events:
                stale = new.get("seq", 0) >= seq
                if stale and not (isinstance(event, ev.RunRequested) and "workflow" not in new):
                    continue
                new = fold_index(new, seq, event, stale=stale)
                folded = True
            if not folded:
                return
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
                self.writes += 1
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


# What no feature acts on: held for the run's next event (see the module's docstring).
_HELD_KINDS = (ev.RunRequested, ev.RunClaimed)


class _Held:
    """A run's held events, the timer that writes them, and the answer their handlers await."""

    __slots__ = ("done", "events", "timer")

    def __init__(self) -> None:
        self.events: list[tuple[int, ev.Event]] = []
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.timer: asyncio.TimerHandle | None = None

    def cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()

    def settle(self, exc: BaseException | None) -> None:
        if self.done.done():
            return
        if exc is None:
            self.done.set_result(None)
        else:
            self.done.set_exception(exc)
            self.done.exception()  # retrieved: the handlers that await it see it; no warning


class _RunLock:
    """One run's index-write lock and how many handlers use it."""

    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


__all__ = ["RunIndex"]
