"""The orchestrator's side of waiting: resume, cancel and child commands, external events,
and the control hooks that wake suspended runs.

Every race here is closed the same way: the thing that arrives (a resume command, an event, a
child's end) is durable before anyone looks for it, and both sides look: the arrival's handler
checks whether the run already waits for it, and the ``RunSuspended`` hook checks whether it
already arrived. Whichever runs second sees the other. Both wake with one append fenced on the
``RunSuspended`` sequence, so two wakers (two instances, a redelivery) cannot both succeed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

import orjson
from nats.aio.msg import Msg

from polos import history as ev
from polos._private.run import waits as wt
from polos._private.run.timers import clear_timers, schedule_timer
from polos._private.run.wake import first_event_after, wake
from polos._private.store import (
    MSG_ID,
    STALE_RETRIES,
    FencedOut,
    PullLoop,
    StaleRead,
    append,
    dead_letter,
    ensure_consumer,
    kv_entries,
    leader_last,
    leader_next,
    load_run,
    load_run_unless_long,
    load_state,
    load_state_through,
    payloads,
    read_subject_through,
    snapshots,
    stream_seq,
    valid_token,
)
from polos._private.store.commands import CANCEL_FIELDS, CHILD_FIELDS, RESUME_FIELDS
from polos._private.store.tokens import (
    decode_token,
    event_subject,
    parse_time,
    resume_subject,
    topic_from_subject,
    topic_tokens,
)

from .commands import CommandError, RunNotYetKnown, parse_object
from .triggers import Triggers

if TYPE_CHECKING:
    from nats.js.kv import KeyValue

    from .orchestrator import CommandHandler, Orchestrator

log = logging.getLogger("polos.waiting")

# Reads that need a run's status, workflow or outcome, not its steps.
CTL = ("ctl",)
CASCADE_HEADER = "Polos-Cascade"  # a cancel sent by a parent's cancellation, not by a user
# A resume reads this many of a run's step events (and whether it has a replay snapshot) with
# its control events: a run with fewer is read whole in one round trip, as before.
RESUME_READ_STEPS = 16


def _workflow_of(orch: Orchestrator, run_id: str, state: ev.RunState | None = None) -> str | None:
    if state is not None and state.workflow:
        return state.workflow
    cached = orch.index.cached(run_id)
    return cached.get("workflow") if cached else None


async def _dispatch_woken(
    orch: Orchestrator,
    run_id: str,
    workflow: str | None,
    seq: int,
    *,
    history: list[tuple[int, bytes]] | None = None,
    woken: ev.RunWoken | None = None,
) -> None:
    """Dispatch a woken run. ``history`` (the bodies the waker read, up to the sequence it
    fenced its wake on) and ``woken`` (that wake, stored at ``seq``) together are the run's
    whole history: the task carries them and the worker claims without reading."""
    if workflow is None:
        workflow = (await load_state(orch.nc, orch.names, run_id, kinds=CTL)).workflow
    if workflow:
        carried = None
        if history is not None and woken is not None:
            carried = [*history, (seq, ev.encode(woken))]
        await orch.dispatch(run_id, workflow, seq, history=carried)


# --------------------------------------------------------------------------- resume


# A resume holds its data inline, or names the object holding it, or has none.
_RESUME_FORMS: tuple[set[str], ...] = ({"data"}, {"data_ref"}, set())


async def _resume_data(orch: Orchestrator, run_id: str, body: dict[str, Any]) -> Any:
    """A resume's data: inline, or (too big for a message) the payload object it names."""
    if "data_ref" not in body:
        return body.get("data")
    ref = body["data_ref"]
    if not isinstance(ref, str) or not ref.startswith(f"{run_id}/"):
        raise CommandError(
            "data_ref must name the run's payload object (<run_id>/<name>), without data",
            field="data_ref",
        )
    try:
        return await payloads.get_value(orch.js, orch.names, ref)
    except payloads.PayloadMissingError as exc:
        raise CommandError(str(exc), field="data_ref") from exc


