"""The worker's point of view: pull tasks, replay runs, execute steps, heartbeat.

``Worker`` embeds in any asyncio program::

    async with Worker([process_order], nats_url="nats://127.0.0.1:4222"):
        await asyncio.Event().wait()

``polos worker my_module`` (services/worker) does the same for every workflow in a module.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import nats.errors
import orjson
import pydantic
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from polos import history as ev
from polos._private import limits
from polos._private.agents import catalog
from polos._private.agents.loop import Agent, agent_workflow
from polos._private.agents.tools import Tool
from polos._private.limits import register_queues, run_holding_slots
from polos._private.model.aio import cancel_and_wait
from polos._private.ops.commands import local_url
from polos._private.ops.instance import data_dir_from
from polos._private.ops.runtime import load_workflows, log_to_file, run_until_signal, tune_gc
from polos._private.run.execution import RunExecution, error_info
from polos._private.run.lifecycle import run_workflow
from polos._private.run.signals import Suspend
from polos._private.store import (
    AppendUnavailable,
    Fatal,
    FencedOut,
    Names,
    PullLoop,
    StaleRead,
    check_topology,
    connect_service,
    dead_letter,
    disconnect,
    ensure_consumer,
    load_state,
    read_history,
    reread_until,
    snapshots,
)
from polos._private.store.natspy import sent
from polos._private.store.task import Task, TaskDecodeError, decode_task
from polos.config import Settings
from polos.converter import from_json, json_schema, to_json, validation_errors
from polos.devllm import serve_this_process
from polos.errors import InputValidationError, NonDeterminismError, SerializationError
from polos.workflow import WorkflowContext, WorkflowDefinition

log = logging.getLogger("polos.worker")

# Deliveries of a task whose run's history reads stay behind the task's cause before it is
# dead-lettered (``task``) instead of handed back again (0.5 s apart: about 10 s).
STALE_TASK_DELIVERIES = 20


@dataclass
class _Active:
    run_id: str
    msg: Msg
    task: asyncio.Task[None] | None = None
    cancelled: bool = False  # the run was cancelled: its execution is being interrupted


class Worker:
    """Serves a set of workflows: one durable pull consumer per workflow's task subject.

    ``Worker(workflows, settings=... | nats_url=..., ...)``, or the original's
    ``Worker(client, agents=[...], tools=[...], workflows=[...], max_concurrent_workflows=...,
    log_file=...)``: the worker connects where ``client`` does (a ``Polos`` gives its worker's
    credentials; a client of the data dir's ``polos up`` gets the worker's credentials kept
    there; any other client's URL must carry a user allowed to serve). Agents are served
    through the ``polos_agent`` workflow, tools inside their agents' runs. The original's
    ``deployment_id``, ``mode``, ``worker_server_url`` and ``channels`` mean nothing here (a
    worker pulls from NATS) and are refused by name.
    """

    def __init__(
        self,
        served: Iterable[WorkflowDefinition[Any, Any]] | Any = None,
        /,
        *,
        workflows: Iterable[WorkflowDefinition[Any, Any]] | None = None,
        settings: Settings | None = None,
        nats_url: str | None = None,
        prefix: str | None = None,
        max_concurrent_runs: int = 200,
        worker_id: str | None = None,
        shutdown_timeout: float = 10.0,
        state_cache: int = 1_000,
        client: Any = None,
        deployment_id: str | None = None,
        agents: Iterable[Any] | None = None,
        tools: Iterable[Any] | None = None,
        max_concurrent_workflows: int | None = None,
        mode: str | None = None,
        worker_server_url: str | None = None,
        log_file: str | None = None,
        channels: list[Any] | None = None,
    ) -> None:
        if isinstance(getattr(served, "settings", None), Settings):
            # The original's positional form: Worker(client, ...).
            if client is not None:
                raise ValueError("Worker: the client is given twice")
            client, served = served, None
        if served is not None and workflows is not None:
            raise ValueError("Worker: give the workflows positionally or as workflows=, not both")
        workflows = served if served is not None else workflows
        for option, value, why in (
            ("deployment_id", deployment_id, "a namespace's workers serve what they define"),
            ("mode", mode, "workers here always pull their work from NATS"),
            ("worker_server_url", worker_server_url, "workers pull; they listen on no port"),
            ("channels", channels, "notification channels (Slack) are not available"),
        ):
            if value is not None:
                raise ValueError(f"Worker({option}=...) is not supported here: {why}")
        if client is not None:
            if settings is not None or nats_url is not None:
                raise ValueError("Worker: give client= or settings=/nats_url=, not both")
            settings = worker_settings_of(client)
        if max_concurrent_workflows is not None:
            max_concurrent_runs = max_concurrent_workflows
        if log_file is not None:
            log_to_file(log_file)
        served = list(workflows or [])
        for agent in agents or ():
            if not isinstance(agent, Agent):
                raise TypeError(f"Worker(agents=...): {agent!r} is not an Agent")
        for t in tools or ():
            if not isinstance(t, Tool):
                raise TypeError(f"Worker(tools=...): {t!r} is not a Tool (made with @tool)")
        if agents and agent_workflow not in served:
            served.append(agent_workflow)
        base = settings or Settings()
        if nats_url is not None:
            base = base.with_(nats_url=nats_url)
        if prefix is not None:
            base = base.with_(prefix=prefix)
        self.settings = base
        self.names = Names(base.prefix)
        self.workflows: dict[str, WorkflowDefinition[Any, Any]] = {}
        for wf in served:
            if not isinstance(wf, WorkflowDefinition):
                raise TypeError(f"Worker: {wf!r} is not a workflow (made with @workflow)")
            if wf.name in self.workflows and self.workflows[wf.name] is not wf:
                raise ValueError(f"two workflows are named {wf.name!r}")
            self.workflows[wf.name] = wf
        if not self.workflows:
            raise ValueError("a worker needs at least one workflow")
        self.id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.max_concurrent_runs = max_concurrent_runs
        self.shutdown_timeout = shutdown_timeout
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._loops: list[PullLoop] = []
        self._active: dict[str, _Active] = {}
        self._bg: list[asyncio.Task[None]] = []
        self._workers_kv: KeyValue | None = None
        self.completed_runs = 0
        self._stopped = asyncio.Event()
        # Set when the server refuses this worker's credentials on a reconnect: it cannot work.
        self.fatal = Fatal()
        # The folded state of runs this worker suspended, newest last (at most ``state_cache``):
        # when such a run comes back here, only the events after it are read. Only a cache: a
        # run may wake on any worker, and a missing entry means a full read.
        self._states: OrderedDict[str, ev.RunState] = OrderedDict()
        self._state_cache = state_cache
        self.history_reads = {"full": 0, "delta": 0, "none": 0, "snapshot": 0}
        # Claims sent while a long run's re-walk ran that found the run moved on (then claimed
        # again the usual way).
        self.claims_refused = 0
        # Reads of a run found behind its task's cause (a replica behind the leader), then
        # read again until they held it.
        self.stale_reads = 0
        # Replay snapshots (store/snapshots.py), written in the background; the reasons
        # snapshots found were not used (newest last, a few).
        self.snapshots: snapshots.Writer | None = None
        self.snapshots_ignored: list[str] = []
        # The limited queues these workflows declare: a run of one executes here only under an
        # admission of that queue, whatever the orchestrator knew when it dispatched it.
        self._queues = limits.declared_queues(self.workflows.values())
        self.sent_to_admission = 0

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._nc = await connect_service(
            self.settings, name=f"polos-worker-{self.id}", on_fatal=self.fatal
        )
        self._js = self._nc.jetstream(timeout=self.settings.request_timeout)
        if self.settings.snapshot_events > 0:
            self.snapshots = snapshots.Writer(
                self._nc, self._js, self.names, self.settings.snapshot_events
            )
        # Workers never create streams or buckets (the services do): say what is missing.
        await check_topology(self._js, self.names)
        await self._register_workflows()
        self._workers_kv = await self._js.key_value(self.names.workers_bucket)
        await self._announce()
        self._bg.append(asyncio.create_task(self._announce_loop(), name="worker-announce"))
        # A cancelled run is interrupted at its next await (core NATS: only live workers care).
        await self._nc.subscribe(self.names.cancel_signal_subject("*"), cb=self._on_cancel_signal)
        for wf in self.workflows.values():
            durable = self.names.worker_consumer(wf.name)
            await ensure_consumer(
                self._js,
                self.names.tasks_stream,
                durable,
                self.names.task_subject(wf.name),
                ack_wait=self.settings.task_ack_wait,
                max_ack_pending=100_000,
            )
            loop = PullLoop(
                self._nc,
                self.names.tasks_stream,
                durable,
                self._on_task,
                capacity=self.max_concurrent_runs,
                name=f"worker-{wf.name}",
            )
            loop.start()
            self._loops.append(loop)
        log.info("worker %s serving %s", self.id, ", ".join(self.workflows))

    async def stop(self, timeout: float | None = None) -> None:
        """Stop taking tasks, let running executions finish for ``timeout`` seconds, then hand
        the rest back (nak) so another worker resumes them at once."""
        timeout = self.shutdown_timeout if timeout is None else timeout
        for loop in self._loops:
            loop._stopping = True
        await asyncio.gather(*(loop.stop(drain_timeout=timeout) for loop in self._loops))
        await cancel_and_wait(self._bg)
        if self.snapshots is not None:
            await self.snapshots.close()
        if self._workers_kv is not None:
            with contextlib.suppress(Exception):
                await self._workers_kv.delete(self.id)
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await disconnect(self._nc)
        self._stopped.set()

    async def run_forever(self) -> None:
        """Wait until the worker is stopped; raise ``ConnectionFailedError`` (after stopping
        it) if the server refuses its credentials on a reconnect."""
        stopped = asyncio.ensure_future(self._stopped.wait())
        failed = asyncio.ensure_future(self.fatal.wait())
        try:
            await asyncio.wait([stopped, failed], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            failed.cancel()
        if self.fatal.error is not None:
            await self.stop(timeout=0)
            raise self.fatal.error

    async def run(self) -> None:
        """The original's ``run()``: start, serve until SIGINT or SIGTERM, stop."""
        await run_until_signal(self)

    async def shutdown(self) -> None:
        """The original's name for ``stop()`` (running executions are handed back, not
        cancelled)."""
        await self.stop()

    async def __aenter__(self) -> Worker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def active_runs(self) -> list[str]:
        return list(self._active)

    # ------------------------------------------------------------------ registration

    async def _register_workflows(self) -> None:
        assert self._js is not None
        # Queues first: an orchestrator that finds a workflow naming its queue finds the
        # queue's limits too.
        await register_queues(
            self._nc, self._js, self.names, self.settings, self.workflows.values()
        )
        kv = await self._js.key_value(self.names.workflows_bucket)
        for wf in self.workflows.values():
            doc = {
                "name": wf.name,
                "queue": wf.queue,
                "input_schema": json_schema(wf.input_type),
                "output_schema": json_schema(wf.output_type),
                "trigger_on_event": wf.trigger_on_event,
                "schedule": wf.schedule,
                "timezone": wf.timezone,
                "schedulable": wf.schedulable,
                "schedule_key": wf.schedule_key,
                "batch_size": wf.batch_size,
                "batch_timeout_seconds": wf.batch_timeout_seconds,
                "description": wf.description,
                "doc": (wf.fn.__doc__ or "").strip() or None,
            }
            await kv.put(wf.name, orjson.dumps(doc))

    async def _announce(self) -> None:
        assert self._workers_kv is not None
        doc = {
            "id": self.id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "workflows": sorted(self.workflows),
            # What `polos agent list` / `polos tool list` show (the process's agents, tools).
            "agents": catalog.agents(),
            "tools": catalog.tools(),
            "active_runs": len(self._active),
            "completed_runs": self.completed_runs,
            "at": time.time(),
        }
        await self._workers_kv.put(self.id, orjson.dumps(doc))

    async def _announce_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.worker_ttl / 3)
            with contextlib.suppress(Exception):
                await self._announce()

    # ------------------------------------------------------------------ tasks

    async def _heartbeat(self, active: _Active) -> None:
        # Keeps JetStream from redelivering the task while the run executes here.
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval)
            with contextlib.suppress(Exception):
                await active.msg.in_progress()

    async def _on_task(self, msg: Msg) -> None:
        assert self._js is not None
        try:
            task = decode_task(msg.data)
        except TaskDecodeError as exc:
            await dead_letter(
                self._js,
                self.names,
                source="task",
                reason=str(exc),
                subject=msg.subject,
                data=msg.data,
            )
            await msg.term()
            return
        run_id, workflow = task.run_id, task.workflow
        if run_id in self._active:
            # JetStream redelivered a task we still execute (a missed heartbeat): adopt the new
            # delivery so our heartbeats and final ack apply to it.
            self._active[run_id].msg = msg
            return
        wf = self.workflows.get(workflow)
        if wf is None:
            await msg.nak(delay=1)
            return
        active = _Active(run_id=run_id, msg=msg, task=asyncio.current_task())
        self._active[run_id] = active
        hb = asyncio.create_task(self._heartbeat(active))
        try:
            outcome = await self._execute(wf, run_id, task)
        except asyncio.CancelledError:
            if active.cancelled and active.task is not None:
                # The run was cancelled (RunCancelled is in its history): nothing left to do.
                active.task.uncancel()
                with contextlib.suppress(Exception):
                    await active.msg.ack()
                return
            # Shutting down mid-run: hand the task back so another worker resumes right away.
            with contextlib.suppress(Exception):
                await active.msg.nak()
            raise
        except StaleRead as exc:
            # Never taken for the run's state; not looped on either: a task whose run's history
            # stays behind its cause (purged meanwhile) is kept aside after enough deliveries.
            if msg.metadata.num_delivered < STALE_TASK_DELIVERIES:
                log.info("run %s: %s; the task will be redelivered", run_id, exc)
                with contextlib.suppress(Exception):
                    await active.msg.nak(delay=0.5)
                return
            log.warning("run %s: task dead-lettered: %s", run_id, exc)
            with contextlib.suppress(Exception):
                await dead_letter(
                    self._js,
                    self.names,
                    source="task",
                    reason=f"its run's history never reached the task's cause: {exc}",
                    subject=msg.subject,
                    data=msg.data,
                )
                await active.msg.term()
            return
        except Exception:
            log.exception("run %s: execution crashed; the task will be redelivered", run_id)
            with contextlib.suppress(Exception):
                await active.msg.nak(delay=1)
            return
        finally:
            hb.cancel()
            self._active.pop(run_id, None)
        if outcome == "retry":
            await active.msg.nak(delay=0.5)
        elif outcome == "fenced":
            # Another worker may hold a newer delivery of this task: an ack of ours would remove
            # the task under it (and if it then died, the run would be stuck). Leave it; if no
            # one holds it, it comes back after ack_wait and is acked by whoever finds it done.
            pass
        else:
            await active.msg.ack()

    async def _claim(
        self, wf: WorkflowDefinition[Any, Any], run_id: str, task: Task, *, overlap: bool = True
    ) -> RunExecution | None:
        assert self._nc is not None and self._js is not None
        fresh = task.carried_state()
        held = self._states.pop(run_id, None)
        snap: snapshots.Loaded | None = None
        for _ in range(5):
            if fresh is not None:
                # The task carries the history (a new run, or a woken one): no read.
                state, fresh = fresh, None
                self.history_reads["none"] += 1
            elif held is not None:
                # This worker suspended the run: read only what came after (the wake).
                state, held = held, None
                try:
                    for seq, event in await read_history(
                        self._nc, self.names, run_id, start_seq=state.last_seq + 1
                    ):
                        state.apply(seq, event)
                except ev.SequenceError:
                    state, snap = await self._load(run_id)
                else:
                    self.history_reads["delta"] += 1
            else:
                state, snap = await self._load(run_id)
            if task.cause is not None and state.last_seq < task.cause:
                # The task was put out once the event at its cause was stored: a read without
                # it came from a replica behind the leader, and would take a woken run for a
                # suspended one (or a new run for none) and drop its task.
                state, snap = await self._load_through(run_id, task.cause)
            if state.requested is None:
                log.warning("task for run %s which has no history; dropped", run_id)
                return None
            if state.done or state.status == "suspended":
                return None  # a stale or duplicate task: nothing to do
            queue = limits.admission_needed(self._queues, wf, task, state.requested)
            if queue is not None:
                # Dispatched by an orchestrator that did not know the workflow's queue (yet):
                # not run here, sent back to wait for a slot of its queue.
                try:
                    await limits.send_to_admission(
                        self._js, self.names, state, queue, limits.NOT_ADMITTED
                    )
                except FencedOut:
                    continue
                if task.slots:
                    # Taken for an admission under another queue: not this run's any more.
                    slots = limits.store_for(self._nc, self._js, self.names)
                    await slots.release_keys(task.slots, run_id)
                self.sent_to_admission += 1
                log.info(
                    "run %s: its task was not admitted under queue %r; sent to admission",
                    run_id,
                    queue,
                )
                return None
            exe = RunExecution(
                js=self._js,
                nc=self._nc,
                names=self.names,
                settings=self.settings,
                workflow=wf,
                state=state,
                worker_id=self.id,
            )
            if snap is not None:
                exe.snapshot_covered = snap.state_events
                exe.snapshot_known = True
            if self.snapshots is not None:
                exe.on_record = self._snapshot_due
            attempt = state.attempt + 1
            claim = ev.RunClaimed(run_id=run_id, worker_id=self.id, attempt=attempt)
            msg_id = f"{run_id}/c/{attempt}/{self.id}"
            if snap is not None and overlap:
                # A long run from its snapshot: the re-walk of its recorded steps starts while
                # the claim travels (nothing is written and no user code runs before it lands;
                # a refused claim is claimed again by ``_execute``). On the wire first: the
                # re-walk holds the loop.
                exe.begin_claim(claim, msg_id)
                await sent(self._nc)
                return exe
            try:
                await exe.record(claim, msg_id=msg_id)
                return exe
            except FencedOut:
                continue  # someone appended between our read and our claim: read again
        raise RuntimeError(f"run {run_id}: could not claim after 5 tries")

    async def _load_through(
        self, run_id: str, seq: int
    ) -> tuple[ev.RunState, snapshots.Loaded | None]:
        """``_load`` from a read that holds the run's event at ``seq``; ``StaleRead`` when none
        did in time (the task is handed back for a later delivery)."""
        (state, snap), reached = await reread_until(
            lambda: self._load(run_id), lambda got: got[0].last_seq >= seq
        )
        if not reached:
            raise StaleRead(f"run {run_id}'s history", seq, state.last_seq)
        self.stale_reads += 1
        return state, snap

    async def _load(self, run_id: str) -> tuple[ev.RunState, snapshots.Loaded | None]:
        """The run's state: from its replay snapshot and the events after it, or (no snapshot,
        or one that does not check out) folded from its whole history."""
        assert self._nc is not None and self._js is not None
        if self.snapshots is not None:
            loaded, why = await snapshots.load(self._nc, self._js, self.names, run_id)
            if loaded is not None:
                self.history_reads["snapshot"] += 1
                return loaded.state, loaded
            if why != "none":
                log.warning("run %s: replay snapshot not used (%s); reading the log", run_id, why)
                self.snapshots_ignored = [*self.snapshots_ignored[-9:], why]
        self.history_reads["full"] += 1
        return await load_state(self._nc, self.names, run_id), None

    def _snapshot_due(self, exe: RunExecution) -> None:
        # After each append of an execution: a snapshot in the background when the run has
        # grown by ``snapshot_events`` since the last one.
        assert self.snapshots is not None
        state = exe.state
        if not state.done and self.snapshots.due(state.events, exe.snapshot_covered):
            self._snapshot(exe)

    def _snapshot(self, exe: RunExecution) -> None:
        assert self.snapshots is not None and exe.last_event is not None
        self.snapshots.submit(snapshots.capture(exe.state, exe.last_event))
        exe.snapshot_covered = exe.state.events
        exe.snapshot_known = True

    async def _execute(
        self, wf: WorkflowDefinition[Any, Any], run_id: str, task: Task, *, overlap: bool = True
    ) -> str:
        exe = await self._claim(wf, run_id, task, overlap=overlap)
        if exe is None:
            return "done"
        # A run of a limited queue carries its slot leases: kept alive while it executes.
        assert self._nc is not None and self._js is not None
        outcome = await run_holding_slots(
            self._nc, self._js, self.names, task, lambda: self._run(wf, exe)
        )
        if outcome == "fenced" and exe.claim_refused:
            # The claim sent during the re-walk found the run moved on: nothing was written or
            # run. Claimed again as any other, from what the log holds now.
            self.claims_refused += 1
            return await self._execute(wf, run_id, task, overlap=False)
        return outcome

    async def _run(self, wf: WorkflowDefinition[Any, Any], exe: RunExecution) -> str:
        assert self._js is not None
        run_id = exe.run_id
        requested = exe.state.requested
        assert requested is not None
        ctx = WorkflowContext(exe)
        try:
            try:
                value = from_json(requested.input, wf.input_type) if wf.takes_input else None
            except pydantic.ValidationError as exc:
                err = InputValidationError(wf.name, validation_errors(exc))
                await exe.claimed()  # a dead letter only from the execution that owns the run
                await dead_letter(
                    self._js,
                    self.names,
                    source="input",
                    reason=str(err),
                    subject=self.names.start_subject(wf.name),
                    data=orjson.dumps({"run_id": run_id, "input": requested.input}),
                    details=err.errors,
                )
                await self._fail(exe, err, details=err.errors)
                return "done"
            try:
                result = await run_workflow(exe, wf, ctx, value)
                exe.check_all_replayed()
                output = to_json(result, what=f"the output of workflow {wf.name!r}")
            except Suspend as sus:
                await exe.wait_idle()  # sibling steps in flight record first (asyncio.gather)
                events = exe.state.events + 1  # with the RunSuspended
                # A long run waits here: its wake replays from this point, and the event says
                # so to whoever resumes it.
                long = (
                    self.snapshots is not None
                    and events >= self.snapshots.every
                    and exe.snapshot_covered != events
                )
                event = dataclasses.replace(sus.event, snapshot=True) if long else sus.event
                await exe.record(event, msg_id=sus.msg_id)
                if long:
                    self._snapshot(exe)
                self._hold_state(exe.state)
                return "done"
            except (NonDeterminismError, SerializationError) as exc:
                await self._fail(exe, exc)
                return "done"
            except (FencedOut, AppendUnavailable):
                raise
            except Exception as exc:
                await self._fail(exe, exc)
                return "done"
            await exe.record(ev.RunCompleted(run_id=run_id, output=output), msg_id=f"{run_id}/end")
            self.completed_runs += 1
            self._ended(exe)
            return "done"
        except FencedOut:
            # Another worker (or a cancel) owns the run now; stop without writing anything.
            log.info("run %s: fenced out, another writer owns it", run_id)
            return "fenced"
        except (nats.errors.ConnectionClosedError, nats.errors.TimeoutError, TimeoutError):
            return "retry"

    def _hold_state(self, state: ev.RunState) -> None:
        if self._state_cache <= 0:
            return
        self._states[state.run_id] = state
        self._states.move_to_end(state.run_id)
        while len(self._states) > self._state_cache:
            self._states.popitem(last=False)

    async def _on_cancel_signal(self, msg: Msg) -> None:
        active = self._active.get(msg.subject.rsplit(".", 1)[-1])
        if active is not None and active.task is not None and not active.cancelled:
            log.info("run %s cancelled: interrupting it", active.run_id)
            active.cancelled = True
            active.task.cancel()

    async def _fail(self, exe: RunExecution, exc: BaseException, details: Any = None) -> None:
        info = error_info(exc, retryable=False)
        if details is not None:
            info["details"] = details
        await exe.record(ev.RunFailed(run_id=exe.run_id, error=info), msg_id=f"{exe.run_id}/end")
        self._ended(exe)

    def _ended(self, exe: RunExecution) -> None:
        if self.snapshots is not None and exe.snapshot_known:
            self.snapshots.forget(exe.run_id)


