"""The client's point of view: start runs, wait for results, look runs up.

    client = await PolosClient.connect("nats://127.0.0.1:4222")
    handle = await client.start("process_order", order)
    result = await handle.result(timeout=60)

Everything the client does is also possible with any NATS client and JSON (see the README's
subject table): the client is a convenience, not a gatekeeper.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import orjson
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from polos import history as ev
from polos._private.model.values import EVENT_TYPE_HEADER
from polos._private.run import timers
from polos._private.store import (
    MSG_ID,
    Names,
    connect,
    disconnect,
    kv_entries,
    load_state,
    payloads,
    publish,
    read_history,
    read_subject,
    valid_token,
)
from polos._private.store import check_topology as require_topology
from polos._private.store.commands import (
    CancelCommand,
    ResumeCommand,
    StartCommand,
    send_command,
)
from polos._private.store.index import IndexEntry
from polos._private.store.tokens import event_subject, resume_subject
from polos.config import Settings
from polos.converter import from_json, to_json
from polos.errors import RunNotFoundError, WorkflowCancelledError, WorkflowFailedError
from polos.workflow import WorkflowDefinition

O = TypeVar("O")  # noqa: E741


@dataclass(frozen=True)
class RunInfo:
    """A run as the log says it is."""

    run_id: str
    workflow: str | None
    status: str
    created_at: float | None = None
    updated_at: float | None = None
    attempt: int = 0
    worker_id: str | None = None
    output: Any = None
    error: dict[str, Any] | None = None
    steps: int = 0
    waiting: dict[str, Any] | None = None
    parent_run_id: str | None = None
    note: str | None = None  # e.g. "no worker serves 'x' yet"
    extra: dict[str, Any] = field(default_factory=dict)


def _info_from_state(state: ev.RunState) -> RunInfo:
    waiting = None
    if state.status == "suspended" and state.suspended is not None:
        s = state.suspended
        waiting = {
            "step": s.step,
            "kind": s.kind,
            "data": s.data,
            "topic": s.topic,
            "wake_at": s.wake_at,
            "timeout_at": s.timeout_at,
        }
    return RunInfo(
        run_id=state.run_id,
        workflow=state.workflow,
        status=state.status,
        created_at=state.created_at,
        updated_at=state.updated_at,
        attempt=state.attempt,
        worker_id=state.worker_id,
        output=state.output,
        error=state.error,
        steps=len(state.steps),
        waiting=waiting,
        parent_run_id=state.requested.parent_run_id if state.requested else None,
    )


class RunHandle(Generic[O]):
    """A started run. ``result()`` waits for it without polling: it listens to the run's
    control subject and reads the history once to catch up."""

    def __init__(
        self, client: PolosClient, run_id: str, workflow: str | None, output_type: Any = None
    ) -> None:
        self.client = client
        self.run_id = run_id
        self.workflow = workflow
        self._output_type = output_type

    def __repr__(self) -> str:
        return f"RunHandle(run_id={self.run_id!r}, workflow={self.workflow!r})"

    async def info(self) -> RunInfo:
        return await self.client.get(self.run_id)

    async def status(self) -> str:
        return (await self.info()).status

    async def result(self, timeout: float | None = None) -> O:
        """The run's output (typed by the workflow's return annotation when known).

        Raises ``WorkflowFailedError`` / ``WorkflowCancelledError`` for runs that ended so, and
        ``TimeoutError`` if the run has not ended within ``timeout`` seconds.
        """
        nc = self.client.nc
        names = self.client.names
        news: asyncio.Queue[None] = asyncio.Queue()

        async def on_ctl(msg: Any) -> None:
            with contextlib.suppress(Exception):
                if isinstance(
                    ev.decode(msg.data), (ev.RunCompleted, ev.RunFailed, ev.RunCancelled)
                ):
                    news.put_nowait(None)

        # Subscribe before reading, so an ending between the read and the subscribe is not missed.
        # What a subscriber sees is only a nudge: a fenced-out writer's ending is delivered to
        # subscribers too, though the stream refused it, so the outcome always comes from the log.
        sub = await nc.subscribe(names.run_subject(self.run_id, "ctl"), cb=on_ctl)
        self.client._wakeups.add(news)  # a reconnect may have dropped the ending: read again
        deadline = None if timeout is None else time.monotonic() + timeout
        told = False
        try:
            while True:
                # Control events only: the outcome is in them, and a long run's steps are not
                # worth reading to learn it.
                state = await load_state(nc, names, self.run_id, kinds=("ctl",))
                if state.done:
                    return self._outcome(state)
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"run {self.run_id} still {state.status} after {timeout}s")
                # Event-driven; the cap is only a safety net for a missed message. Subscribers
                # may hear of the ending before the stream has stored it: once told, re-read
                # shortly rather than wait the cap.
                cap = 0.02 if told else min(remaining or 30.0, 30.0)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(news.get(), timeout=cap)
                    told = True
        finally:
            self.client._wakeups.discard(news)
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    def _outcome(self, state: ev.RunState) -> O:
        if state.status == "completed":
            if self._output_type is None and self.workflow:
                wf = self.client.workflows.get(self.workflow)
                if wf is not None:
                    self._output_type = wf.output_type
            return from_json(state.output, self._output_type)  # type: ignore[no-any-return]
        if state.status == "failed":
            raise WorkflowFailedError(self.run_id, state.error or {})
        raise WorkflowCancelledError(f"run {self.run_id} was cancelled")


class PolosClient:
    """Connection to one Polos namespace on a NATS server or cluster."""

    def __init__(self, nc: NATS, settings: Settings, *, owns_connection: bool = True) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream(timeout=settings.request_timeout)
        self.settings = settings
        self.names = Names(settings.prefix)
        self.workflows: dict[str, WorkflowDefinition[Any, Any]] = {}
        self._owns = owns_connection
        # Waiters to nudge after a reconnect (core subscriptions miss what was sent meanwhile).
        self._wakeups: set[asyncio.Queue[None]] = set()

    async def _on_reconnect(self) -> None:
        for q in list(self._wakeups):
            q.put_nowait(None)

    @classmethod
    async def connect(
        cls,
        url: str | None = None,
        *,
        prefix: str | None = None,
        settings: Settings | None = None,
        check_topology: bool = True,
    ) -> PolosClient:
        """Connect to the namespace. Fails fast: if no server of the URL answers, or the server
        refuses the credentials, this raises ``ConnectionFailedError`` within about
        ``request_timeout`` (at once when refused), one line naming the URL without its
        password and the cause; retry it yourself if waiting for the server is what you want.
        Once connected, the client reconnects by itself, with back-off, for as long as it is
        open (one log line when the connection is lost, one when it is back)."""
        s = settings or Settings()
        if url is not None:
            s = s.with_(nats_url=url)
        if prefix is not None:
            s = s.with_(prefix=prefix)
        holder: list[PolosClient] = []

        async def reconnected() -> None:
            if holder:
                await holder[0]._on_reconnect()

        nc = await connect(s, name="polos-client", on_reconnect=reconnected)
        client = cls(nc, s)
        holder.append(client)
        if check_topology:
            # Clients never create streams or buckets (the services do, at start): a missing
            # one is named in one line now, not a timeout on the first request that needs it.
            try:
                await require_topology(client.js, client.names)
            except BaseException:
                await client.close()
                raise
        return client

    async def close(self) -> None:
        if self._owns:
            with contextlib.suppress(Exception):
                await disconnect(self.nc)

    async def __aenter__(self) -> PolosClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ runs

    async def start(
        self,
        workflow: str | WorkflowDefinition[Any, O],
        input: Any = None,
        *,
        run_id: str | None = None,
        queue: str | None = None,
        concurrency_key: str | None = None,
    ) -> RunHandle[O]:
        """Start a run. With ``run_id`` the start is idempotent: the same id never makes two
        runs, however often it is sent. Returns as soon as the command is stored."""
        output_type = None
        if isinstance(workflow, WorkflowDefinition):
            self.workflows[workflow.name] = workflow
            name, output_type = workflow.name, workflow.output_type
        else:
            name = workflow
        if not valid_token(name):
            raise ValueError(f"workflow name {name!r} is not valid")
        run_id = run_id or uuid.uuid4().hex
        if not valid_token(run_id):
            raise ValueError(f"run_id {run_id!r} must be 1-128 letters, digits, '_' or '-'")
        body: StartCommand = {"input": to_json(input, what="the workflow input"), "run_id": run_id}
        if queue is not None:
            body["queue"] = queue
        if concurrency_key is not None:
            body["concurrency_key"] = concurrency_key
        data = orjson.dumps(body)
        if len(data) > payloads.inline_limit(self.nc):
            # Too big for a command message: the input travels through the Object Store.
            ref = await payloads.put_value(
                self.js, self.names, run_id, orjson.dumps(body.pop("input"))
            )
            body["input_ref"] = ref
            data = orjson.dumps(body)
        await publish(
            self.nc,
            self.names.start_subject(name),
            data,
            headers={MSG_ID: f"start/{run_id}", "Polos-Client": "python"},
            timeout=self.settings.request_timeout,
        )
        return RunHandle(self, run_id, name, output_type)

    def get_handle(self, run_id: str, workflow: str | None = None) -> RunHandle[Any]:
        return RunHandle(self, run_id, workflow)

    async def get(self, run_id: str) -> RunInfo:
        """The run's current state, folded from its history (the truth, not the index)."""
        state = await load_state(self.nc, self.names, run_id)
        if state.requested is None:
            raise RunNotFoundError(f"no run {run_id!r} in namespace {self.settings.prefix!r}")
        return _info_from_state(state)

    async def history(self, run_id: str) -> list[tuple[int, ev.Event]]:
        """The run's events in order, with their stream sequences."""
        return await read_history(self.nc, self.names, run_id)

    async def list_runs(
        self,
        *,
        status: str | list[str] | None = None,
        workflow: str | None = None,
        limit: int = 100,
    ) -> list[RunInfo]:
        """Runs from the run index, newest first. ``status`` may be one status or a list."""
        wanted = {status} if isinstance(status, str) else set(status or [])
        entries = await kv_entries(self.nc, self.names.runs_bucket)
        serving = await self._served_workflows()
        out: list[RunInfo] = []
        for m in entries:
            e: IndexEntry = orjson.loads(m.value)
            if wanted and e.get("status") not in wanted:
                continue
            if workflow and e.get("workflow") != workflow:
                continue
            note = None
            if e.get("status") == "queued" and e.get("workflow") not in serving:
                note = f"no worker serves {e.get('workflow')!r} yet"
            out.append(
                RunInfo(
                    run_id=e["run_id"],
                    workflow=e.get("workflow"),
                    status=e.get("status", "unknown"),
                    created_at=e.get("created_at"),
                    updated_at=e.get("updated_at"),
                    attempt=e.get("attempt", 0),
                    worker_id=e.get("worker_id"),
                    error=e.get("error"),
                    waiting=dict(w) if (w := e.get("waiting")) else None,
                    parent_run_id=e.get("parent_run_id"),
                    note=note,
                    extra={k: v for k, v in e.items() if k not in RunInfo.__dataclass_fields__},
                )
            )
        out.sort(key=lambda r: r.created_at or 0, reverse=True)
        return out[:limit]

    async def workers(self) -> list[dict[str, Any]]:
        """Live workers (their registrations expire when they stop heartbeating)."""
        return [orjson.loads(m.value) for m in await kv_entries(self.nc, self.names.workers_bucket)]

    async def _served_workflows(self) -> set[str]:
        served: set[str] = set()
        for w in await self.workers():
            served.update(w.get("workflows", []))
        return served

    async def dead_letters(self, limit: int = 50) -> list[dict[str, Any]]:
        """The newest dead-lettered messages with the reason each was kept aside."""
        msgs = await read_subject(self.nc, self.names.dlq_stream, f"{self.settings.prefix}.dlq.>")
        return [orjson.loads(m.data) for m in msgs[-limit:]]

    # ------------------------------------------------------------------ waiting (docs/waiting.md)

    async def resume(
        self, run_id: str, key: str, data: Any = None, *, timeout: float | None = None
    ) -> dict[str, Any]:
        """Resume the run's ``ctx.step.suspend(key)`` with ``data``; returns the orchestrator's
        answer: ``status`` "resumed", or "pending" if the run has not reached that suspend yet
        (the resume is kept and applied when it does). A resume that cannot apply (unknown or
        finished run, key already resumed) raises ``CommandRejectedError`` and changes nothing.
        """
        if not valid_token(run_id):
            raise ValueError(f"run_id {run_id!r} is not valid")
        body: ResumeCommand = {"data": to_json(data, what="the resume data")}
        if len(orjson.dumps(body)) > payloads.inline_limit(self.nc):
            # Too big for a command message: the data travels through the Object Store.
            ref = await payloads.put_value(self.js, self.names, run_id, orjson.dumps(body["data"]))
            body = {"data_ref": ref}
        return await send_command(
            self.nc,
            self.js,
            resume_subject(self.names, run_id, key),
            body,
            msg_id=f"resume/{run_id}/{uuid.uuid4().hex}",
            timeout=timeout or self.settings.request_timeout,
        )

    async def cancel(
        self, run_id: str, reason: str | None = None, *, timeout: float | None = None
    ) -> dict[str, Any]:
        """Cancel a run: its worker is interrupted at the next await, its children are
        cancelled, its timers and waits are cleared. Raises ``CommandRejectedError`` for an
        unknown or finished run."""
        if not valid_token(run_id):
            raise ValueError(f"run_id {run_id!r} is not valid")
        body: CancelCommand = {"reason": reason} if reason is not None else {}
        return await send_command(
            self.nc,
            self.js,
            self.names.cancel_subject(run_id),
            body,
            msg_id=f"cancel/{run_id}/{uuid.uuid4().hex}",
            timeout=timeout or self.settings.request_timeout,
        )

    async def publish_event(
        self, topic: str, data: Any = None, *, event_type: str | None = None
    ) -> int:
        """Publish an external event on ``topic`` (see docs/waiting.md for the subject it maps
        to); returns its sequence in the events stream. Same as a raw JSON publish; data too
        big for one message goes through the Object Store (docs/operations.md). ``event_type``
        travels as the ``Polos-Event-Type`` header (``EventPayload.event_type``)."""
        subject = event_subject(self.names, topic)
        encoded = orjson.dumps(to_json(data, what="the event data"))
        headers: dict[str, str] | None = {EVENT_TYPE_HEADER: event_type} if event_type else None
        if len(encoded) > payloads.inline_limit(self.nc):
            # Too big for one message: the data goes to the Object Store, the event names it.
            headers = {
                **(headers or {}),
                payloads.EVENT_REF: await payloads.put_event_value(self.js, self.names, encoded),
            }
            encoded = b""
        ack = await self.js.publish(subject, encoded, headers=headers)
        return int(ack.seq)

    async def create_schedule(
        self,
        key: str,
        workflow: str | WorkflowDefinition[Any, Any],
        cron: str,
        *,
        timezone: str | None = None,
        input: Any = None,
    ) -> dict[str, Any]:
        """Create (or replace) the keyed cron schedule ``key``: each firing starts one run."""
        name = workflow.name if isinstance(workflow, WorkflowDefinition) else workflow
        return await timers.put_schedule(
            self.js, self.names, key, name, cron, timezone=timezone, input=input
        )

    async def list_schedules(self) -> list[dict[str, Any]]:
        return await timers.list_schedules(self.nc, self.names)

    async def delete_schedule(self, key: str) -> bool:
        """Delete the keyed schedule; False if there was none."""
        return await timers.delete_schedule(self.js, self.names, key)

    async def waiting(self, limit: int = 100) -> list[RunInfo]:
        """Runs suspended for a human (``ctx.step.suspend``), with the data they showed."""
        runs = await self.list_runs(status="suspended", limit=100_000)
        return [r for r in runs if (r.waiting or {}).get("kind") == "suspend"][:limit]


__all__ = ["PolosClient", "RunHandle", "RunInfo"]
