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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import orjson
import pydantic
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from polos import history as ev
from polos._private import limits
from polos._private.model.values import Queue
from polos._private.run import timers
from polos._private.store import (
    MSG_ID,
    Names,
    connect,
    disconnect,
    kv_entries,
    load_state,
    namespace,
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
from polos._private.store.tokens import event_subject, iso_time, resume_subject
from polos.config import Settings
from polos.converter import from_json, to_json
from polos.errors import (
    CommandRejectedError,
    RunNotFoundError,
    WorkflowCancelledError,
    WorkflowFailedError,
    WorkflowTimeoutError,
)
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


_STATUS = {"suspended": "waiting"}  # the original's name for a run that waits


class ExecutionHandle(Generic[O]):
    """A started run (the original's ``ExecutionHandle``; ``RunHandle`` is the same class).

    ``id`` (alias ``run_id``) names the run. ``result()`` waits for it without polling: it
    listens to the run's control subject and reads the history once to catch up. The
    original's ``get(client)`` / ``cancel(client)`` / ``to_dict()`` work too; their ``client``
    argument may be left out (the handle knows the client that made it).
    """

    def __init__(
        self,
        client: PolosClient,
        run_id: str,
        workflow: str | None = None,
        output_type: Any = None,
        *,
        created_at: str | None = None,
        parent_execution_id: str | None = None,
        root_workflow_id: str | None = None,
        root_execution_id: str | None = None,
        step_key: str | None = None,
    ) -> None:
        self.client = client
        self.id = run_id
        self.workflow_id = workflow
        self.created_at = created_at
        self.parent_execution_id = parent_execution_id
        # A top-level run is its own root (as in the original).
        self.root_workflow_id = root_workflow_id or (
            workflow if parent_execution_id is None else None
        )
        self.root_execution_id = root_execution_id or (
            run_id if parent_execution_id is None else None
        )
        self.session_id: str | None = None
        self.user_id: str | None = None
        self.step_key = step_key
        self._output_type = output_type
        self._started = False  # made by ``start``: the run exists, recorded or not yet

    @property
    def run_id(self) -> str:
        return self.id

    @property
    def workflow(self) -> str | None:
        return self.workflow_id

    _FIELDS = (
        "id",
        "workflow_id",
        "created_at",
        "parent_execution_id",
        "root_workflow_id",
        "root_execution_id",
        "session_id",
        "user_id",
        "step_key",
    )

    def to_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self._FIELDS}

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items() if v is not None)
        return f"ExecutionHandle({shown})"

    async def get(self, client: PolosClient | None = None) -> dict[str, Any]:
        """The run as the original's ``handle.get(client)`` returns it: ``status`` (its
        names: ``waiting`` for a suspended run), ``result`` (typed by the workflow's output
        annotation), ``error``, times and lineage."""
        c = client or self.client
        try:
            doc = await c.get_execution(self.id)
        except RunNotFoundError:
            if not self._started:
                raise
            # Started by this handle, not yet recorded by the orchestrator: it is queued.
            return {
                **dict.fromkeys(
                    ("result", "error", "completed_at", "parent_execution_id"),
                ),
                "status": "queued",
                "created_at": self.created_at,
                "root_workflow_id": self.root_workflow_id,
                "root_execution_id": self.root_execution_id,
                "output_schema_name": None,
                "step_key": self.step_key,
            }
        result = doc["result"]
        if doc["status"] == "completed" and result is not None:
            result = from_json(result, self._resolved_output_type(c))
        return {
            "status": doc["status"],
            "result": result,
            "error": doc["error"],
            "created_at": doc["created_at"],
            "completed_at": doc["completed_at"],
            "parent_execution_id": doc["parent_execution_id"],
            "root_workflow_id": doc["root_workflow_id"],
            "root_execution_id": doc["root_execution_id"],
            "output_schema_name": doc["output_schema_name"],
            "step_key": doc["step_key"],
        }

    async def cancel(self, client: PolosClient | None = None) -> bool:
        """``client.cancel_execution(self.id)``: True if the run was cancelled by this."""
        return await (client or self.client).cancel_execution(self.id)

    def _resolved_output_type(self, client: PolosClient) -> Any:
        if self._output_type is None and self.workflow_id:
            wf = client.workflows.get(self.workflow_id)
            if wf is not None:
                self._output_type = wf.output_type
        return self._output_type

    async def info(self) -> RunInfo:
        return await self.client.get(self.run_id)

    async def status(self) -> str:
        return (await self.info()).status

    async def result(self, timeout: float | None = None) -> O:
        """The run's output (typed by the workflow's return annotation when known).

        Raises ``WorkflowFailedError`` / ``WorkflowCancelledError`` for runs that ended so, and
        ``WorkflowTimeoutError`` (a ``TimeoutError``) if the run has not ended within
        ``timeout`` seconds.
        """
        nc = self.client.nc
        names = self.client.names
        # The runs stream republishes each control event once stored (``stored_ctl``): the
        # ending heard there is the outcome, with no read after it. Without (a namespace made by
        # services of an earlier version), the run's control subject is only a nudge to read:
        # a fenced-out writer's ending reaches it too, though the stream refused it.
        stored = namespace(self.client.js, names, nc=nc).stored_ctl
        news: asyncio.Queue[ev.Event | None] = asyncio.Queue()

        async def on_ctl(msg: Any) -> None:
            try:
                data = msg.data
                if stored and (msg.headers or {}).get(payloads.HEADER):
                    data = await payloads.resolve(self.client.js, names, data)
                event = ev.decode(data)
            except Exception:
                if stored:  # stored, yet not an event we can read here: the log says what it is
                    news.put_nowait(None)
                return
            if isinstance(event, (ev.RunCompleted, ev.RunFailed, ev.RunCancelled)):
                news.put_nowait(event if stored else None)

        # Subscribe before reading, so an ending between the read and the subscribe is not missed.
        subject = (
            names.stored_ctl_subject(self.run_id)
            if stored
            else names.run_subject(self.run_id, "ctl")
        )
        sub = await nc.subscribe(subject, cb=on_ctl)
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
                while True:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise WorkflowTimeoutError(self.run_id, timeout, status=state.status)
                    # Event-driven; the cap is only a safety net for a missed message. A nudge
                    # may come before the stream has stored the ending: once told, re-read
                    # shortly rather than wait the cap.
                    cap = 0.02 if told else min(remaining or 30.0, 30.0)
                    try:
                        heard = await asyncio.wait_for(news.get(), timeout=cap)
                    except TimeoutError:
                        break
                    if heard is None:  # a nudge, or a reconnect: read the log
                        told = not stored
                        break
                    return self._ended(heard)
        finally:
            self.client._wakeups.discard(news)
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    def _ended(self, event: ev.Event) -> O:
        """The outcome a stored ending says (what ``_outcome`` gives once it is folded)."""
        if isinstance(event, ev.RunCompleted):
            return self._result("completed", event.output, None)
        if isinstance(event, ev.RunFailed):
            return self._result("failed", None, event.error)
        return self._result("cancelled", None, None)

    def _outcome(self, state: ev.RunState) -> O:
        return self._result(state.status, state.output, state.error)

    def _result(self, status: str, output: Any, error: dict[str, Any] | None) -> O:
        if status == "completed":
            return from_json(output, self._resolved_output_type(self.client))  # type: ignore[no-any-return]
        if status == "failed":
            raise WorkflowFailedError(self.run_id, error or {})
        raise WorkflowCancelledError(f"run {self.run_id} was cancelled")