async def _first_resume(orch: Orchestrator, run_id: str, key: str) -> tuple[int, Any] | None:
    """The first well-formed resume stored for the run's step: the one that applies.

    Read from the command stream's leader, one message at a time (almost always one, or none):
    "none pending" lets a suspension wait, and a resume answered "pending" earlier (its read of
    the run did not show the suspension yet) relies on this read to find it, which a replica
    behind the leader might not."""
    subject = resume_subject(orch.names, run_id, key)
    seq = 1
    for _ in range(20):
        m = await leader_next(orch.nc, orch.names.cmd_stream, subject, seq)
        if m is None:
            return None
        seq = m.seq + 1
        try:
            body = orjson.loads(m.data) if m.data else {}
        except orjson.JSONDecodeError:
            continue
        if isinstance(body, dict) and set(body) in _RESUME_FORMS:
            try:
                return m.seq, await _resume_data(orch, run_id, body)
            except CommandError:
                continue  # refused when it was handled: it never applies
    return None


def _resume_target(
    orch: Orchestrator, msg: Msg, tokens: list[str]
) -> tuple[str, str, dict[str, Any]]:
    """The run, the step key and the body of a resume command; a malformed one is refused."""
    if len(tokens) != 2 or not valid_token(tokens[0]):
        raise CommandError(
            f"a resume goes to {orch.names.prefix}.cmd.resume.<run_id>.<step key>, got {msg.subject!r}"
        )
    try:
        key = decode_token(tokens[1])
    except UnicodeDecodeError as exc:
        raise CommandError(f"step key token {tokens[1]!r} is not valid", field="key") from exc
    body = parse_object(msg)
    unknown = sorted(set(body) - RESUME_FIELDS)
    if unknown:
        raise CommandError(
            f'unknown field(s) {", ".join(unknown)}; a resume is {{"data": <any JSON>}} or, '
            'for data too big for a message, {"data_ref": "<run_id>/<object>"}',
            field=unknown[0],
        )
    if set(body) not in _RESUME_FORMS:
        raise CommandError("a resume has data or data_ref, not both", field="data_ref")
    return tokens[0], key, body


def _check_settled(run_id: str, key: str, done: ev.StepCompleted | ev.StepFailed, seq: int) -> None:
    """The step is recorded already: fine if by this very command (redelivered), else the
    resume is refused with why it changes nothing."""
    out = done.output if isinstance(done, ev.StepCompleted) else None
    if done.kind != "suspend":
        raise CommandError(
            f"run {run_id}: step {key!r} is a {done.kind} step, not a suspend", field="key"
        )
    if isinstance(out, dict) and out.get("seq") == seq:
        return
    if isinstance(out, dict) and out.get("timeout"):
        raise CommandError(
            f"run {run_id}: suspend {key!r} timed out before this resume; it changes nothing",
            field="key",
        )
    raise CommandError(
        f"run {run_id}: step {key!r} was already resumed; this resume changes nothing",
        field="key",
    )


async def _check_first_pending(orch: Orchestrator, run_id: str, key: str, seq: int) -> None:
    """The run is not at the step yet: the first resume stored for it is the one that will
    apply, so a later one is refused."""
    first = await _first_resume(orch, run_id, key)
    if first is not None and first[0] != seq:
        raise CommandError(
            f"run {run_id}: a resume of step {key!r} is already pending (sent earlier); "
            "this one changes nothing",
            field="key",
        )


async def _resume_now(
    orch: Orchestrator,
    state: ev.RunState,
    bodies: list[tuple[int, bytes]] | None,
    sus: ev.RunSuspended,
    data: Any,
    seq: int,
) -> bool:
    """Wake the run suspended at the resumed step and dispatch it; False when the history
    moved under the wake (a timeout, a cancel, another resume)."""
    if sus.kind != "suspend":
        raise CommandError(
            f"run {state.run_id} waits at {sus.step!r} for a {sus.kind}, not for a resume",
            field="key",
        )
    return await _wake_carrying(
        orch,
        state,
        sus.step,
        state.last_seq,
        bodies,
        reason="resumed",
        cause=f"r{seq}",
        kind="suspend",
        output={"data": data, "seq": seq, "at": time.time()},
    )


