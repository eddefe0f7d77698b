"""Admission: the orchestrator's side of queues, concurrency keys and queue rate limits.

``Orchestrator.dispatch`` is the one place a run becomes a task; for a run whose queue has a
limit it comes here instead:

* **fast path** - nobody waits ahead of the run and a slot is free: take the slot(s) (a
  compare-and-set create with a TTL lease in the slots bucket) and publish the task with the
  slot keys in it. No history append.
* **wait path** - append ``RunSuspended(kind="slot"|"rate", step="admission")`` to the run
  (fenced, so it shows in ``client.get`` and ``polos runs``). The control-event hook then puts
  an entry for it on ``<prefix>.admit.<queue>.<key>`` (the waiting line, stream ``_ADMIT``) and
  runs an admission pass.
* **admission pass** (per queue, on a new waiter, a released slot, a rate-limit timer, and a
  sweep every third of the lease that catches leases run out): read the waiting line, group it
  by key, and walk the keys round robin starting after the key admitted last, taking the
  oldest entry of each: take its slots, append ``RunAdmitted`` fenced on the wait event with
  a deterministic message id, publish the task, delete the entry.

Crash safety, with any number of orchestrators:

* die after taking a slot, before ``RunAdmitted``: nobody renews the lease, it runs out; the
  entry is still there and is admitted again.
* two instances admit one entry at once: both take slots, only one ``RunAdmitted`` is stored
  (same message id; the other gets a duplicate or a fence error) and the loser gives its slots
  back at once. A task is published only by the winner.
* die after ``RunAdmitted``, before the task: the control hook sees ``RunAdmitted`` and
  publishes the task from it (same message id: never twice).
* die before deleting the entry: the next pass finds the run already admitted (duplicate or
  fenced) and deletes the entry.
* JetStream unavailable for a moment (a leader election, a reconnect): ``RunAdmitted``, tasks
  and waiting-line entries are written through the retrying path (``store.append``,
  ``store.task.publish_task``). A dispatch that parks the run while an earlier one of the
  same cause still holds a slot for it (a retried or repeated dispatch) loses nothing either:
  a run that records its wait gives back every slot it held.

What the orchestrator knows of a workflow's queue comes from the workers' registrations, and
may be missing or a moment old; the task says which queue it was admitted under, and a worker
whose workflow declares a limited queue executes no task of another (``limits.admission_needed``):
it sends the run back here, to wait in that queue's line.

Slots are given back on the run's next ``RunSuspended``/``RunCompleted``/``RunFailed``/
``RunCancelled`` (control hook), and only those taken by an admission older than that event.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import time
import uuid
from collections import deque
from typing import TYPE_CHECKING, Any

import orjson

from polos import history as ev
from polos._private import limits
from polos._private.limits import LimitsConfig, RateStore, SlotStore, store_for
from polos._private.model.aio import cancel_and_wait
from polos._private.model.values import Queue
from polos._private.store import (
    MSG_ID,
    FencedOut,
    append,
    dead_letter,
    load_state,
    load_state_through,
    publish,
    read_history,
    read_subject,
    retry_transient,
)
from polos._private.store.task import encode_task, publish_task

if TYPE_CHECKING:
    from .orchestrator import CommandHandler, Orchestrator

log = logging.getLogger("polos.admission")

WAIT_KINDS = frozenset({"slot", "rate"})
_RELEASE_ON = (ev.RunSuspended, ev.RunCompleted, ev.RunFailed, ev.RunCancelled)


class Admission:
    """One orchestrator's admission controller. Any number may run against one namespace."""

    LOCK_RETRY = 0.02  # seconds before an instance that found the queue's lock busy retries

    def __init__(self, orch: Orchestrator) -> None:
        self.orch = orch
        self.names = orch.names
        self.settings = orch.settings
        self.lease = float(self.settings.slot_lease)
        # Opened at start (they need the orchestrator's connection).
        self.config: LimitsConfig
        self.store: SlotStore
        self.rates: RateStore
        self._want: dict[str, bool] = {}
        self._passes: dict[str, asyncio.Task[None]] = {}
        self._last_key: dict[str, str] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._lock_rev: dict[str, int] = {}
        self.id = uuid.uuid4().hex[:12]
        self.lock_ttl = max(1.0, min(5.0, self.lease / 3))
        self._stopping = False
        # figures for tests and `polos queues`
        self.fast_admits = 0
        self.waits = 0
        self.admitted = 0
        self.lost_races = 0
        self.lock_busy = 0

    def commands(self) -> dict[str, CommandHandler]:
        return {}  # admission answers no command: it routes the dispatches of limited queues

    async def start(self) -> None:
        # Its slots bucket, queues bucket and admission stream are in the topology the
        # orchestrator ensured at start.
        self.config = LimitsConfig(self.orch.js, self.names)
        self.store = store_for(self.orch.nc, self.orch.js, self.names)
        self.rates = RateStore(self.store)
        self._sweeper = asyncio.create_task(self._sweep(), name="admission-sweep")

    async def stop(self) -> None:
        self._stopping = True
        for h in self._timers.values():
            h.cancel()
        tasks = [t for t in (self._sweeper, *self._passes.values()) if t is not None]
        await cancel_and_wait(tasks)

    # ------------------------------------------------------------------ which queue

    async def resolve(
        self, run_id: str, workflow: str | None, requested: ev.RunRequested | None
    ) -> tuple[Queue | None, str, str]:
        """The run's limited queue (None: unlimited), its concurrency key and the workflow.

        For a run admitted before, the queue it was admitted under (its slots are that queue's),
        else the queue its start named, else its workflow's."""
        queue_name: str | None
        key: str | None
        if requested is not None:
            queue_name, key, workflow = (
                requested.queue,
                requested.concurrency_key,
                requested.workflow,
            )
        else:
            entry = self.orch.index.cached(run_id)
            if entry is not None and entry.get("workflow"):
                queue_name = entry.get("admitted_queue") or entry.get("queue")
                key, workflow = entry.get("concurrency_key"), entry["workflow"]
            else:
                # The request is a control event: no need to read the run's steps.
                history = await read_history(self.orch.nc, self.names, run_id, kinds=("ctl",))
                r = next((e for _, e in history if isinstance(e, ev.RunRequested)), None)
                if r is None:
                    return None, limits.DEFAULT_KEY, workflow or ""
                admitted = next(
                    (e.queue for _, e in reversed(history) if isinstance(e, ev.RunAdmitted)), None
                )
                queue_name, key, workflow = admitted or r.queue, r.concurrency_key, r.workflow
        assert workflow is not None
        if not queue_name:
            queue_name = await self.config.workflow_queue(workflow)
        return await self.config.queue(queue_name), key or limits.DEFAULT_KEY, workflow

    # ------------------------------------------------------------------ dispatch

    async def route(
        self,
        run_id: str,
        workflow: str,
        cause_seq: int,
        requested: ev.RunRequested | None = None,
    ) -> bool:
        """Admit or park a run of a limited queue. False: unlimited, dispatch it as usual."""
        queue, key, workflow = await self.resolve(run_id, workflow, requested)
        if queue is None:
            return False
        if requested is None:
            # A wake, dispatched by its waker and again by a control hook: only a run the log
            # says is queued needs a slot (a parked or running one has its way already).
            state = await load_state_through(self.orch.nc, self.names, run_id, cause_seq)
            if state.status != "queued" or state.last_seq > cause_seq:
                return True
        ktok = limits.token(key)
        reason: ev.WaitKind = "slot"
        # Both at once, to keep admission off the critical path: the slot is given back if
        # someone waits ahead of this run.
        waiting, (slots, _) = await asyncio.gather(
            self._anyone_waiting(queue, ktok),
            self.store.acquire_all(limits.pool_names(queue, ktok), run_id, cause_seq, self.lease),
        )
        if waiting and slots is not None:
            await self.store.release_keys(slots, run_id)
        elif not waiting:
            if slots is not None and not await self._rate_ok(queue):
                await self.store.release_keys(slots, run_id)
                slots, reason = None, "rate"
            if slots is not None:
                if not await self._publish_task(
                    run_id, workflow, cause_seq, slots, cause_seq, queue.name
                ):
                    # This cause was dispatched before (a redelivered command): that task
                    # carries its own slots.
                    await self.store.release_keys(slots, run_id)
                self.fast_admits += 1
                return True
        await self._park(run_id, workflow, queue, key, cause_seq, reason)
        return True

    async def _anyone_waiting(self, queue: Queue, ktok: str) -> bool:
        # A shared limit (or rate) is shared by every key: anyone waiting goes first. A per-key
        # limit only makes the run wait behind its own key.
        shared = queue.concurrency is not None or queue.rate_limit is not None
        subject = (
            self.names.admit_filter(queue.name)
            if shared
            else self.names.admit_subject(queue.name, ktok)
        )
        msgs = await read_subject(self.orch.nc, self.names.admit_stream, subject, limit=1)
        return bool(msgs)

    async def _rate_ok(self, queue: Queue) -> bool:
        rl = queue.rate_limit
        if rl is None or not rl.requests_per_minute:
            return True
        wait = await self.rates.take(f"queue:{queue.name}", rl, tokens=0, requests=1)
        if wait > 0:
            self._later(queue.name, wait)
            return False
        return True

    async def _publish_task(
        self, run_id: str, workflow: str, cause_seq: int, slots: list[str], adm: int, queue: str
    ) -> bool:
        # ``queue`` and ``adm`` say the run was admitted under that queue: a worker whose
        # workflow declares a limited queue executes nothing else (``limits.admission_needed``).
        task = encode_task(
            run_id, workflow, queue=queue, slots=slots, adm=adm, lease=self.lease, cause=cause_seq
        )
        return await publish_task(
            self.orch.nc,
            self.names,
            run_id,
            workflow,
            cause_seq,
            task,
            timeout=self.settings.request_timeout,
        )

    async def _park(
        self,
        run_id: str,
        workflow: str,
        queue: Queue,
        key: str,
        cause_seq: int,
        reason: ev.WaitKind,
    ) -> None:
        """Record that the run waits for admission; the control hook queues it."""
        event = ev.RunSuspended(
            run_id=run_id,
            step="admission",
            kind=reason,
            data={"queue": queue.name, "concurrency_key": key, "workflow": workflow},
        )
        expected = cause_seq
        for _ in range(5):
            try:
                await append(
                    self.orch.js,
                    self.names,
                    run_id,
                    event,
                    expected_last_seq=expected,
                    msg_id=f"{run_id}/w/{expected}",
                )
                self.waits += 1
                return
            except FencedOut:
                state = await load_state(self.orch.nc, self.names, run_id)
                if state.done or state.status in ("suspended", "running"):
                    return  # it moved on (cancelled, already parked, or a worker has it)
                expected = state.last_seq
        raise RuntimeError(f"run {run_id}: could not record its wait for admission")

    # ------------------------------------------------------------------ control events

    async def on_control(self, run_id: str, seq: int, event: ev.Event) -> None:
        """Queue waiting runs, repair admissions, give slots back."""
        if isinstance(event, ev.RunAdmitted):
            await self._repair_admitted(run_id, seq, event)
        elif (
            isinstance(event, ev.RunSuspended)
            and event.kind in WAIT_KINDS
            and event.step == "admission"
        ):
            # A run in line holds no slot: one taken for it before (a dispatch of the same
            # cause that was retried or repeated, then parked) would otherwise stay taken, with
            # the run waiting behind it, until its lease ran out.
            await asyncio.gather(self._release(run_id, seq), self._enqueue(run_id, seq, event))
        elif isinstance(event, _RELEASE_ON):
            await self._release(run_id, seq)

    async def _release(self, run_id: str, seq: int) -> None:
        """Give back the slots the run holds from admissions older than ``seq``."""
        queue, key, _ = await self.resolve(run_id, None, None)
        if queue is None:
            return
        pools = limits.pool_names(queue, limits.token(key))
        if await self.store.release_run(pools, run_id, before=seq):
            self.kick(queue.name)

    async def _repair_admitted(self, run_id: str, seq: int, event: ev.RunAdmitted) -> None:
        # Normally the admitting pass published this task already: same id, a no-op.
        _, _, workflow = await self.resolve(run_id, None, None)
        if workflow:
            await self._publish_task(run_id, workflow, seq, list(event.slots), seq, event.queue)

    async def _enqueue(self, run_id: str, seq: int, event: ev.RunSuspended) -> None:
        data = event.data if isinstance(event.data, dict) else {}
        queue_name, key, workflow = (
            data.get("queue"),
            data.get("concurrency_key"),
            data.get("workflow"),
        )
        if not (queue_name and workflow):
            queue, key, workflow = await self.resolve(run_id, None, None)
            if queue is None:
                # Its queue lost its limit meanwhile: admit it without a slot.
                await self._admit_unlimited(run_id, workflow, seq, str(queue_name or workflow))
                return
            queue_name = queue.name
        elif data.get("reason") == limits.NOT_ADMITTED:
            # A worker refused a task dispatched under another queue (or none): what this
            # instance has cached about the workflow and its queue is out of date.
            self.config.forget(workflow=str(workflow), queue=str(queue_name))
        key = key or limits.DEFAULT_KEY
        body = {
            "run_id": run_id,
            "workflow": workflow,
            "queue": queue_name,
            "key": key,
            "wait_seq": seq,
            "at": event.at,
        }
        subject = self.names.admit_subject(str(queue_name), limits.token(key))
        payload, headers = orjson.dumps(body), {MSG_ID: f"{run_id}/q/{seq}"}
        timeout = self.settings.request_timeout
        await retry_transient(
            lambda _: publish(self.orch.nc, subject, payload, headers=headers, timeout=timeout),
            timeout=timeout,
            what=f"admission entry of run {run_id}",
        )
        self.kick(str(queue_name))

    # ------------------------------------------------------------------ passes

    def kick(self, queue: str) -> None:
        """Run an admission pass for ``queue`` soon; passes of one queue never overlap here."""
        if self._stopping:
            return
        self._want[queue] = True
        running = self._passes.get(queue)
        if running is None or running.done():
            self._passes[queue] = asyncio.create_task(self._passes_of(queue), name=f"admit-{queue}")

    def _later(self, queue: str, delay: float) -> None:
        if queue in self._timers or self._stopping:
            return
        loop = asyncio.get_running_loop()

        def fire() -> None:
            self._timers.pop(queue, None)
            self.kick(queue)

        self._timers[queue] = loop.call_later(max(0.01, delay), fire)

    async def _passes_of(self, queue: str) -> None:
        while self._want.get(queue) and not self._stopping:
            self._want[queue] = False
            # One instance admits a queue at a time (a short lease in the slots bucket): two
            # passes over one waiting line would race for every entry and waste slots. The
            # others retry shortly, so a kick they received is never lost; if the holder dies,
            # its lock runs out after lock_ttl (a third of the slot lease, 1 to 5 s).
            lock = f"lock.{queue}"
            rev = await self.store.put(
                lock, {"by": self.id, "at": time.time()}, expected=0, ttl=self.lock_ttl
            )
            if rev is None:
                self.lock_busy += 1
                self._later(queue, self.LOCK_RETRY)
                return
            self._lock_rev[queue] = rev
            try:
                await self.admission_pass(queue)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("admission pass of queue %s failed; retrying soon", queue)
                self._later(queue, 0.5)
            finally:
                with contextlib.suppress(Exception):
                    await self.store.delete(self._lock_rev.pop(queue))

    async def _renew_lock(self, queue: str) -> None:
        rev = self._lock_rev.get(queue)
        if rev is None:
            return
        new = await self.store.put(
            f"lock.{queue}", {"by": self.id, "at": time.time()}, expected=rev, ttl=self.lock_ttl
        )
        if new is not None:
            self._lock_rev[queue] = new

    async def admission_pass(self, queue_name: str) -> int:
        """Admit as many waiting runs of the queue as slots and rate allow. Returns how many."""
        msgs = await read_subject(
            self.orch.nc,
            self.names.admit_stream,
            self.names.admit_filter(queue_name),
            limit=5000,
        )
        if not msgs:
            return 0
        # A cached "no limit" may be a moment older than the queue's registration, and every
        # run admitted here without a slot would run unlimited: only a limit is taken on trust.
        queue = await self.config.queue(queue_name) or await self.config.queue(
            queue_name, fresh=True
        )
        groups: dict[str, deque[tuple[int, dict[str, Any]]]] = {}
        for m in msgs:
            try:
                entry = orjson.loads(m.data)
            except orjson.JSONDecodeError:
                await dead_letter(
                    self.orch.js,
                    self.names,
                    source="admit",
                    reason="malformed admission entry",
                    subject=m.subject,
                    data=m.data,
                )
                await self._drop_entry(m.seq)
                continue
            groups.setdefault(m.subject.split(".")[-1], deque()).append((m.seq, entry))
        order = sorted(groups)
        last = self._last_key.get(queue_name)
        if last is not None:
            start = bisect.bisect_right(order, last) % max(1, len(order))
            order = order[start:] + order[:start]
        done = 0
        blocked: set[str] = set()
        renewed = time.monotonic()
        while True:
            progress = False
            for k in order:
                if k in blocked or not groups[k]:
                    continue
                if time.monotonic() - renewed > self.lock_ttl / 3:
                    await self._renew_lock(queue_name)
                    renewed = time.monotonic()
                pseq, entry = groups[k][0]
                outcome = await self._admit(queue, pseq, entry)
                if outcome in ("full", "rate"):
                    return done
                if outcome == "key_full":
                    blocked.add(k)
                    continue
                groups[k].popleft()
                progress = True
                if outcome == "admitted":
                    done += 1
                    self._last_key[queue_name] = k
            if not progress:
                return done

    async def _admit(self, queue: Queue | None, pseq: int, entry: dict[str, Any]) -> str:
        run_id = str(entry["run_id"])
        wait_seq = int(entry["wait_seq"])
        key = str(entry.get("key") or limits.DEFAULT_KEY)
        slots: list[str] = []
        if queue is not None:
            got, full = await self.store.acquire_all(
                limits.pool_names(queue, limits.token(key)), run_id, wait_seq, self.lease
            )
            if got is None:
                return "full" if full is not None and full.endswith(".all") else "key_full"
            slots = got
            if not await self._rate_ok(queue):
                await self.store.release_keys(slots, run_id)
                return "rate"
        event = ev.RunAdmitted(
            run_id=run_id,
            step="admission",
            reason="admitted",
            queue=str(entry.get("queue")),
            concurrency_key=None if key == limits.DEFAULT_KEY else key,
            slots=slots,
            lease=self.lease,
        )
        try:
            seq = await self._append_fenced(run_id, event, wait_seq, f"{run_id}/adm/{wait_seq}")
        except FencedOut:
            # Admitted by another instance (or cancelled meanwhile): not ours to run.
            self.lost_races += 1
            await self.store.release_keys(slots, run_id)
            await self._drop_entry(pseq)
            return "gone"
        await self._publish_task(run_id, str(entry["workflow"]), seq, slots, wait_seq, event.queue)
        await self._drop_entry(pseq)
        self.admitted += 1
        return "admitted"

    async def _admit_unlimited(self, run_id: str, workflow: str, wait_seq: int, queue: str) -> None:
        event = ev.RunAdmitted(
            run_id=run_id, step="admission", reason="admitted", queue=queue, lease=self.lease
        )
        with contextlib.suppress(FencedOut):
            seq = await self._append_fenced(run_id, event, wait_seq, f"{run_id}/adm/{wait_seq}")
            await self._publish_task(run_id, workflow, seq, [], wait_seq, queue)

    async def _append_fenced(self, run_id: str, event: ev.Event, expected: int, msg_id: str) -> int:
        """Append through the retrying write path: the sequence when this very append is
        stored (a retry after a lost answer included), ``FencedOut`` when anything else is
        (another instance's admission of the run, a cancel)."""
        return await append(
            self.orch.js,
            self.names,
            run_id,
            event,
            expected_last_seq=expected,
            msg_id=msg_id,
            timeout=self.settings.request_timeout,
        )

    async def _drop_entry(self, pseq: int) -> None:
        with contextlib.suppress(Exception):
            await self.orch.nc.request(
                f"$JS.API.STREAM.MSG.DELETE.{self.names.admit_stream}",
                orjson.dumps({"seq": pseq, "no_erase": True}),
                timeout=self.settings.request_timeout,
            )

    async def _sweep(self) -> None:
        # Leases that run out (a dead worker) produce no event: look every third of a lease.
        interval = max(0.25, self.lease / 3)
        while not self._stopping:
            await asyncio.sleep(interval)
            try:
                info = await self.orch.js.stream_info(
                    self.names.admit_stream, subjects_filter=self.names.admit_filter()
                )
            except Exception:
                continue
            for subj in info.state.subjects or {}:
                self.kick(subj.split(".")[2])

    def stats(self) -> dict[str, Any]:
        return {
            "fast_admits": self.fast_admits,
            "waits": self.waits,
            "admitted": self.admitted,
            "lost_races": self.lost_races,
            "lock_busy": self.lock_busy,
            "at": time.time(),
        }


__all__ = ["Admission"]
