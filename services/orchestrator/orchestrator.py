"""The orchestrator: turns commands into runs, dispatches tasks, keeps the run index.

It consumes two durable consumers shared by every orchestrator instance (so any number can
run): the command stream (``<prefix>.cmd.>``) and the control events of every run
(``<prefix>.run.*.ctl``). It never executes user code. Everything it writes is either an
append fenced on the run's history or a projection (the run index) rebuildable from the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

import nats.js.errors
import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from polos import history as ev
from polos._private.store import (
    EXPECTED_LAST_SUBJECT_SEQ,
    MSG_ID,
    REPLY_HEADER,
    WRONG_LAST_SEQUENCE,
    AppendUnavailable,
    Fatal,
    FencedOut,
    Names,
    PullLoop,
    append,
    connect_service,
    dead_letter,
    disconnect,
    ensure_consumer,
    ensure_topology,
    is_transient,
    load_state,
    payloads,
    publish,
    valid_token,
)
from polos._private.store.task import encode_task, publish_task, task_msg_id
from polos.config import Settings

from .admission import Admission

log = logging.getLogger("polos.orchestrator")

_RUN_NS = uuid.UUID("6f1d0b52-4b8e-4a4e-9a55-0c1f5b3f7d10")
_START_FIELDS = {"input", "input_ref", "run_id", "queue", "concurrency_key"}


class CommandError(ValueError):
    """A command we cannot act on; the reason goes to the sender and the dead-letter stream."""

    def __init__(self, reason: str, field: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.field = field


class RunNotYetKnown(CommandError):
    """A command names a run that does not exist (yet).

    Commands are handled concurrently, so a resume or cancel sent right after its start can be
    handled before the start. While commands older than this one are still unacknowledged the
    command is retried shortly; once they are all done and the run still does not exist, the
    answer is final.
    """


# How many task ids the orchestrator remembers having dispatched (see Orchestrator.dispatched).
_DISPATCHED_KEPT = 10_000

# How often a command is redelivered while JetStream is unavailable (about 10 minutes).
_UNAVAILABLE_RETRIES = 125

# How often a command for an unknown run is retried while older commands are in flight.
_NOT_YET_RETRIES = 40


def derive_run_id(prefix: str, key: str) -> str:
    """A run id that is the same every time the same command is processed."""
    return uuid.uuid5(_RUN_NS, f"{prefix}/{key}").hex


class Orchestrator:
    """One orchestrator instance. Start as many as you like against one namespace."""

    def __init__(self, settings: Settings | None = None, *, index_cache: int = 50_000) -> None:
        self.settings = settings or Settings()
        self.names = Names(self.settings.prefix)
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._index: KeyValue | None = None
        self._loops: list[PullLoop] = []
        # run_id -> (entry, kv revision): saves a read before every index update.
        self._cache: OrderedDict[str, tuple[dict[str, Any], int]] = OrderedDict()
        self._cache_size = index_cache
        self.commands_handled = 0
        self.dead_lettered = 0
        self.admission: Admission | None = None
        # The waiters bucket's handle (waiting.py), opened on first use.
        self.waits_kv: KeyValue | None = None
        # Tasks this process has put out, by message id: the control hook's repeat of a wake's
        # dispatch (for a waker that died before dispatching) is not needed for these.
        self._dispatched: OrderedDict[str, None] = OrderedDict()
        self._index_locks: dict[str, _RunLock] = {}
        self.index_conflicts = 0
        # Set when the server refuses the service credentials on a reconnect.
        self.fatal = Fatal()

    @property
    def js(self) -> JetStreamContext:
        assert self._js is not None, "orchestrator not started"
        return self._js

    @property
    def nc(self) -> NATS:
        assert self._nc is not None, "orchestrator not started"
        return self._nc

    async def start(self) -> None:
        self._nc = await connect_service(
            self.settings, name="polos-orchestrator", on_fatal=self.fatal
        )
        self._js = self._nc.jetstream(timeout=self.settings.request_timeout)
        # The whole topology of the namespace, every feature's: only services create it.
        await ensure_topology(self._js, self.names, self.settings)
        self._index = await self._js.key_value(self.names.runs_bucket)
        await ensure_consumer(
            self._js, self.names.cmd_stream, "orchestrator_cmd", self.names.cmd_filter,
            ack_wait=self.settings.service_ack_wait,
        )
        await ensure_consumer(
            self._js, self.names.runs_stream, "orchestrator_ctl", self.names.ctl_filter,
            ack_wait=self.settings.service_ack_wait,
        )
        # Queues with limits: before the loops start, so no run is dispatched around them.
        self.admission = await Admission.attach(self)
        # Features with their own consumers (waiting: events) start here; each returns
        # something with ``stop()``.
        self._attached = [await hook(self) for hook in self.start_hooks]
        for stream, durable, handler in (
            (self.names.cmd_stream, "orchestrator_cmd", self._on_command),
            (self.names.runs_stream, "orchestrator_ctl", self._on_control),
        ):
            loop = PullLoop(self._nc, stream, durable, handler, capacity=256, name=durable)
            loop.start()
            self._loops.append(loop)
        log.info("orchestrator started on namespace %r", self.settings.prefix)

    async def stop(self) -> None:
        await asyncio.gather(*(loop.stop(drain_timeout=2.0) for loop in self._loops))
        if self.admission is not None:
            await self.admission.stop()
        for attached in getattr(self, "_attached", []):
            await attached.stop()
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await disconnect(self._nc)

    async def __aenter__(self) -> Orchestrator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ commands

    async def _reply(self, msg: Msg, body: dict[str, Any]) -> None:
        reply = (msg.headers or {}).get(REPLY_HEADER)
        if reply:
            with contextlib.suppress(Exception):
                await self.nc.publish(reply, orjson.dumps(body))

    async def _reject(self, msg: Msg, err: CommandError) -> None:
        self.dead_lettered += 1
        log.warning("rejected command on %s: %s", msg.subject, err.reason)
        await dead_letter(
            self.js,
            self.names,
            source="cmd",
            reason=err.reason,
            subject=msg.subject,
            data=msg.data,
            headers=dict(msg.headers or {}),
            details={"field": err.field} if err.field else None,
        )
        await self._reply(msg, {"ok": False, "error": err.reason, "field": err.field})

    async def _on_command(self, msg: Msg) -> None:
        tokens = msg.subject.split(".")
        verb = tokens[2] if len(tokens) > 2 else ""
        try:
            if verb == "start" and len(tokens) == 4:
                body = await self._start(msg, tokens[3])
            else:
                handler = self.command_handlers.get(verb)
                if handler is None:
                    raise CommandError(
                        f"unknown command subject {msg.subject!r}; expected "
                        f"{self.names.prefix}.cmd.start.<workflow> or another documented command"
                    )
                body = await handler(self, msg, tokens[3:])
        except RunNotYetKnown as err:
            if msg.metadata.num_delivered < _NOT_YET_RETRIES and await self._older_commands_pending(msg):
                await msg.nak(delay=0.05)
                return
            await self._reject(msg, err)
            await msg.ack()
            return
        except CommandError as err:
            await self._reject(msg, err)
            await msg.ack()
            return
        except Exception as exc:
            # An infrastructure failure: leave the command for redelivery, unless it keeps
            # failing, in which case keep it aside rather than loop forever. JetStream being
            # unavailable (an election, a restart) is waited out for longer: giving up then
            # would leave a run that exists without its task.
            delivered = msg.metadata.num_delivered if msg.reply else 1
            unavailable = is_transient(exc) or isinstance(exc, AppendUnavailable)
            if delivered >= (_UNAVAILABLE_RETRIES if unavailable else 5):
                await self._reject(msg, CommandError(f"processing failed {delivered} times: {exc!r}"))
                await msg.ack()
            else:
                log.exception("command on %s failed; will retry", msg.subject)
                await msg.nak(delay=min(0.5 * delivered, 5.0))
            return
        self.commands_handled += 1
        await msg.ack()
        await self._reply(msg, body)

    async def _older_commands_pending(self, msg: Msg) -> bool:
        """True while a command stored before ``msg`` is not yet acknowledged (maybe a start)."""
        try:
            info = await self.js.consumer_info(self.names.cmd_stream, "orchestrator_cmd")
        except Exception:
            return True
        return int(info.ack_floor.stream_seq) < msg.metadata.sequence.stream - 1

    @staticmethod
    def parse_object(msg: Msg) -> dict[str, Any]:
        try:
            body = orjson.loads(msg.data) if msg.data else {}
        except orjson.JSONDecodeError as exc:
            raise CommandError(f"malformed JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise CommandError(f"the payload must be a JSON object, got {type(body).__name__}")
        return body

    async def _start(self, msg: Msg, workflow: str) -> dict[str, Any]:
        if not valid_token(workflow):
            raise CommandError(f"workflow name {workflow!r} is not valid", field="workflow")
        body = self.parse_object(msg)
        unknown = sorted(set(body) - _START_FIELDS)
        if unknown:
            raise CommandError(
                f"unknown field(s) {', '.join(unknown)}; a start command takes "
                f"{', '.join(sorted(_START_FIELDS))}",
                field=unknown[0],
            )
        run_id = body.get("run_id")
        if run_id is None:
            hdrs = msg.headers or {}
            key = hdrs.get(MSG_ID) or f"seq/{msg.metadata.sequence.stream}"
            run_id = derive_run_id(self.names.prefix, key)
        elif not isinstance(run_id, str) or not valid_token(run_id):
            raise CommandError(
                "run_id must be 1-128 letters, digits, '_' or '-'", field="run_id"
            )
        for name in ("queue", "concurrency_key"):
            if body.get(name) is not None and not isinstance(body[name], str):
                raise CommandError(f"{name} must be a string", field=name)
        event = ev.RunRequested(
            run_id=run_id,
            workflow=workflow,
            input=await self._input(body, run_id),
            queue=body.get("queue"),
            concurrency_key=body.get("concurrency_key"),
            source="client" if (msg.headers or {}).get("Polos-Client") else "raw",
        )
        return await self.request_run(event)

    async def _input(self, body: dict[str, Any], run_id: str) -> Any:
        """The start's input; an input too big for a message arrives as an Object Store ref."""
        ref = body.get("input_ref")
        if ref is None:
            return body.get("input")
        if not isinstance(ref, str) or not ref.startswith(f"{run_id}/") or "input" in body:
            raise CommandError(
                "input_ref must name the run's payload object (<run_id>/<sha256>), without input",
                field="input_ref",
            )
        try:
            return await payloads.get_value(self.js, self.names, ref)
        except payloads.PayloadMissingError as exc:
            raise CommandError(str(exc), field="input_ref") from exc

    async def request_run(
        self, event: ev.RunRequested, *, hold: Callable[[], Awaitable[bool]] | None = None
    ) -> dict[str, Any]:
        """Create the run (at most once per run id) and dispatch its first task.

        ``hold``: asked once the run is durable, before its task is put out; True keeps the
        task back (the caller ends the run instead), and the answer says ``held``.
        """
        run_id = event.run_id
        try:
            seq = await append(
                self.js, self.names, run_id, event, expected_last_seq=0, msg_id=f"{run_id}/req"
            )
        except FencedOut:
            # The run exists: this is a repeated start. Re-dispatch only if it never ran, in
            # case an earlier instance died between creating it and dispatching it.
            state = await load_state(self.nc, self.names, run_id)
            answer = {"ok": True, "run_id": run_id, "existing": True, "status": state.status}
            if state.requested and state.status == "queued" and state.attempt == 0:
                if hold is not None and await hold():
                    return {**answer, "held": True}
                await self.dispatch(
                    run_id, state.requested.workflow, state.last_seq, requested=state.requested
                )
            return answer
        if hold is not None and await hold():
            return {"ok": True, "run_id": run_id, "existing": False, "status": "queued",
                    "held": True}
        await self.dispatch(run_id, event.workflow, seq, requested=event, fresh=True)
        return {"ok": True, "run_id": run_id, "existing": False, "status": "queued"}

    async def dispatch(
        self,
        run_id: str,
        workflow: str,
        cause_seq: int,
        *,
        requested: ev.RunRequested | None = None,
        fresh: bool = False,
        history: list[tuple[int, bytes]] | None = None,
    ) -> None:
        """Put the run's task on its workflow's task subject. Idempotent per cause.

        A run whose queue has a limit goes through admission instead: it gets a slot (or waits
        for one, holding no worker) before its task exists.

        ``fresh``: ``cause_seq`` is the sequence of ``requested``, just appended, so the run's
        whole history is that one event. The task then carries it, and the worker claims the
        run fenced on that sequence without reading the history (a fence that fails means the
        run moved on, and the worker reads it as usual).

        ``history``: the run's whole history as stored, ending at ``cause_seq`` (a waker that
        read the run and appended its wake). The task carries it, up to ``INLINE_HISTORY``
        bytes, and the worker claims fenced on ``cause_seq`` without reading, as for a new run
        (``store.task``).
        """
        if self.admission is not None and await self.admission.route(
            run_id, workflow, cause_seq, requested
        ):
            self._note_dispatched(run_id, cause_seq)
            return
        if fresh and requested is not None:
            history = [(cause_seq, ev.encode(requested))]
        carried = history if history and history[-1][0] == cause_seq else None
        await publish_task(
            self.nc, self.names, run_id, workflow, cause_seq, encode_task(run_id, workflow, history=carried),
            timeout=self.settings.request_timeout,
        )
        self._note_dispatched(run_id, cause_seq)

    def _note_dispatched(self, run_id: str, cause_seq: int) -> None:
        self._dispatched[task_msg_id(run_id, cause_seq)] = None
        if len(self._dispatched) > _DISPATCHED_KEPT:
            self._dispatched.popitem(last=False)

    def dispatched(self, run_id: str, cause_seq: int) -> bool:
        """Whether this process has put out (or admitted) the run's task for that cause."""
        return task_msg_id(run_id, cause_seq) in self._dispatched

    # Other issues register their verbs here: resume, cancel, ...
    command_handlers: ClassVar[dict[str, Any]] = {}

    # ------------------------------------------------------------------ control events

    async def _on_control(self, msg: Msg) -> None:
        try:
            event = ev.decode(msg.data)
        except ev.EventDecodeError as exc:
            await dead_letter(
                self.js, self.names, source="ctl", reason=str(exc), subject=msg.subject,
                data=msg.data,
            )
            await msg.ack()
            return
        seq = msg.metadata.sequence.stream
        run_id = msg.subject.split(".")[2]
        try:
            await self.update_index(run_id, seq, event)
            for hook in self.control_hooks:
                await hook(self, run_id, seq, event)
        except Exception:
            log.exception("control event %s of run %s failed; will retry", type(event).__name__, run_id)
            await msg.nak(delay=0.5)
            return
        await msg.ack()

    # Other issues register reactions to control events here (wake parents, release slots, ...)
    control_hooks: ClassVar[list[Any]] = []

    # async fn(orch) -> object with ``async stop()``: run at start, after admission.
    start_hooks: ClassVar[list[Any]] = []

    # ------------------------------------------------------------------ run index

    async def update_index(self, run_id: str, seq: int, event: ev.Event) -> None:
        """Fold one control event into the run's index entry, by compare-and-set.

        Instances may see a run's events out of order; the entry remembers the last sequence it
        folded and ignores anything older.
        """
        # One write at a time per run in this process: control events are handled concurrently,
        # and two of one run (a wake and the claim that follows it) would otherwise race, one
        # failing its compare-and-set and paying a read and a second write.
        held = self._index_locks.get(run_id)
        if held is None:
            held = self._index_locks[run_id] = _RunLock()
        held.users += 1  # waiting or holding: the last one out removes the lock
        try:
            async with held.lock:
                await self._update_index(run_id, seq, event)
        finally:
            held.users -= 1
            if not held.users:
                del self._index_locks[run_id]

    async def _update_index(self, run_id: str, seq: int, event: ev.Event) -> None:
        assert self._index is not None
        for attempt in range(10):
            cached = self._cache.get(run_id)
            current: dict[str, Any] | None
            revision: int | None
            if cached is None and attempt == 0 and isinstance(event, ev.RunRequested):
                # A new run has no entry yet: create it without reading first (one round trip
                # less per run). If it exists after all, the create fails and we read.
                current, revision = None, None
            elif cached is None:
                try:
                    entry = await self._index.get(run_id)
                    current = orjson.loads(entry.value or b"{}")
                    revision = entry.revision
                except nats.js.errors.KeyNotFoundError as exc:
                    # A deleted entry (its run was purged) is written over its delete marker.
                    marker = getattr(exc, "entry", None)
                    current, revision = None, getattr(marker, "revision", None)
            else:
                current, revision = dict(cached[0]), cached[1]
            stale = current is not None and current.get("seq", 0) >= seq
            if stale and not (isinstance(event, ev.RunRequested) and "workflow" not in (current or {})):
                return
            new = _fold_index(current or {"run_id": run_id}, seq, event, stale=stale)
            try:
                # What ``kv.create`` / ``kv.update`` send (a put fenced on the key's last
                # revision, 0 for none), through the cheaper publish of the append path: three
                # index writes per run make this the orchestrator's most frequent request.
                ack = await publish(
                    self.nc,
                    f"$KV.{self.names.runs_bucket}.{run_id}",
                    orjson.dumps(new),
                    headers={EXPECTED_LAST_SUBJECT_SEQ: str(revision or 0)},
                    timeout=self.settings.request_timeout,
                )
                rev = ack.seq
            except nats.js.errors.APIError as exc:
                if exc.err_code != WRONG_LAST_SEQUENCE:
                    raise
                self.index_conflicts += 1  # another instance wrote it: read and fold again
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