async def _wake_carrying(
    orch: Orchestrator,
    state: ev.RunState,
    step: str,
    expected_seq: int,
    bodies: list[tuple[int, bytes]] | None,
    *,
    reason: str,
    cause: str,
    kind: ev.StepKind,
    output: Any,
) -> bool:
    """Append the run's wake fenced on ``expected_seq`` and dispatch it carrying ``bodies`` (the
    history read up to there); False when the history moved under the wake."""
    async with orch.waking(state.run_id):
        woke = await wake(
            orch.js,
            orch.names,
            state.run_id,
            step,
            expected_seq=expected_seq,
            reason=reason,
            cause=cause,
            kind=kind,
            output=output,
            workflow=state.workflow,
        )
        if woke is None:
            return False
        await _dispatch_woken(
            orch, state.run_id, state.workflow, woke.seq, history=bodies, woken=woke.event
        )
    return True


async def _is_long(orch: Orchestrator, run_id: str, ctl: ev.RunState) -> bool:
    """Whether the run has a replay snapshot: its suspension says the worker writes one, or
    (a suspension written without that word) the bucket has one."""
    sus = ctl.suspended
    if sus is not None and sus.snapshot:
        return True
    return await snapshots.exists(orch.nc, orch.names, run_id)


async def on_resume(orch: Orchestrator, msg: Msg, tokens: list[str]) -> dict[str, Any]:
    run_id, key, body = _resume_target(orch, msg, tokens)
    data = await _resume_data(orch, run_id, body)
    seq = stream_seq(msg)
    answer = {"ok": True, "run_id": run_id, "key": key}
    behind: StaleRead | None = None
    for attempt in range(10):
        if attempt == 0:
            # A long run (one with a replay snapshot) is resumed from its control events (a run
            # suspended at the resumed step has its RunSuspended last: the wake is fenced on
            # it) without reading its steps; its task then carries no history, and the worker
            # starts from the snapshot. Anything else about a long run reads it whole (the next
            # attempt); a shorter one is read whole at once, its history carried as before.
            state, bodies, whole = await load_run_unless_long(
                orch.nc,
                orch.names,
                run_id,
                max_steps=RESUME_READ_STEPS,
                long=lambda ctl: _is_long(orch, run_id, ctl),
            )
            if not whole:
                sus = state.suspended
                if (
                    state.status == "suspended"
                    and sus is not None
                    and sus.step == key
                    and sus.kind == "suspend"
                    and key not in state.steps
                    and await _resume_now(orch, state, None, sus, data, seq)
                ):
                    return {**answer, "status": "resumed"}
                continue
        else:
            state, bodies = await load_run(orch.nc, orch.names, run_id)
        if state.requested is None:
            raise RunNotYetKnown(
                f"no run {run_id!r} in namespace {orch.names.prefix!r}", field="run_id"
            )
        done = state.steps.get(key)
        if done is not None:
            _check_settled(run_id, key, done, seq)
            return {**answer, "status": "resumed"}  # this very command, redelivered
        if state.done:
            raise CommandError(f"run {run_id} is {state.status}; there is nothing to resume")
        sus = state.suspended
        if state.status == "suspended" and sus is not None and sus.step == key:
            if await _resume_now(orch, state, bodies, sus, data, seq):
                return {**answer, "status": "resumed"}
            continue  # the history moved: look again
        # "Not there yet" leaves the resume to the suspension hook: made sure of on the leader,
        # since a replica behind it may not hold the suspension yet (the hook's own read of the
        # pending resumes, on the command stream's leader, covers a suspension stored later).
        last = await leader_last(
            orch.nc, orch.names.runs_stream, orch.names.run_subject(run_id, "ctl")
        )
        if last is not None and last.seq > state.last_seq:
            behind = StaleRead(f"run {run_id}'s history", last.seq, state.last_seq)
            await asyncio.sleep(STALE_RETRIES[min(attempt, len(STALE_RETRIES) - 1)])
            continue
        await _check_first_pending(orch, run_id, key, seq)
        return {
            **answer,
            "status": "pending",
            "message": f"run {run_id} is {state.status}, not suspended at {key!r} yet: "
            "the resume is kept and applied when the run gets there",
        }
    if behind is not None:
        raise behind
    raise RuntimeError(f"run {run_id}: resume kept racing with other writers")


