"""The run index, kept in memory: fed by one watch of the ``<p>_runs`` bucket.

``PolosClient.list_runs`` reads the whole bucket per call, which is fine for a command and too
slow for a page that must answer in milliseconds with 100,000 runs. The UI server instead
watches the bucket once (an ordered consumer, last value per key, then every update) and keeps
each run as a small record in lists sorted by creation time, one for all runs and one per
status, workflow and queue: a page is a bisect and a short walk, and every change is also the
signal that pushes live updates to the browsers (``changed``).

Like the index itself, this is a projection: a restart rebuilds it from the bucket.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import orjson
from nats.js.api import ConsumerConfig, DeliverPolicy

from polos._private.store import is_live
from polos.client import PolosClient

from .source import runs_bucket_stream

log = logging.getLogger("polos_ui.projection")

Key = tuple[float, str]  # (created_at, run_id): the order of every list, newest last
STATUSES = ("queued", "running", "suspended", "completed", "failed", "cancelled")


def _intern(value: Any) -> str | None:
    return sys.intern(value) if isinstance(value, str) else None


@dataclass(slots=True)
class Run:
    """One run as the index says it is (the fields a list page needs)."""

    run_id: str
    workflow: str | None
    status: str
    queue: str | None
    created_at: float
    updated_at: float | None
    ended_at: float | None
    attempt: int
    worker_id: str | None
    parent_run_id: str | None
    source: str | None
    concurrency_key: str | None
    waiting: dict[str, Any] | None
    error: dict[str, Any] | None

    @property
    def key(self) -> Key:
        return (self.created_at, self.run_id)

    @property
    def duration(self) -> float | None:
        if self.ended_at is None or not self.created_at:
            return None
        return max(0.0, self.ended_at - self.created_at)

    @classmethod
    def from_entry(cls, run_id: str, e: dict[str, Any]) -> Run:
        err = e.get("error") if isinstance(e.get("error"), dict) else None
        if err is not None:  # a list needs the type and message, not a traceback
            err = {"type": err.get("type"), "message": str(err.get("message") or "")[:500]}
        waiting = e.get("waiting") if isinstance(e.get("waiting"), dict) else None
        created = e.get("created_at")
        return cls(
            run_id=run_id,
            workflow=_intern(e.get("workflow")),
            status=_intern(e.get("status")) or "unknown",
            queue=_intern(e.get("queue")),
            created_at=float(created) if isinstance(created, int | float) else 0.0,
            updated_at=e.get("updated_at"),
            ended_at=e.get("ended_at"),
            attempt=int(e.get("attempt") or 0),
            worker_id=_intern(e.get("worker_id")),
            parent_run_id=e.get("parent_run_id"),
            source=_intern(e.get("source")),
            concurrency_key=e.get("concurrency_key"),
            waiting=waiting,
            error=err,
        )


@dataclass
class Query:
    status: str | None = None
    workflow: str | None = None
    queue: str | None = None
    since: float | None = None
    until: float | None = None
    id_prefix: str | None = None
    roots_only: bool = False
    before: Key | None = None  # page after this key (older runs)
    after: Key | None = None  # page before this key (newer runs)
    limit: int = 50


@dataclass
class Page:
    runs: list[Run]
    older: Key | None  # cursor of the next (older) page, None at the end
    newer: Key | None  # cursor of the previous (newer) page, None on the first
    total: int | None  # runs matching, when it is known without a scan


class RunIndex:
    """The in-memory projection of the run index."""

    def __init__(self, client: PolosClient) -> None:
        self.client = client
        self.runs: dict[str, Run] = {}
        self._all: list[Key] = []
        self._by: dict[str, dict[str | None, list[Key]]] = {
            "status": {},
            "workflow": {},
            "queue": {},
        }
        self.children: dict[str, list[str]] = {}
        self._human: dict[str, Key] = {}  # runs suspended at ctx.step.suspend
        self._ids: list[str] = []  # every run id, sorted: prefix search
        self.ready = asyncio.Event()
        self.generation = 0  # bumped on every change
        self._listeners: set[Callable[[set[str]], None]] = set()
        self._sub: Any = None
        self._loading: list[Run] | None = []  # entries of the first pass, sorted once at its end
        self._pending_deletes: set[str] = set()
        self.started_at = time.monotonic()
        self.ready_after: float | None = None

    # ------------------------------------------------------------------ feeding

    async def start(self) -> None:
        stream, subject = runs_bucket_stream(self.client)
        cfg = ConsumerConfig(deliver_policy=DeliverPolicy.LAST_PER_SUBJECT)
        self._sub = await self.client.js.subscribe(
            subject,
            stream=stream,
            cb=self._on_msg,
            ordered_consumer=True,
            config=cfg,
            idle_heartbeat=2.0,
            pending_msgs_limit=-1,
            pending_bytes_limit=-1,
        )
        with contextlib.suppress(Exception):
            info = await self._sub.consumer_info()
            if info.num_pending == 0 and not info.delivered.stream_seq:
                self._finish_loading()

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    async def _on_msg(self, msg: Any) -> None:
        run_id = msg.subject.rsplit(".", 1)[-1]
        try:
            if not is_live(msg):
                self._remove(run_id)
            else:
                entry = orjson.loads(msg.data)
                if isinstance(entry, dict):
                    self._put(Run.from_entry(run_id, entry))
        except Exception:  # one bad entry must not stop the watch
            log.exception("run index entry %s could not be read", run_id)
        if self._loading is not None:
            with contextlib.suppress(Exception):
                if msg.metadata.num_pending == 0:
                    self._finish_loading()

    def _finish_loading(self) -> None:
        if self._loading is None:
            return
        loaded, self._loading = self._loading, None
        for run in loaded:
            if self.runs.get(run.run_id) is run:
                self._index(run, sort=False)
        self._all.sort()
        self._ids = sorted(self.runs)
        for by in self._by.values():
            for keys in by.values():
                keys.sort()
        for kids in self.children.values():
            kids.sort(key=lambda c: self.runs[c].key if c in self.runs else (0.0, c))
        self.ready_after = time.monotonic() - self.started_at
        self.ready.set()
        self._notify(set(self.runs))

    def _put(self, run: Run) -> None:
        old = self.runs.get(run.run_id)
        self.runs[run.run_id] = run
        if self._loading is not None:
            # A second value during the first pass is appended too: only the record that is in
            # ``runs`` when the pass ends gets indexed.
            self._loading.append(run)
            return
        if old is not None:
            self._unindex(old)
        self._index(run, sort=True)
        self._notify({run.run_id} | ({run.parent_run_id} if run.parent_run_id else set()))

    def _remove(self, run_id: str) -> None:
        old = self.runs.pop(run_id, None)
        if old is None or self._loading is not None:
            return
        self._unindex(old, forget=True)
        self._notify({run_id})

    def _lists(self, run: Run) -> Iterable[list[Key]]:
        yield self._all
        for dim, value in (
            ("status", run.status),
            ("workflow", run.workflow),
            ("queue", run.queue),
        ):
            yield self._by[dim].setdefault(value, [])

    def _index(self, run: Run, *, sort: bool) -> None:
        key = run.key
        for keys in self._lists(run):
            if sort:
                bisect.insort(keys, key)
            else:
                keys.append(key)
        if sort:
            i = bisect.bisect_left(self._ids, run.run_id)
            if i == len(self._ids) or self._ids[i] != run.run_id:
                self._ids.insert(i, run.run_id)
        if run.status == "suspended" and (run.waiting or {}).get("kind") == "suspend":
            self._human[run.run_id] = key
        if run.parent_run_id:
            kids = self.children.setdefault(run.parent_run_id, [])
            if run.run_id not in kids:
                kids.append(run.run_id)

    def _unindex(self, run: Run, *, forget: bool = False) -> None:
        key = run.key
        for keys in self._lists(run):
            i = bisect.bisect_left(keys, key)
            if i < len(keys) and keys[i] == key:
                del keys[i]
        self._human.pop(run.run_id, None)
        if forget:
            i = bisect.bisect_left(self._ids, run.run_id)
            if i < len(self._ids) and self._ids[i] == run.run_id:
                del self._ids[i]

    # ------------------------------------------------------------------ listening

    def listen(self, fn: Callable[[set[str]], None]) -> Callable[[], None]:
        """Call ``fn(changed run ids)`` after every change; returns the function that stops it."""
        self._listeners.add(fn)
        return lambda: self._listeners.discard(fn)

    def _notify(self, changed: set[str]) -> None:
        self.generation += 1
        for fn in list(self._listeners):
            try:
                fn(changed)
            except Exception:
                log.exception("a live update listener failed")

    # ------------------------------------------------------------------ reading

    def counts(self) -> dict[str, int]:
        by = self._by["status"]
        return {s: len(by.get(s, ())) for s in STATUSES}

    def values(self, dim: str) -> list[str]:
        """The workflows (or queues) that have runs, sorted."""
        return sorted(v for v, keys in self._by[dim].items() if v and keys)

    def get(self, run_id: str) -> Run | None:
        return self.runs.get(run_id)

    def page(self, q: Query) -> Page:
        """One page of runs matching ``q``, newest first."""
        if q.id_prefix:
            return self._search(q)
        candidates = [self._all]
        for dim, value in (("status", q.status), ("workflow", q.workflow), ("queue", q.queue)):
            if value:
                candidates.append(self._by[dim].get(value, []))
        base = min(candidates, key=len)
        total = (
            len(base)
            if len(candidates) <= 2 and q.since is None and q.until is None and not q.roots_only
            else None
        )
        lo = 0 if q.since is None else bisect.bisect_left(base, (q.since, ""))
        hi = len(base) if q.until is None else bisect.bisect_left(base, (q.until, ""))

        def ok(run: Run | None) -> bool:
            return (
                run is not None
                and (not q.status or run.status == q.status)
                and (not q.workflow or run.workflow == q.workflow)
                and (not q.queue or run.queue == q.queue)
                and (not q.roots_only or not run.parent_run_id)
            )

        if q.after is not None:
            # Newer page: walk up from the cursor, then show it newest first.
            start = bisect.bisect_right(base, q.after, lo, hi)
            picked: list[Run] = []
            i = start
            while i < hi and len(picked) <= q.limit:
                run = self.runs.get(base[i][1])
                if ok(run):
                    picked.append(run)  # type: ignore[arg-type]
                i += 1
            more_newer = len(picked) > q.limit
            picked = picked[: q.limit]
            picked.reverse()
            older = picked[-1].key if picked else None
            return Page(picked, older, picked[0].key if picked and more_newer else None, total)
        end = hi if q.before is None else bisect.bisect_left(base, q.before, lo, hi)
        runs: list[Run] = []
        i = end - 1
        while i >= lo and len(runs) <= q.limit:
            run = self.runs.get(base[i][1])
            if ok(run):
                runs.append(run)  # type: ignore[arg-type]
            i -= 1
        more = len(runs) > q.limit
        runs = runs[: q.limit]
        newer = None
        if q.before is not None and runs:
            newer = runs[0].key
        return Page(runs, runs[-1].key if more and runs else None, newer, total)

    SEARCH_LIMIT = 1000

    def _search(self, q: Query) -> Page:
        """Runs whose id starts with the prefix (the first ``SEARCH_LIMIT`` in id order),
        newest first."""
        prefix = q.id_prefix or ""
        i = bisect.bisect_left(self._ids, prefix)
        found: list[Run] = []
        while (
            i < len(self._ids)
            and self._ids[i].startswith(prefix)
            and len(found) < self.SEARCH_LIMIT
        ):
            run = self.runs.get(self._ids[i])
            if run is not None:
                found.append(run)
            i += 1
        found.sort(key=lambda r: r.key, reverse=True)
        return Page(found[: q.limit], None, None, len(found))

    def human_waits(self) -> int:
        """How many runs are suspended at ``ctx.step.suspend``."""
        return len(self._human)

    def waiting_for_human(self) -> list[Run]:
        """Runs suspended at ``ctx.step.suspend``, the oldest run first."""
        return [
            self.runs[rid]
            for rid, _ in sorted(self._human.items(), key=lambda kv: kv[1])
            if rid in self.runs
        ]


def encode_key(key: Key | None) -> str | None:
    return None if key is None else f"{key[0]!r}_{key[1]}"


def decode_key(text: str | None) -> Key | None:
    if not text:
        return None
    at, sep, run_id = text.partition("_")
    if not sep:
        raise ValueError(f"bad page cursor {text!r}")
    return (float(at), run_id)
