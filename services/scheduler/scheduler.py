"""The scheduler: owns time. Durable sleeps, wait timeouts, long retry back-offs, cron.

Timers are JetStream message schedules (nats-server 2.12+) in the ``<P>_TIMERS`` stream: the
server holds each one as a message and, when it is due, stores a copy on
``<prefix>.timer.fire.…``. So a pending timer lives in the server's file store, not in this
process: no timer is lost when the scheduler or nats-server restarts, and a firing that happens
while no scheduler runs waits in the stream until one comes back.

Every scheduler instance pulls from one durable consumer on the fire subjects, so each firing
is handled by one instance; the wake it appends is fenced on the run's ``RunSuspended``
sequence, so even a redelivered firing takes effect once. The orchestrator dispatches the woken
run (its ``RunWoken`` hook).

Cron schedules are message schedules too (``Nats-Schedule: <cron>`` with a time zone); a firing
starts a run whose id is derived from the firing, so two schedulers start it once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any

import nats.js.errors
import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from polos import history as ev
from polos._private.model.aio import cancel_and_wait
from polos._private.run.timers import put_schedule
from polos._private.run.wake import wake
from polos._private.store import (
    MSG_ID,
    Fatal,
    Names,
    PullLoop,
    connect_service,
    dead_letter,
    disconnect,
    ensure_consumer,
    ensure_topology,
    leader_last,
)
from polos._private.store.commands import StartCommand
from polos._private.store.tokens import iso_time
from polos.config import Settings

log = logging.getLogger("polos.scheduler")

_CRON_NS = uuid.UUID("3c0e4b8a-61f2-4f0e-a3f5-7f0f3e1f8b21")
DURABLE = "scheduler_fire"
# The waits a timer ends: sleeps, retry back-offs, LLM rate waits, and timeouts of these two.
_TIMED_WAITS = ("sleep", "retry", "rate", "suspend", "event")


class Scheduler:
    """One scheduler instance. Run as many as you like against one namespace."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        self.names = Names(self.settings.prefix)
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._loop: PullLoop | None = None
        self._bg: list[asyncio.Task[None]] = []
        self._waits_kv: KeyValue | None = None
        # figures for tests and the docs
        self.fired = 0
        self.woken = 0
        self.stale = 0
        self.cron_runs = 0
        self.lateness_ms: list[float] = []
        # Set when the server refuses the service credentials on a reconnect.
        self.fatal = Fatal()

    @property
    def js(self) -> JetStreamContext:
        assert self._js is not None, "scheduler not started"
        return self._js

    @property
    def nc(self) -> NATS:
        assert self._nc is not None, "scheduler not started"
        return self._nc

    async def start(self) -> None:
        self._nc = await connect_service(self.settings, name="polos-scheduler", on_fatal=self.fatal)
        self._js = self._nc.jetstream(timeout=self.settings.request_timeout)
        # The whole namespace's topology, not just the timers: a service creates it at start.
        await ensure_topology(self._js, self.names, self.settings)
        await ensure_consumer(
            self._js,
            self.names.timers_stream,
            DURABLE,
            f"{self.names.prefix}.timer.fire.>",
            ack_wait=self.settings.service_ack_wait,
        )
        self._loop = PullLoop(
            self._nc, self.names.timers_stream, DURABLE, self._on_fire, capacity=256, name=DURABLE
        )
        self._loop.start()
        self._bg.append(asyncio.create_task(self._watch_workflows(), name="scheduler-workflows"))
        log.info("scheduler started on namespace %r", self.settings.prefix)

    async def stop(self) -> None:
        await cancel_and_wait(self._bg)
        if self._loop is not None:
            await self._loop.stop(drain_timeout=2.0)
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await disconnect(self._nc)

    async def __aenter__(self) -> Scheduler:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ firings

    async def _on_fire(self, msg: Msg) -> None:
        try:
            body = orjson.loads(msg.data)
            kind = body["kind"]
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            await dead_letter(
                self.js,
                self.names,
                source="timer",
                reason=f"malformed timer: {exc}",
                subject=msg.subject,
                data=msg.data,
            )
            await self._done(msg)
            return
        self.fired += 1
        try:
            if kind == "wake" and body.get("wait_kind") not in _TIMED_WAITS:
                await dead_letter(
                    self.js,
                    self.names,
                    source="timer",
                    reason=f"unknown wait kind {body.get('wait_kind')!r}; a timer "
                    f"wakes {', '.join(_TIMED_WAITS)}",
                    subject=msg.subject,
                    data=msg.data,
                )
            elif kind == "wake":
                await self._wake(body)
            elif kind == "cron":
                await self._cron(body, msg)
            elif kind == "batch":
                await self._batch_due(body)
            else:
                await dead_letter(
                    self.js,
                    self.names,
                    source="timer",
                    reason=f"unknown timer kind {kind!r}",
                    subject=msg.subject,
                    data=msg.data,
                )
        except Exception:
            log.exception("timer on %s failed; will retry", msg.subject)
            await msg.nak(delay=0.5)
            return
        await self._done(msg)

    async def _done(self, msg: Msg) -> None:
        await msg.ack()
        # A fired timer has done its work; keep the stream to what is pending.
        with contextlib.suppress(Exception):
            await self.js.delete_msg(self.names.timers_stream, msg.metadata.sequence.stream)

    async def _wake(self, body: dict[str, Any]) -> None:
        run_id, seq, step = str(body["run_id"]), int(body["seq"]), str(body["step"])
        wait_kind, due = body.get("wait_kind"), float(body.get("due") or 0)
        early = due - time.time()
        if early > 0:
            # Fired TIMER_LEAD early on purpose: the last fraction of a second waits here.
            await asyncio.sleep(early)
        now = time.time()
        self.lateness_ms.append((now - due) * 1000)
        kind: ev.StepKind | None
        if wait_kind == "sleep":
            kind, reason, output = "sleep", "timer", {"due": due, "at": now}
        elif wait_kind == "retry":
            kind, reason, output = None, "retry back-off over", None
        elif wait_kind == "rate":
            # The LLM step's booked tokens are there; the step itself runs once the run is back.
            kind, reason, output = None, "rate capacity there", None
        elif wait_kind in ("suspend", "event"):
            kind, reason = wait_kind, "timeout"
            output = {"timeout": True, "timeout_at": due, "at": now}
        else:
            raise AssertionError(wait_kind)  # refused by _on_fire
        woke = await wake(
            self.js,
            self.names,
            run_id,
            step,
            expected_seq=seq,
            reason=reason,
            cause="timer",
            kind=kind,
            output=output,
            workflow=body.get("workflow"),
        )
        if woke is None:
            self.stale += 1  # resumed, cancelled or woken by another instance first
        else:
            self.woken += 1

    async def _cron(self, body: dict[str, Any], msg: Msg) -> None:
        key, workflow = str(body["key"]), str(body["workflow"])
        # The firing's stream sequence names it: a redelivery or a second scheduler derives the
        # same run id, and the start is idempotent on it.
        fired = msg.metadata.sequence.stream
        run_id = uuid.uuid5(_CRON_NS, f"{self.names.prefix}/{key}/{fired}").hex
        value = body.get("input")
        if value is None:
            # The original SDK's SchedulePayload: a schedule without an input of its own.
            value = await self._schedule_payload(key, body, msg)
        payload: StartCommand = {"input": value, "run_id": run_id}
        await self.js.publish(
            self.names.start_subject(workflow),
            orjson.dumps(payload),
            headers={MSG_ID: f"start/{run_id}", "Polos-Client": "scheduler"},
        )
        self.cron_runs += 1

    async def _batch_due(self, body: dict[str, Any]) -> None:
        """A triggered workflow's batch waited its ``batch_timeout_seconds``: the orchestrator
        starts it with the events there are (services/orchestrator/triggers.py)."""
        workflow, first = str(body["workflow"]), int(body["seq"])
        await self.js.publish(
            self.names.trigger_subject(workflow),
            orjson.dumps({"first_seq": first}),
            headers={MSG_ID: f"trigger/{workflow}/{first}"},
        )

    async def _schedule_payload(self, key: str, body: dict[str, Any], msg: Msg) -> dict[str, Any]:
        """The firing as a ``SchedulePayload``: when it was due (the server's firing time, to
        the second), the previous firing's, and the next one (the server says it)."""
        stamp = msg.metadata.timestamp
        due = (stamp.timestamp() if stamp else time.time()) // 1 * 1.0
        upcoming = (msg.headers or {}).get("Nats-Schedule-Next")
        # The previous firing's time is kept per schedule beside the waiters (service-only).
        kv = await self._waits()
        slot = f"schedule/{key}"
        last: float | None = None
        with contextlib.suppress(nats.js.errors.KeyNotFoundError):
            entry = await kv.get(slot)
            if entry.value:
                prev = orjson.loads(entry.value)
                if prev.get("fired") == msg.metadata.sequence.stream:
                    last = prev.get("last")  # this very firing, redelivered
                else:
                    last = prev.get("due")
        await kv.put(
            slot,
            orjson.dumps({"due": due, "last": last, "fired": msg.metadata.sequence.stream}),
        )
        return {
            "timestamp": iso_time(due),
            "last_timestamp": iso_time(last) if last is not None else None,
            "timezone": body.get("timezone") or "UTC",
            "schedule_id": key,
            "key": body.get("schedule_key") or ("global" if key.startswith("wf-") else key),
            "upcoming": upcoming,
        }

    async def _waits(self) -> KeyValue:
        if self._waits_kv is None:
            self._waits_kv = await self.js.key_value(self.names.waits_bucket)
        return self._waits_kv

    # ------------------------------------------------------------------ @workflow(schedule=...)

    async def _watch_workflows(self) -> None:
        """Keep a cron schedule ``wf-<name>`` for every registered workflow with ``schedule=``."""
        while True:
            try:
                kv = await self.js.key_value(self.names.workflows_bucket)
                watcher = await kv.watchall()
                async for entry in watcher:
                    if entry is None or not entry.value:
                        continue
                    await self._on_workflow_entry(entry.key, entry.value)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("watching workflows failed; retrying")
                await asyncio.sleep(1.0)

    async def _on_workflow_entry(self, key: str, value: bytes) -> None:
        """One registration: a bad one is dead-lettered with the reason, never a crash of the
        watcher (which would stop every other workflow's schedule)."""
        try:
            doc = orjson.loads(value)
            if not isinstance(doc, dict):
                raise ValueError("a workflow registration is a JSON object")
            await self._ensure_workflow_schedule(doc)
        except (orjson.JSONDecodeError, ValueError, TypeError) as exc:
            await dead_letter(
                self.js,
                self.names,
                source="schedule",
                reason=f"workflow registration {key!r}: {exc}",
                subject=f"$KV.{self.names.workflows_bucket}.{key}",
                data=value,
            )

    async def _ensure_workflow_schedule(self, doc: dict[str, Any]) -> None:
        spec, name = doc.get("schedule"), doc.get("name")
        if not spec or not name:
            return  # not scheduled (``schedule=True``: schedules come from the API)
        timezone, user_key = doc.get("timezone"), doc.get("schedule_key")
        if spec is True:
            return
        if isinstance(spec, dict):  # the original SDK's form, from a worker that sent it as is
            timezone = spec.get("timezone") or timezone
            user_key = spec.get("key") or user_key
            spec = spec.get("cron")
        if not isinstance(spec, str):
            raise ValueError(
                f"schedule must be a cron string, a dict with 'cron', or true; got {spec!r}"
            )
        key = f"wf-{name}" if user_key in (None, "global") else f"wf-{name}-{user_key}"
        # On the leader: a replica behind it could show no schedule, and writing it again
        # would move its next firing (a restart must not).
        current = await leader_last(self.nc, self.names.timers_stream, self.names.cron_subject(key))
        if current is not None and current.data:  # empty: a deleted schedule's tombstone
            old = orjson.loads(current.data)
            if old.get("cron") == spec and old.get("timezone") == timezone:
                return  # already scheduled: a restart must not move the next firing
        try:
            await put_schedule(
                self.js,
                self.names,
                key,
                name,
                spec,
                timezone=timezone,
                extra={"schedule_key": user_key or "global"},
            )
        except ValueError as exc:
            await dead_letter(
                self.js,
                self.names,
                source="schedule",
                reason=str(exc),
                subject=self.names.cron_subject(key),
                data=orjson.dumps(doc),
            )


__all__ = ["Scheduler"]