# --------------------------------------------------------------------------- cancel


async def on_cancel(orch: Orchestrator, msg: Msg, tokens: list[str]) -> dict[str, Any]:
    if len(tokens) != 1 or not valid_token(tokens[0]):
        raise CommandError(
            f"a cancel goes to {orch.names.prefix}.cmd.cancel.<run_id>, got {msg.subject!r}"
        )
    run_id = tokens[0]
    body = parse_object(msg)
    unknown = sorted(set(body) - CANCEL_FIELDS)
    if unknown:
        raise CommandError(
            f"unknown field(s) {', '.join(unknown)}; a cancel takes reason", field=unknown[0]
        )
    reason = body.get("reason")
    if reason is not None and not isinstance(reason, str):
        raise CommandError("reason must be a string", field="reason")
    cascade = bool((msg.headers or {}).get(CASCADE_HEADER))
    status = await cancel_run(orch, run_id, reason, cascade=cascade)
    answer = {"ok": True, "run_id": run_id, "status": status}
    if status == "pending":
        answer["message"] = (
            f"run {run_id} is not created yet; it is cancelled as it is "
            "created, since its parent is cancelled"
        )
    return answer


async def cancel_run(orch: Orchestrator, run_id: str, reason: str | None, *, cascade: bool) -> str:
    """Append the run's ``RunCancelled`` (fenced: the worker executing it is fenced out by it);
    returns the run's status. A ``cascade`` (its parent was cancelled) of a run that has ended
    is no error, and one of a run not created yet is ``pending``: the orchestrator cancels a
    child whose parent is cancelled as it creates it (``on_child``)."""
    for _ in range(20):
        state = await load_state(orch.nc, orch.names, run_id)
        if state.requested is None:
            if cascade:
                return "pending"
            raise RunNotYetKnown(
                f"no run {run_id!r} in namespace {orch.names.prefix!r}", field="run_id"
            )
        if state.done:
            if cascade:
                return state.status
            raise CommandError(f"run {run_id} is already {state.status}; nothing to cancel")
        try:
            await append(
                orch.js,
                orch.names,
                run_id,
                ev.RunCancelled(run_id=run_id, reason=reason),
                expected_last_seq=state.last_seq,
                msg_id=f"{run_id}/cancel",
            )
        except FencedOut:
            await asyncio.sleep(0.01)
            continue
        return "cancelled"
    raise RuntimeError(f"run {run_id}: cancel kept racing with the worker's appends")


async def _after_cancel(orch: Orchestrator, run_id: str, seq: int) -> None:
    # Interrupt the worker holding it (if any) at its next await; it is fenced out anyway.
    await orch.nc.publish(orch.names.cancel_signal_subject(run_id), b"")
    await clear_timers(orch.js, orch.names, run_id)
    # Its replay snapshot, if it had one: nothing replays a cancelled run.
    try:
        await snapshots.delete(orch.nc, orch.js, orch.names, run_id)
    except Exception as exc:
        log.warning("run %s: replay snapshot not removed: %s", run_id, exc)
    state = await load_state_through(orch.nc, orch.names, run_id, seq)
    # Every child the run ever requested: the requests are stored (under the parent) before
    # the parent records the child, so a child requested but not recorded (the record fenced
    # out by this very cancel) is found too. A request stored after this read creates its
    # child after the cancel, and that child is cancelled as it is created (``on_child``).
    # Through the leader's last request: a request this read misses must be stored after it,
    # and then ``on_child``'s read of the parent (on the leader too) finds the cancel.
    requests = orch.names.child_filter(run_id)
    last = await leader_last(orch.nc, orch.names.cmd_stream, requests)
    children: dict[str, None] = {}
    for m in await read_subject_through(
        orch.nc, orch.names.cmd_stream, requests, last.seq if last else 0
    ):
        children[m.subject.rsplit(".", 1)[1]] = None
    for step in state.steps.values():
        out = step.output if isinstance(step, ev.StepCompleted) else None
        if step.kind == "invoke" and isinstance(out, dict) and out.get("run_id"):
            children[str(out["run_id"])] = None
    sus = state.suspended
    if sus is not None and sus.kind == "child":
        children.update(dict.fromkeys(sus.children or []))
    if sus is not None and sus.kind == "event" and sus.topic:
        with contextlib.suppress(Exception):
            await (await _waits(orch)).delete(_wait_key(sus.topic, run_id))
    for child in children:
        await orch.js.publish(
            orch.names.cancel_subject(child),
            orjson.dumps({"reason": f"parent run {run_id} was cancelled"}),
            headers={MSG_ID: f"cancel/{child}", CASCADE_HEADER: "1"},
        )


