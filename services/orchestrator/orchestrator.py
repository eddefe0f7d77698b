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
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from polos import history as ev
from polos._private.store import (
    MSG_ID,
    REPLY_HEADER,
    AppendUnavailable,
    Fatal,
    FencedOut,
    Names,
    PullLoop,
    StaleRead,
    append,
    connect_service,
    dead_letter,
    disconnect,
    ensure_consumer,
    ensure_topology,
    is_transient,
    load_state_through,
    payloads,
    stream_seq,
    valid_token,
)
from polos._private.store.commands import START_FIELDS
from polos._private.store.task import encode_task, publish_task, task_msg_id
from polos.config import Settings

from .admission import Admission
from .commands import CommandError, RunNotYetKnown, derive_run_id, parse_object
from .index import RunIndex
from .waiting import Waiting

log = logging.getLogger("polos.orchestrator")


# How many task ids the orchestrator remembers having dispatched (see Orchestrator.dispatched).
_DISPATCHED_KEPT = 10_000

# How often a command is redelivered while JetStream is unavailable (about 10 minutes).
_UNAVAILABLE_RETRIES = 125

# How often a command for an unknown run is retried while older commands are in flight.
_NOT_YET_RETRIES = 40

# How often a command for an unknown run is retried anyway: on a cluster, the replica that
# answered its read may not hold a run created a moment ago (0.05 s apart).
_NOT_YET_REREADS = 3

# How often a control event is redelivered while the replicas answering its hook's reads stay
# behind it (0.5 s apart, about 10 s); then it is dead-lettered, not retried for ever.
_STALE_REDELIVERIES = 20


CommandHandler = Callable[[Msg, list[str]], Awaitable[dict[str, Any]]]


class Feature(Protocol):
    """What the orchestrator asks of a feature it is wired with (admission, waiting)."""

    def commands(self) -> dict[str, CommandHandler]:
        """The command verbs it answers (``<p>.cmd.<verb>.…``), other than ``start``."""
        ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def on_control(self, run_id: str, seq: int, event: ev.Event) -> None:
        """A control event of a run, after the run index has folded it."""
        ...