RunHandle = ExecutionHandle  # our first name for it: one class, two names


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
        self._wakeups: set[asyncio.Queue[Any]] = set()

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
        client = cls.__new__(cls)
        await client._open(s, check_topology=check_topology)
        return client

    async def _open(self, settings: Settings, *, check_topology: bool = True) -> None:
        """Connect this (not yet connected) client: what ``connect`` does, for subclasses that
        connect later than they are made (``Polos``)."""

        async def reconnected() -> None:
            await self._on_reconnect()

        nc = await connect(settings, name="polos-client", on_reconnect=reconnected)
        PolosClient.__init__(self, nc, settings)
        if check_topology:
            # Clients never create streams or buckets (the services do, at start): a missing
            # one is named in one line now, not a timeout on the first request that needs it.
            try:
                await require_topology(self.js, self.names)
            except BaseException:
                await self.close()
                raise

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
        session_id: str | None = None,
        user_id: str | None = None,
        initial_state: Any = None,
    ) -> ExecutionHandle[O]:
        """Start a run. With ``run_id`` the start is idempotent: the same id never makes two
        runs, however often it is sent. Returns as soon as the command is stored.
        ``session_id`` and ``user_id`` are the run's (``ctx.session_id``, ``ctx.user_id``,
        inherited by its children); ``initial_state`` is the first ``ctx.state`` of a
        workflow with a ``state_schema``."""
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
        if session_id is not None:
            body["session_id"] = session_id
        if user_id is not None:
            body["user_id"] = user_id
        if initial_state is not None:
            body["initial_state"] = to_json(initial_state, what="the initial state")
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
        handle: ExecutionHandle[O] = ExecutionHandle(
            self, run_id, name, output_type, created_at=iso_time(time.time())
        )
        handle._started = True
        return handle

    def get_handle(self, run_id: str, workflow: str | None = None) -> ExecutionHandle[Any]:
        return ExecutionHandle(self, run_id, workflow)

    # ------------------------------------------------------------------ the original's names

    async def invoke(
        self,
        workflow_id: str | WorkflowDefinition[Any, O],
        payload: Any = None,
        queue_name: str | None = None,
        queue_concurrency_limit: int | None = None,
        concurrency_key: str | None = None,
        session_id: str | None = None,
        user_id: str | None = None,
        initial_state: Any = None,
        run_timeout_seconds: int | None = None,
        *,
        run_id: str | None = None,
    ) -> ExecutionHandle[O]:
        """The original's ``invoke``: ``start`` under its names. ``queue_concurrency_limit``
        (with ``queue_name``) sets that queue's limit before the run is started (shared by
        every run of the queue, as in the original)."""
        _unsupported("invoke", run_timeout_seconds=run_timeout_seconds)
        if queue_concurrency_limit is not None:
            if queue_name is None:
                raise ValueError("invoke(queue_concurrency_limit=...) needs queue_name=")
            await limits.put_queue(
                self.js, self.names, Queue(queue_name, concurrency=queue_concurrency_limit)
            )
        return await self.start(
            workflow_id,
            payload,
            run_id=run_id,
            queue=queue_name,
            concurrency_key=concurrency_key,
            session_id=session_id,
            user_id=user_id,
            initial_state=initial_state,
        )

    async def batch_invoke(
        self,
        workflows: Sequence[Any],
        session_id: str | None = None,
        user_id: str | None = None,
    ) -> list[ExecutionHandle[Any]]:
        """Start several runs; their handles in the same order. Each item names the workflow
        and its input: a ``BatchWorkflowInput`` (``id``, ``payload``), a dict with those keys,
        or a ``(workflow, input)`` pair."""
        items = [_batch_item(i, w) for i, w in enumerate(workflows)]
        return list(
            await asyncio.gather(
                *(
                    self.start(wf, payload, session_id=session_id, user_id=user_id)
                    for wf, payload in items
                )
            )
        )

    async def get_execution(self, execution_id: str) -> dict[str, Any]:
        """The run as the original's API returns an execution: ``id``, ``workflow_id``,
        ``status`` (``queued``, ``running``, ``waiting``, ``completed``, ``failed``,
        ``cancelled``), ``payload``, ``result``, ``error`` (text), ISO times, lineage,
        ``retry_count``, ``queue_name``, ``concurrency_key``. Raises ``RunNotFoundError``."""
        state = await load_state(self.nc, self.names, execution_id)
        req = state.requested
        if req is None:
            raise RunNotFoundError(f"no run {execution_id!r} in namespace {self.settings.prefix!r}")
        err = state.error
        started = (
            next(
                (
                    e.at
                    for _, e in await read_history(
                        self.nc, self.names, execution_id, kinds=("ctl",)
                    )
                    if isinstance(e, ev.RunClaimed)
                ),
                None,
            )
            if state.attempt
            else None
        )
        wf = self.workflows.get(state.workflow or "")
        out_type = wf.output_type if wf is not None else None
        return {
            "id": execution_id,
            "workflow_id": state.workflow,
            "status": _STATUS.get(state.status, state.status),
            "payload": req.input,
            "result": state.output,
            "error": f"{err.get('type')}: {err.get('message')}" if err else None,
            "created_at": _iso(state.created_at),
            "started_at": _iso(started),
            "completed_at": _iso(state.updated_at) if state.done else None,
            "parent_execution_id": req.parent_run_id,
            "root_execution_id": req.root_run_id or execution_id,
            "root_workflow_id": None if req.parent_run_id else state.workflow,
            "retry_count": max(state.attempt - 1, 0),
            "step_key": req.parent_step,
            "queue_name": req.queue or (wf.task_queue if wf is not None else state.workflow),
            "concurrency_key": req.concurrency_key,
            "session_id": None,
            "user_id": None,
            "output_schema_name": _type_name(out_type),
            "cancelled_at": _iso(state.updated_at) if state.status == "cancelled" else None,
        }

    async def cancel_execution(self, execution_id: str) -> bool:
        """The original's ``cancel_execution``: True when the run is cancelled by this, False
        for an unknown or already finished run (``cancel`` raises there instead)."""
        try:
            await self.cancel(execution_id)
        except CommandRejectedError:
            return False
        return True

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
        self,
        *args: Any,
        data: Any = None,
        timeout: float | None = None,
        suspend_workflow_id: str | None = None,
        suspend_execution_id: str | None = None,
        suspend_step_key: str | None = None,
    ) -> dict[str, Any]:
        """Resume a run's ``ctx.step.suspend(key)`` with ``data``: ``resume(run_id, key,
        data)``, or in the original's shape ``resume(suspend_workflow_id,
        suspend_execution_id, suspend_step_key, data)`` (positional or by name), where the
        execution may be the root of the run that suspended (the suspended descendant is
        found). Returns the orchestrator's answer: ``status`` "resumed", or "pending" if the
        run has not reached that suspend yet (the resume is kept and applied when it does). A
        resume that cannot apply (unknown or finished run, key already resumed) raises
        ``CommandRejectedError`` and changes nothing.
        """
        original = suspend_execution_id is not None or suspend_step_key is not None
        if len(args) == 4 and not original:
            _, suspend_execution_id, suspend_step_key, data = args
            original = True
        elif original and not args:
            pass
        elif not original and len(args) in (2, 3):
            run_id, key = args[0], args[1]
            if len(args) == 3:
                data = args[2]
        else:
            raise TypeError(
                "resume takes (run_id, key[, data]) or the original's (suspend_workflow_id, "
                "suspend_execution_id, suspend_step_key, data)"
            )
        if original:
            if not suspend_execution_id or not suspend_step_key:
                raise TypeError("resume needs suspend_execution_id= and suspend_step_key=")
            run_id = await self._suspended_at(suspend_execution_id, suspend_step_key)
            key = suspend_step_key
        if not isinstance(run_id, str) or not isinstance(key, str):
            raise TypeError("resume: run_id and key must be strings")
        if not valid_token(run_id):
            raise ValueError(f"run_id {run_id!r} is not valid")
        body: ResumeCommand = {"data": to_json(data, what="the resume data")}
        if len(orjson.dumps(body)) > payloads.inline_limit(self.nc):
            # Too big for a command message: the data travels through the Object Store.
            ref = await payloads.put_value(self.js, self.names, run_id, orjson.dumps(body["data"]))
            body = {"data_ref": ref}
        return await send_command(
            self.nc,
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
        travels in the ``Polos-Event-Type`` header (``polos.events``)."""
        subject = event_subject(self.names, topic)
        encoded = orjson.dumps(to_json(data, what="the event data"))
        headers: dict[str, str] = {}
        if event_type is not None:
            if not isinstance(event_type, str) or not event_type:
                raise ValueError(f"event_type must be a non-empty string, got {event_type!r}")
            headers[payloads.EVENT_TYPE] = event_type
        if len(encoded) > payloads.inline_limit(self.nc):
            # Too big for one message: the data goes to the Object Store, the event names it.
            headers[payloads.EVENT_REF] = await payloads.put_event_value(
                self.js, self.names, encoded
            )
            encoded = b""
        ack = await publish(
            self.nc,
            subject,
            encoded,
            headers=headers or None,
            timeout=self.settings.request_timeout,
        )
        return ack.seq

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

    async def _suspended_at(self, run_id: str, key: str) -> str:
        """The run that waits at ``key``: ``run_id`` itself, else a descendant of it that does
        (the original resumes by the root's ids), else ``run_id`` (the resume is kept until it
        gets there)."""
        if not valid_token(run_id):
            raise ValueError(f"suspend_execution_id {run_id!r} is not valid")
        state = await load_state(self.nc, self.names, run_id, kinds=("ctl",))
        if state.requested is None or state.done:
            return run_id  # the orchestrator answers: pending, or refused saying why
        if state.suspended is not None and state.suspended.step == key:
            return run_id
        # Its descendants, from the run index (one read of it, only on this path).
        runs = {r.run_id: r for r in await self.list_runs(limit=100_000)}
        for r in runs.values():
            if r.status != "suspended" or (r.waiting or {}).get("step") != key:
                continue
            up, seen = r.parent_run_id, 0
            while up is not None and seen < 1000:
                if up == run_id:
                    return r.run_id
                parent = runs.get(up)
                up, seen = (parent.parent_run_id if parent else None), seen + 1
        return run_id

    # ------------------------------------------------------------------ Workflow.run / invoke

    async def _invoke_definition(
        self,
        workflow: WorkflowDefinition[Any, O],
        payload: Any = None,
        queue: str | None = None,
        concurrency_key: str | None = None,
        session_id: str | None = None,
        user_id: str | None = None,
        initial_state: Any = None,
        run_timeout_seconds: int | None = None,
    ) -> ExecutionHandle[O]:
        """``workflow.invoke(client, payload, ...)``: start it, return its handle."""
        _unsupported(f"{workflow.name}.invoke", run_timeout_seconds=run_timeout_seconds)
        if workflow.takes_input and payload is None and workflow.input_type is not None:
            try:
                from_json(None, workflow.input_type)
            except Exception:
                raise ValueError(
                    f"workflow {workflow.name!r} requires a payload, but None was provided"
                ) from None
        return await self.start(
            workflow,
            payload,
            queue=queue,
            concurrency_key=concurrency_key,
            session_id=session_id,
            user_id=user_id,
            initial_state=initial_state,
        )

    async def _run_definition(
        self,
        workflow: WorkflowDefinition[Any, O],
        payload: Any = None,
        queue: str | None = None,
        concurrency_key: str | None = None,
        session_id: str | None = None,
        user_id: str | None = None,
        timeout: float | None = 600.0,
        initial_state: Any = None,
    ) -> O:
        """``workflow.run(client, payload, ...)``: start it and wait for its output (typed by
        the workflow's return annotation). Waits ``timeout`` seconds at most (None: for as
        long as it takes) and raises ``TimeoutError`` then; the run itself goes on."""
        handle = await self._invoke_definition(
            workflow, payload, queue, concurrency_key, session_id, user_id, initial_state
        )
        return await handle.result(timeout=timeout)

    async def waiting(self, limit: int = 100) -> list[RunInfo]:
        """Runs suspended for a human (``ctx.step.suspend``), with the data they showed."""
        runs = await self.list_runs(status="suspended", limit=100_000)
        return [r for r in runs if (r.waiting or {}).get("kind") == "suspend"][:limit]


def _unsupported(where: str, **options: Any) -> None:
    """Options of the original that this release does not carry yet: refused by name, never
    silently dropped."""
    given = [name for name, value in options.items() if value is not None]
    if given:
        raise ValueError(
            f"{where}: {', '.join(given)} not supported here yet (leave "
            f"{'it' if len(given) == 1 else 'them'} out)"
        )


def _batch_item(i: int, item: Any) -> tuple[str | WorkflowDefinition[Any, Any], Any]:
    if isinstance(item, tuple) and len(item) == 2:
        return item[0], item[1]
    if isinstance(item, dict):
        wf, payload, rest = item.get("id"), item.get("payload"), set(item) - {"id", "payload"}
    else:
        wf, payload = getattr(item, "id", None), getattr(item, "payload", None)
        rest = {
            n
            for n in ("initial_state", "run_timeout_seconds")
            if getattr(item, n, None) is not None
        }
    if not isinstance(wf, str | WorkflowDefinition):
        raise TypeError(
            f"batch_invoke item {i}: expected BatchWorkflowInput(id=..., payload=...), a dict "
            f"with 'id' and 'payload', or a (workflow, input) pair; got {item!r}"
        )
    if rest:
        raise ValueError(f"batch_invoke item {i}: {', '.join(sorted(rest))} not supported here yet")
    return wf, payload


def _iso(t: float | None) -> str | None:
    return iso_time(t) if t else None


def _type_name(tp: Any) -> str | None:
    """``module.Class`` of a pydantic output type, as the original's ``output_schema_name``."""
    if isinstance(tp, type) and issubclass(tp, pydantic.BaseModel):
        return f"{tp.__module__}.{tp.__qualname__}"
    return None


async def batch_invoke(
    client: PolosClient,
    workflows: Sequence[Any],
    session_id: str | None = None,
    user_id: str | None = None,
) -> list[ExecutionHandle[Any]]:
    """The original's top-level ``batch_invoke(client, workflows)``: ``client.batch_invoke``."""
    return await client.batch_invoke(workflows, session_id=session_id, user_id=user_id)


__all__ = ["ExecutionHandle", "PolosClient", "RunHandle", "RunInfo", "batch_invoke"]