# --------------------------------------------------------------------------- children


async def on_child(orch: Orchestrator, msg: Msg, tokens: list[str]) -> dict[str, Any]:
    # <parent>.<child>; a lone <child> token is the form workers used before, still accepted.
    if not 1 <= len(tokens) <= 2 or not all(valid_token(t) for t in tokens):
        raise CommandError(
            f"a child request goes to {orch.names.prefix}.cmd.child.<parent run_id>.<run_id>"
        )
    body = parse_object(msg)
    unknown = sorted(set(body) - CHILD_FIELDS)
    if unknown:
        raise CommandError(f"unknown field(s) {', '.join(unknown)}", field=unknown[0])
    for name in ("workflow", "parent_run_id", "parent_step"):
        if not isinstance(body.get(name), str) or not body[name]:
            raise CommandError(f"{name} must be a non-empty string", field=name)
    if not valid_token(body["workflow"]):
        raise CommandError(f"workflow name {body['workflow']!r} is not valid", field="workflow")
    parent = body["parent_run_id"]
    if len(tokens) == 2 and tokens[0] != parent:
        raise CommandError(
            f"parent_run_id {parent!r} is not the parent in the subject ({tokens[0]!r})",
            field="parent_run_id",
        )
    for name in ("root_workflow", "queue", "concurrency_key", "session_id", "user_id"):
        if body.get(name) is not None and not isinstance(body[name], str):
            raise CommandError(f"{name} must be a string", field=name)
    child = tokens[-1]
    event = ev.RunRequested(
        run_id=child,
        workflow=body["workflow"],
        input=await orch.command_input(body, child),
        parent_run_id=parent,
        parent_step=body["parent_step"],
        root_run_id=body.get("root_run_id"),
        source="child",
        queue=body.get("queue"),
        concurrency_key=body.get("concurrency_key"),
        session_id=body.get("session_id"),
        user_id=body.get("user_id"),
        root_workflow=body.get("root_workflow"),
        initial_state=body.get("initial_state"),
    )
    cancelled: list[bool] = []

    async def parent_cancelled() -> bool:
        # After the child is durable: a parent cancelled from here on finds the child (its
        # request is stored); one cancelled before is seen here. The parent's RunCancelled is
        # its last control event (nothing appends after it), so one read of the last suffices:
        # on the leader, which holds every cancel it acknowledged (a replica may lag).
        last = await leader_last(
            orch.nc, orch.names.runs_stream, orch.names.run_subject(parent, "ctl")
        )
        try:
            found = last is not None and isinstance(ev.decode(last.data), ev.RunCancelled)
        except ev.EventDecodeError:  # not an event (dead-lettered): fold the real ones
            state = await load_state(orch.nc, orch.names, parent, kinds=CTL)
            found = state.status == "cancelled"
        cancelled.append(found)
        return found

    answer = await orch.request_run(event, hold=parent_cancelled)
    if not cancelled:  # it existed and was dispatched before: it may have run since
        await parent_cancelled()
    if cancelled[-1]:
        status = await cancel_run(orch, child, f"parent run {parent} was cancelled", cascade=True)
        answer = {**answer, "status": status}
    return answer