class Orchestrator:
    """One orchestrator instance. Start as many as you like against one namespace."""

    def __init__(self, settings: Settings | None = None, *, index_cache: int = 50_000) -> None:
        self.settings = settings or Settings()
        self.names = Names(self.settings.prefix)
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._loops: list[PullLoop] = []
        self.index = RunIndex(
            self.names,
            cache_size=index_cache,
            timeout=self.settings.request_timeout,
            window=self.settings.index_window,
        )
        self.commands_handled = 0
        self.dead_lettered = 0
        # Tasks this process has put out, by message id: the control hook's repeat of a wake's
        # dispatch (for a waker that died before dispatching) is not needed for these.
        self._dispatched: OrderedDict[str, None] = OrderedDict()
        # Runs this process is waking and will dispatch with their history carried: the
        # control hook's repeat of such a wake waits for that dispatch instead of racing it
        # (a history-less task first would win the message id, and the worker would read).
        self._waking: dict[str, asyncio.Future[None]] = {}
        # Set when the server refuses the service credentials on a reconnect.
        self.fatal = Fatal()
        # The features, wired here: each answers its command verbs, reacts to control events
        # after the index has folded them, and starts and stops with the orchestrator.
        # Admission comes first: a run of a limited queue is never dispatched around it.
        self.admission = Admission(self)
        self.waiting = Waiting(self)
        self.features: tuple[Feature, ...] = (self.admission, self.waiting)
        self._verbs: dict[str, CommandHandler] = {}
        for feature in self.features:
            for verb, handler in feature.commands().items():
                if verb == "start" or verb in self._verbs:
                    raise ValueError(f"command verb {verb!r} is handled twice")
                self._verbs[verb] = handler

    @property
    def index_conflicts(self) -> int:
        return self.index.conflicts

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
        await self.index.open(self._nc, self._js)
        await ensure_consumer(
            self._js,
            self.names.cmd_stream,
            "orchestrator_cmd",
            self.names.cmd_filter,
            ack_wait=self.settings.service_ack_wait,
        )
        await ensure_consumer(
            self._js,
            self.names.runs_stream,
            "orchestrator_ctl",
            self.names.ctl_filter,
            ack_wait=self.settings.service_ack_wait,
        )
        # Before the loops: queues with limits admit from the first command on.
        for feature in self.features:
            await feature.start()
        for stream, durable, handler in (
            (self.names.cmd_stream, "orchestrator_cmd", self._on_command),
            (self.names.runs_stream, "orchestrator_ctl", self._on_control),
        ):
            loop = PullLoop(self._nc, stream, durable, handler, capacity=256, name=durable)
            loop.start()
            self._loops.append(loop)
        log.info("orchestrator started on namespace %r", self.settings.prefix)

    async def stop(self) -> None:
        self.index.flush_held()  # what the index holds is written, and its events acked
        await asyncio.gather(*(loop.stop(drain_timeout=2.0) for loop in self._loops))
        for feature in reversed(self.features):
            await feature.stop()
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
                handler = self._verbs.get(verb)
                if handler is None:
                    raise CommandError(
                        f"unknown command subject {msg.subject!r}; expected "
                        f"{self.names.prefix}.cmd.start.<workflow> or another documented command"
                    )
                body = await handler(msg, tokens[3:])
        except RunNotYetKnown as err:
            delivered = msg.metadata.num_delivered
            if delivered < _NOT_YET_RETRIES and (
                delivered < _NOT_YET_REREADS or await self._older_commands_pending(msg)
            ):
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
            unavailable = is_transient(exc) or isinstance(exc, (AppendUnavailable, StaleRead))
            if delivered >= (_UNAVAILABLE_RETRIES if unavailable else 5):
                await self._reject(
                    msg, CommandError(f"processing failed {delivered} times: {exc!r}")
                )
                await msg.ack()
            else:
                if unavailable:
                    # Expected while a cluster elects or a replica catches up: one line, not a
                    # traceback per redelivery.
                    log.warning("command on %s: %r; will retry", msg.subject, exc)
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

    async def _start(self, msg: Msg, workflow: str) -> dict[str, Any]:
        if not valid_token(workflow):
            raise CommandError(f"workflow name {workflow!r} is not valid", field="workflow")
        body = parse_object(msg)
        unknown = sorted(set(body) - START_FIELDS)
        if unknown:
            raise CommandError(
                f"unknown field(s) {', '.join(unknown)}; a start command takes "
                f"{', '.join(sorted(START_FIELDS))}",
                field=unknown[0],
            )
        run_id = body.get("run_id")
        if run_id is None:
            hdrs = msg.headers or {}
            key = hdrs.get(MSG_ID) or f"seq/{stream_seq(msg)}"
            run_id = derive_run_id(self.names.prefix, key)
        elif not isinstance(run_id, str) or not valid_token(run_id):
            raise CommandError("run_id must be 1-128 letters, digits, '_' or '-'", field="run_id")
        for name in ("queue", "concurrency_key", "session_id", "user_id"):
            if body.get(name) is not None and not isinstance(body[name], str):
                raise CommandError(f"{name} must be a string", field=name)
        event = ev.RunRequested(
            run_id=run_id,
            workflow=workflow,
            input=await self.command_input(body, run_id),
            queue=body.get("queue"),
            concurrency_key=body.get("concurrency_key"),
            source="client" if (msg.headers or {}).get("Polos-Client") else "raw",
            session_id=body.get("session_id"),
            user_id=body.get("user_id"),
            initial_state=body.get("initial_state"),
        )
        return await self.request_run(event)

    async def command_input(self, body: dict[str, Any], run_id: str) -> Any:
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
            # case an earlier instance died between creating it and dispatching it. (Read
            # through its first event: the fence saw it, a lagging replica may not have.)
            state = await load_state_through(self.nc, self.names, run_id, 1)
            answer = {"ok": True, "run_id": run_id, "existing": True, "status": state.status}
            if state.requested and state.status == "queued" and state.attempt == 0:
                if hold is not None and await hold():
                    return {**answer, "held": True}
                await self.dispatch(
                    run_id, state.requested.workflow, state.last_seq, requested=state.requested
                )
            return answer
        if hold is not None and await hold():
            return {
                "ok": True,
                "run_id": run_id,
                "existing": False,
                "status": "queued",
                "held": True,
            }
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
        if await self.admission.route(run_id, workflow, cause_seq, requested):
            self._note_dispatched(run_id, cause_seq)
            return
        if fresh and requested is not None:
            history = [(cause_seq, ev.encode(requested))]
        carried = history if history and history[-1][0] == cause_seq else None
        await publish_task(
            self.nc,
            self.names,
            run_id,
            workflow,
            cause_seq,
            encode_task(run_id, workflow, history=carried, cause=cause_seq),
            timeout=self.settings.request_timeout,
        )
        self._note_dispatched(run_id, cause_seq)

    def _note_dispatched(self, run_id: str, cause_seq: int) -> None:
        self._dispatched[task_msg_id(run_id, cause_seq)] = None
        if len(self._dispatched) > _DISPATCHED_KEPT:
            self._dispatched.popitem(last=False)

    @contextlib.asynccontextmanager
    async def waking(self, run_id: str) -> AsyncIterator[None]:
        """Around a wake this process appends and then dispatches itself."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waking[run_id] = done
        try:
            yield
        finally:
            done.set_result(None)
            if self._waking.get(run_id) is done:
                del self._waking[run_id]

    async def wake_settled(self, run_id: str) -> None:
        """Returns once no wake of the run by this process is between its append and its
        dispatch (at once when there is none)."""
        pending = self._waking.get(run_id)
        if pending is not None:
            await asyncio.shield(pending)

    def dispatched(self, run_id: str, cause_seq: int) -> bool:
        """Whether this process has put out (or admitted) the run's task for that cause."""
        return task_msg_id(run_id, cause_seq) in self._dispatched

    # ------------------------------------------------------------------ control events

    async def _on_control(self, msg: Msg) -> None:
        try:
            event = ev.decode(msg.data)
        except ev.EventDecodeError as exc:
            await dead_letter(
                self.js,
                self.names,
                source="ctl",
                reason=str(exc),
                subject=msg.subject,
                data=msg.data,
            )
            await msg.ack()
            return
        seq = stream_seq(msg)
        run_id = msg.subject.split(".")[2]
        try:
            # A wake this process dispatched (or is dispatching) needs no hook: its index write
            # waits for the claim that follows, one write for both.
            hold = type(event) is ev.RunWoken and (
                run_id in self._waking or self.dispatched(run_id, seq)
            )
            await self.index.update(run_id, seq, event, hold=hold)
            for feature in self.features:
                await feature.on_control(run_id, seq, event)
        except StaleRead as exc:
            if msg.metadata.num_delivered < _STALE_REDELIVERIES:
                log.info(
                    "control event %s at seq %d: %s; will retry", type(event).__name__, seq, exc
                )
                await msg.nak(delay=0.5)
                return
            # Kept aside (`polos dlq`), not looped on: a replica stays this far behind.
            self.dead_lettered += 1
            log.warning(
                "control event %s at seq %d dead-lettered: %s", type(event).__name__, seq, exc
            )
            await dead_letter(
                self.js,
                self.names,
                source="ctl",
                reason=f"its hook's reads never reached it: {exc}",
                subject=msg.subject,
                data=msg.data,
            )
        except Exception:
            log.exception(
                "control event %s of run %s failed; will retry", type(event).__name__, run_id
            )
            await msg.nak(delay=0.5)
            return
        await msg.ack()