def worker_settings_of(client: Any) -> Settings:
    """Where a worker made from ``client`` connects: a ``Polos``'s worker settings; for a
    client of the data dir's ``polos up``, the worker credentials kept there; else the
    client's own settings."""
    given = getattr(client, "worker_settings", None)
    if isinstance(given, Settings):
        return given
    settings: Settings = client.settings
    ddir = data_dir_from(None)
    if settings.nats_url == local_url("client", settings.prefix, ddir):
        worker = local_url("worker", settings.prefix, ddir)
        if worker is not None:
            return settings.with_(nats_url=worker)
    return settings


async def serve_module(
    module: str,
    settings: Settings,
    *,
    max_concurrent_runs: int = 200,
    worker_id: str | None = None,
    dev_llm: bool = False,
) -> None:
    """Serve every workflow of ``module`` (a module name or a ``.py`` path) until SIGTERM or
    SIGINT: ``polos worker MODULE`` and ``python -m polos_services.worker MODULE``. Raises
    ``ConnectionFailedError`` when the server refuses the credentials. ``dev_llm``: agents
    talk to the Polos dev LLM started in this process (``polos.devllm``)."""
    tune_gc(settings)  # this process is the worker's (an embedded Worker leaves it alone)
    devllm = await serve_this_process() if dev_llm else None
    worker = Worker(
        load_workflows(module),
        settings=settings,
        max_concurrent_runs=max_concurrent_runs,
        worker_id=worker_id,
    )
    try:
        await run_until_signal(
            worker,
            on_started=lambda: print(
                f"worker {worker.id} serving: {', '.join(worker.workflows)}", flush=True
            ),
        )
    finally:
        if devllm is not None:
            await devllm.stop()


__all__ = ["Worker", "serve_module", "worker_settings_of"]