async def _children_outcome(orch: Orchestrator, children: list[str]) -> list[dict[str, Any]] | None:
    """Every child's outcome if all have ended, else None (a later child end looks again)."""
    for child in children:
        cached = orch.index.cached(child)
        status = cached.get("status") if cached else None
        if status not in ev.TERMINAL:
            # Another instance may have folded the child's end: the bucket says.
            entry = await orch.index.read(child)
            if entry is None:
                return None
            status = entry.get("status")
        if status not in ev.TERMINAL:
            return None
    # The index has folded every end, so a read without one came from a replica behind it.
    states = await asyncio.gather(
        *(load_state_through(orch.nc, orch.names, c, 1, kinds=CTL, ended=True) for c in children)
    )
    return [
        {
            "run_id": s.run_id,
            "workflow": s.workflow,
            "status": s.status,
            "output": s.output,
            "error": s.error,
        }
        for s in states
    ]


async def _wake_parent(
    orch: Orchestrator,
    state: ev.RunState,
    seq: int,
    sus: ev.RunSuspended,
    bodies: list[tuple[int, bytes]] | None = None,
) -> None:
    """``bodies``: the parent's stored history up to ``seq``, when the caller read it all."""
    results = await _children_outcome(orch, list(sus.children or []))
    if results is None:
        return
    await _wake_carrying(
        orch,
        state,
        sus.step,
        seq,
        bodies,
        reason="children ended",
        cause="children",
        kind="child",
        output={"children": results},
    )


# --------------------------------------------------------------------------- events


async def _waits(orch: Orchestrator) -> KeyValue:
    return await orch.waiting.waits()


def _wait_key(topic: str, run_id: str) -> str:
    return f"{topic_tokens(topic)}.{run_id}"


async def _wake_event_waiter(
    orch: Orchestrator,
    run_id: str,
    step: str,
    seq: int,
    topic: str,
    cursor: int,
    since: float | None,
    workflow: str | None,
    through: tuple[int, float] | None,
) -> bool | None:
    """Wake a run waiting on ``topic`` with the first event after its cursor. True: woken;
    False: no event yet; None: the wait is stale (the run moved on). ``through``: an event on
    the topic known stored (sequence, time), which the read must reach."""
    found = await first_event_after(orch.nc, orch.names, topic, cursor, since, through=through)
    if found is None:
        return False
    woke = await wake(
        orch.js,
        orch.names,
        run_id,
        step,
        expected_seq=seq,
        reason=f"event {topic}",
        cause=f"e{found['seq']}",
        kind="event",
        output=found,
        workflow=workflow,
    )
    if woke is None:
        return None
    await _dispatch_woken(orch, run_id, workflow, woke.seq)
    return True