def _fold_index(
    entry: dict[str, Any], seq: int, event: ev.Event, *, stale: bool = False
) -> dict[str, Any]:
    e = dict(entry)
    if stale:
        # A newer event was folded first (instances race): keep its status, add the run's
        # identity from the request.
        assert isinstance(event, ev.RunRequested)
        e.update(workflow=event.workflow, created_at=event.at, queue=event.queue,
                 concurrency_key=event.concurrency_key, parent_run_id=event.parent_run_id,
                 source=event.source)
        return e
    e["seq"] = seq
    e["updated_at"] = event.at
    if isinstance(event, ev.RunRequested):
        e.update(
            workflow=event.workflow,
            status="queued",
            created_at=event.at,
            queue=event.queue,
            concurrency_key=event.concurrency_key,
            parent_run_id=event.parent_run_id,
            source=event.source,
        )
    elif isinstance(event, ev.RunClaimed):
        e.update(status="running", worker_id=event.worker_id, attempt=event.attempt)
        e.setdefault("started_at", event.at)
    elif isinstance(event, ev.RunSuspended):
        e.update(
            status="suspended",
            waiting={"step": event.step, "kind": event.kind, "data": event.data,
                     "topic": event.topic, "wake_at": event.wake_at,
                     "timeout_at": event.timeout_at},
        )
    elif isinstance(event, ev.RunWoken):
        e.update(status="queued", waiting=None)
        if isinstance(event, ev.RunAdmitted):
            # The queue whose slots the run holds: the one its release must give back to.
            e.update(admitted_queue=event.queue)
    elif isinstance(event, ev.RunCompleted):
        e.update(status="completed", ended_at=event.at, waiting=None)
    elif isinstance(event, ev.RunFailed):
        e.update(status="failed", ended_at=event.at, error=event.error, waiting=None)
    elif isinstance(event, ev.RunCancelled):
        e.update(status="cancelled", ended_at=event.at, waiting=None)
    return e