class EventRouter:
    """Consumes the external-event stream: wakes waiting runs and starts triggered runs."""

    def __init__(self, orch: Orchestrator) -> None:
        self.orch = orch
        self.loop: PullLoop | None = None
        # The trigger part of each event runs after the one of the event delivered before it:
        # a new trigger's cursor starts at the first event it sees, and batches are cut in
        # stream order, so concurrent handling must not let a later event go first.
        self._trigger_tail: asyncio.Future[None] | None = None

    async def start(self) -> None:
        o = self.orch
        durable = "orchestrator_events"
        await ensure_consumer(
            o.js,
            o.names.events_stream,
            durable,
            f"{o.names.prefix}.event.>",
            ack_wait=o.settings.service_ack_wait,
        )
        self.loop = PullLoop(
            o.nc, o.names.events_stream, durable, self.on_event, capacity=64, name=durable
        )
        self.loop.start()

    async def stop(self) -> None:
        if self.loop is not None:
            await self.loop.stop(drain_timeout=2.0)

    async def on_event(self, msg: Msg) -> None:
        # Taken before the first await, so in the order the loop delivered the messages.
        before, mine = self._trigger_tail, asyncio.get_running_loop().create_future()
        self._trigger_tail = mine
        try:
            await self._on_event(msg, before)
        finally:
            mine.set_result(None)

    async def _on_event(self, msg: Msg, before: asyncio.Future[None] | None) -> None:
        o = self.orch
        try:
            topic = topic_from_subject(o.names, msg.subject)
            data = await payloads.event_value(o.js, o.names, msg.headers, msg.data)
        except (ValueError, payloads.PayloadMissingError) as exc:  # JSONDecodeError included
            await dead_letter(
                o.js,
                o.names,
                source="event",
                reason=f"malformed event: {exc}",
                subject=msg.subject,
                data=msg.data,
                headers=dict(msg.headers or {}),
            )
            await msg.ack()
            return
        seq = msg.metadata.sequence.stream
        stamp = msg.metadata.timestamp
        try:
            await self._wake_waiters(topic, seq, stamp.timestamp() if stamp else time.time())
            if before is not None:
                await asyncio.shield(before)
            await self._trigger(topic, seq, data, msg)
        except Exception:
            log.exception("event %s on %s failed; will retry", seq, topic)
            await msg.nak(delay=0.5)
            return
        await msg.ack()

    async def _wake_waiters(self, topic: str, seq: int, at: float) -> None:
        o = self.orch
        # A waiter this listing misses (on the bucket's leader, as of now) is put after it,
        # after this event was stored, and its own read of the topic finds the event.
        waiters = await kv_entries(
            o.nc, o.names.waits_bucket, f"{topic_tokens(topic)}.*", current=True
        )
        kv = await _waits(o)
        for m in waiters:
            w = orjson.loads(m.value)
            if int(w.get("cursor") or 0) >= seq:
                continue
            outcome = await _wake_event_waiter(
                o,
                w["run_id"],
                w["step"],
                int(w["seq"]),
                topic,
                int(w.get("cursor") or 0),
                w.get("since"),
                w.get("workflow"),
                (seq, at),
            )
            if outcome is not False:
                with contextlib.suppress(Exception):
                    await kv.delete(m.key, last=m.revision)

    async def _trigger(self, topic: str, seq: int, data: Any, msg: Msg) -> None:
        meta = msg.metadata
        at = meta.timestamp.timestamp() if meta.timestamp else time.time()
        await self.orch.waiting.triggers.on_event(topic, seq, data, at, msg.headers)


# --------------------------------------------------------------------------- control hook


async def on_control(orch: Orchestrator, run_id: str, seq: int, event: ev.Event) -> None:
    if isinstance(event, ev.RunSuspended):
        # An LLM step's rate wait is a timer like a sleep (admission owns the other rate waits).
        if event.kind in wt.WAIT_KINDS or (event.kind == "rate" and event.wake_at is not None):
            await _on_suspended(orch, run_id, seq, event)
    elif type(event) is ev.RunWoken:
        # The waker dispatched already; this repeats it (same message id: never two tasks) in
        # case the waker died in between, and is the only dispatch for the scheduler's wakes.
        # A wake this very process dispatched needs no repeat; one it is dispatching (with
        # the history it read, which a repeat would not carry) is waited for first.
        await orch.wake_settled(run_id)
        if not orch.dispatched(run_id, seq):
            await _dispatch_woken(orch, run_id, event.workflow or _workflow_of(orch, run_id), seq)
    elif isinstance(event, (ev.RunCompleted, ev.RunFailed, ev.RunCancelled)):
        if isinstance(event, ev.RunCancelled):
            await _after_cancel(orch, run_id, seq)
        # The entry says whether the run is a child only once its request is folded in: an end
        # can come first (the request was held by an orchestrator that died, and comes back
        # after the ack wait), and then only the run's control events can say.
        cached = orch.index.cached(run_id)
        if cached is None or "workflow" not in cached or cached.get("parent_run_id"):
            await _child_ended(orch, run_id, seq)


async def _child_ended(orch: Orchestrator, run_id: str, seq: int) -> None:
    # Its control events say whether it is a child: every run ending after its index entry left
    # the cache comes here, and a long run's steps are not worth reading for that.
    child = await load_state_through(orch.nc, orch.names, run_id, seq, kinds=CTL)
    req = child.requested
    if req is None or not req.parent_run_id:
        return
    parent, bodies = await load_run(orch.nc, orch.names, req.parent_run_id)
    sus = parent.suspended
    if (
        parent.status == "suspended"
        and sus is not None
        and sus.kind == "child"
        and run_id in (sus.children or [])
    ):
        await _wake_parent(orch, parent, parent.last_seq, sus, bodies)


async def _on_suspended(orch: Orchestrator, run_id: str, seq: int, event: ev.RunSuspended) -> None:
    workflow = _workflow_of(orch, run_id)
    due = event.wake_at if event.kind in ("sleep", "retry", "rate") else event.timeout_at
    if due is not None:
        await schedule_timer(
            orch.js,
            orch.names,
            run_id,
            seq,
            due,
            {"kind": "wake", "step": event.step, "wait_kind": event.kind, "workflow": workflow},
        )
    if event.kind == "suspend":
        first = await _first_resume(orch, run_id, event.step)
        if first is not None:
            woke = await wake(
                orch.js,
                orch.names,
                run_id,
                event.step,
                expected_seq=seq,
                reason="resumed",
                cause=f"r{first[0]}",
                kind="suspend",
                output={"data": first[1], "seq": first[0], "at": time.time()},
                workflow=workflow,
            )
            if woke is not None:
                await _dispatch_woken(orch, run_id, workflow, woke.seq)
    elif event.kind == "event" and event.topic:
        kv = await _waits(orch)
        key = _wait_key(event.topic, run_id)
        rev = await kv.put(
            key,
            orjson.dumps(
                {
                    "run_id": run_id,
                    "step": event.step,
                    "seq": seq,
                    "topic": event.topic,
                    "cursor": event.cursor or 0,
                    "since": event.since,
                    "workflow": workflow,
                }
            ),
        )
        # After the put: an event stored from here on finds the waiter; one stored before is
        # found by this read, made through the last event the topic's leader holds.
        last = await leader_last(
            orch.nc, orch.names.events_stream, event_subject(orch.names, event.topic)
        )
        outcome = await _wake_event_waiter(
            orch,
            run_id,
            event.step,
            seq,
            event.topic,
            event.cursor or 0,
            event.since,
            workflow,
            (last.seq, parse_time(last.time)) if last is not None else None,
        )
        if outcome is not False:
            with contextlib.suppress(Exception):
                await kv.delete(key, last=rev)
    elif event.kind == "child":
        state = await load_state_through(orch.nc, orch.names, run_id, seq)
        if state.status == "suspended" and state.last_seq == seq:
            await _wake_parent(orch, state, seq, event)


class Waiting:
    """The orchestrator's waiting feature: the resume, cancel and child commands, the external
    events (their own consumer), and the control hooks that wake suspended runs."""

    def __init__(self, orch: Orchestrator) -> None:
        self.orch = orch
        self.router = EventRouter(orch)
        self.triggers = Triggers(orch)
        # The waiters bucket's handle, opened on first use (``js.key_value`` is a stream-info
        # round trip per call).
        self._waits: KeyValue | None = None

    def commands(self) -> dict[str, CommandHandler]:
        orch = self.orch

        async def resume(msg: Msg, tokens: list[str]) -> dict[str, Any]:
            return await on_resume(orch, msg, tokens)

        async def cancel(msg: Msg, tokens: list[str]) -> dict[str, Any]:
            return await on_cancel(orch, msg, tokens)

        async def child(msg: Msg, tokens: list[str]) -> dict[str, Any]:
            return await on_child(orch, msg, tokens)

        return {
            "resume": resume,
            "cancel": cancel,
            "child": child,
            "trigger": self.triggers.on_command,
        }

    async def waits(self) -> KeyValue:
        if self._waits is None:
            self._waits = await self.orch.js.key_value(self.orch.names.waits_bucket)
        return self._waits

    async def start(self) -> None:
        await self.router.start()

    async def stop(self) -> None:
        await self.router.stop()

    async def on_control(self, run_id: str, seq: int, event: ev.Event) -> None:
        await on_control(self.orch, run_id, seq, event)


__all__ = ["EventRouter", "Waiting", "cancel_run"]
