"""One execution of one run on a worker: replay, steps, fenced appends, determinism checks.

The history a worker loaded is the truth up to ``last_seq``. Each step either finds its key in
that history (replay: return the recorded outcome, run nothing) or runs and appends exactly one
event fenced on ``last_seq``. If another writer moved the history on, the append fails with
``FencedOut`` and this execution stops: it no longer owns the run.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import time
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from polos import history as ev
from polos._private.model.values import DEFAULT_STEP_RETRY, RetryPolicy, StepInfo
from polos._private.run.waits import retry_later
from polos._private.store import FencedOut, Names, append
from polos._private.store.snapshots import NOT_RESTORED, RestoredSteps
from polos.converter import from_json, return_type, to_json
from polos.errors import NonDeterminismError, SerializationError, StepFailedError

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS
    from nats.js import JetStreamContext

    from polos._private.model.values import WorkflowDefinition
    from polos.config import Settings

_current_step: contextvars.ContextVar[StepInfo | None] = contextvars.ContextVar(
    "polos_current_step", default=None
)


# The step a tool call runs in (``<agent key>/tool/<n>/<name>``): the tool's own steps (its
# ``ctx.step`` calls, hooks, approval) are recorded under it, so parallel tool calls never share
# a key, and replay finds them before the tool call itself is recorded.
step_scope: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "polos_step_scope", default=None
)


def current_step() -> StepInfo | None:
    """Inside a step function: the run id, step key, attempt and idempotency key."""
    return _current_step.get()


_WOKEN_WITH_OUTCOME = frozenset({"suspend", "event", "sleep", "child"})
STATE_PREFIX = "state@"  # the key of a ``ctx.state`` snapshot: ``state@<step it follows>``
TRACEBACK_LIMIT = 8192  # the last characters of a traceback kept with a failure


def error_info(
    exc: BaseException, *, step: str | None = None, retryable: bool = True
) -> dict[str, Any]:
    tb = "".join(traceback.format_exception(exc))
    return {
        "type": type(exc).__name__,
        "message": str(exc),
        "step": step,
        "retryable": retryable,
        # Where it happened, for whoever reads the failure (`polos show`, the UI).
        "traceback": tb[-TRACEBACK_LIMIT:],
    }


def _fn_info(fn: Callable[..., Any]) -> tuple[str, Any]:
    """A step function's name (the determinism check's) and return type (replay's), kept in
    ``_FNS``: asked for on every step and every replayed one, which look there first."""
    target = getattr(fn, "__wrapped__", fn)
    name = str(getattr(target, "__qualname__", None) or getattr(target, "__name__", repr(target)))
    info = (name, return_type(fn))
    try:
        if len(_FNS) >= 4096:  # bound methods of many objects: keep it bounded
            _FNS.clear()
        _FNS[fn] = info
    except TypeError:  # not hashable
        pass
    return info


_FNS: dict[Any, tuple[str, Any]] = {}
# Return types whose recorded JSON is the value itself when it has exactly that type: replay
# returns it without a validator (the re-walk of a long run is a loop over its steps).
_NATIVE: frozenset[Any] = frozenset({int, str, float, bool})
# What ``replay_run`` answers for a step that is not recorded: it is to run.
NEW_STEP: Any = object()


def _typed(output: Any, tp: Any) -> Any:
    """A recorded output typed again by its step function's return annotation ``tp``."""
    if tp is None or (tp in _NATIVE and type(output) is tp):
        return output
    return from_json(output, tp)


# How many event-loop turns a new step waits for sibling branches to consume their recorded steps
# before deciding the code no longer asks for them. Replayed steps return without suspending, so
# a branch walks all its recorded steps in one turn; a few turns cover nested gathers.
_QUIESCE_TURNS = 25


class RunExecution:
    """The state and the write path of one run while a worker holds it."""

    def __init__(
        self,
        *,
        js: JetStreamContext,
        nc: NATS,
        names: Names,
        settings: Settings,
        workflow: WorkflowDefinition[Any, Any],
        state: ev.RunState,
        worker_id: str,
    ) -> None:
        self.js = js
        self.nc = nc
        self.names = names
        self.settings = settings
        self.workflow = workflow
        self.state = state
        self.worker_id = worker_id
        self.run_id = state.run_id
        self._lock = asyncio.Lock()
        self._counts: dict[str, int] = {}  # how many times each key was asked for (step_id)
        self._auto: dict[str, int] = {}
        # Steps recorded before this execution started: what replay must walk through, and
        # those of them the code has not asked for yet (a set: ``is_replaying`` is asked before
        # every new step, so it must not walk the whole history each time).
        self._replay_keys: list[str] = list(state.step_order)
        # A workflow with a ``state_schema``: ``ctx.state``, and its last recorded snapshot.
        # Snapshots (``state@<step>``) are not steps the code asks for: replay restores them
        # beside the step they follow (``recorded``), so they are left out of the replay keys.
        self.user_state: Any = None
        self._last_state: Any = None
        if workflow.state_schema is not None:
            self._replay_keys = [k for k in self._replay_keys if not k.startswith(STATE_PREFIX)]
        # The steps of a replay snapshot, whose rows ``replay_run`` reads without building
        # events.
        self._restored = state.steps if isinstance(state.steps, RestoredSteps) else None
        # The re-walk of a run restored from a snapshot, while the code asks for its recorded
        # ``ctx.step.run`` steps in their recorded order, each by its own key (as a loop of
        # steps does): how many it asked for so far, not yet taken out of ``_pending`` nor
        # counted in ``_counts``. Each is then its key's first use (step ids are unique and
        # nothing else asked for a key yet), so the re-walk goes down the recorded keys
        # without a lookup per step. Anything else that reads either settles them first and
        # ends it (-1) for this execution; a workflow with a ``state_schema`` never has one
        # (its replayed steps restore ``ctx.state``).
        self._streak = 0 if self._restored is not None and workflow.state_schema is None else -1
        # See ``_unconsumed``; with a streak, made when it ends, of the steps it did not walk.
        self._pending: set[str] = set() if self._streak == 0 else set(self._replay_keys)
        # A tool call's own steps (``<tool step>/<key>``), by tool step: a replayed tool call
        # returns its recorded result without asking for them again.
        # Built on the first replayed tool call (most runs have none).
        self._nested: dict[str, list[str]] | None = None
        self.appends = 0
        # The event at ``state.last_seq`` when this execution appended it, and what is told of
        # each append (the worker's snapshot schedule; it must not await).
        self.last_event: ev.Event | None = None
        self.on_record: Callable[[RunExecution], None] | None = None
        # The run's replay snapshot as this execution knows it: how many events the newest one
        # covers, and whether the run has one (to remove it when the run ends).
        self.snapshot_covered = 0
        self.snapshot_known = False
        self._patches: dict[str, bool] = {}
        # Steps running user code right now: a wait must let them finish and record before the
        # run suspends, or their completed work would be lost with the suspension.
        self.inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        # The run's claim when it is appended while the execution starts (``begin_claim``).
        self._claim: asyncio.Task[int] | None = None
        self._claim_attempt = 0

    # ------------------------------------------------------------------ identity

    @property
    def attempt(self) -> int:
        # With its claim in flight (``begin_claim``) the execution is already that attempt.
        return self._claim_attempt if self._claim is not None else self.state.attempt

    @property
    def parent_run_id(self) -> str | None:
        return self.state.requested.parent_run_id if self.state.requested else None

    @property
    def is_replaying(self) -> bool:
        return bool(self._unconsumed)

    @property
    def _unconsumed(self) -> set[str]:
        """The recorded steps the code has not asked for yet."""
        if self._streak >= 0:
            self._settle()
        return self._pending

    def _settle(self) -> None:
        """End the in-order re-walk (``_streak``): its steps are asked for, each once."""
        walked = self._streak
        self._streak = -1
        self._pending = set(self._replay_keys[walked:])
        self._counts.update(dict.fromkeys(self._replay_keys[:walked], 1))

    # ------------------------------------------------------------------ the write path

    def begin_claim(self, claim: ev.RunClaimed, msg_id: str) -> None:
        """Append the run's claim without waiting for it, so that the re-walk of its recorded
        steps (CPU, no writes) goes on during the round trip. Until it has landed nothing else
        is written and no new step runs user code (``claimed``); ``attempt`` is the claim's."""
        self._claim_attempt = claim.attempt
        self._claim = asyncio.ensure_future(self._append(claim, msg_id))
        # Awaited by whoever writes or runs next; retrieved here too, for an execution that
        # ends before either (a cancel), so that its failure is not reported as unretrieved.
        self._claim.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def claimed(self) -> None:
        """Until the claim begun by ``begin_claim`` has landed; raises what it raised
        (``FencedOut``: the run moved on before it, and is not this execution's)."""
        claim = self._claim
        if claim is not None:
            await asyncio.shield(claim)
            self._claim = None

    @property
    def claim_refused(self) -> bool:
        """Whether the claim begun by ``begin_claim`` found the run moved on."""
        claim = self._claim
        return (
            claim is not None
            and claim.done()
            and not claim.cancelled()
            and isinstance(claim.exception(), FencedOut)
        )

    async def record(self, event: ev.Event, msg_id: str) -> int:
        """Append one event, fenced on the history this execution has seen."""
        if self._claim is not None:
            await self.claimed()
        if self.user_state is not None:
            await self._snapshot_state(event)
        return await self._append(event, msg_id)

    async def _append(self, event: ev.Event, msg_id: str) -> int:
        async with self._lock:
            seq = await append(
                self.js,
                self.names,
                self.run_id,
                event,
                expected_last_seq=self.state.last_seq,
                msg_id=msg_id,
                timeout=self.settings.request_timeout,
            )
            self.state.apply(seq, event)
            self.appends += 1
            self.last_event = event
            if self.on_record is not None:
                self.on_record(self)
            return seq

    # ------------------------------------------------------------------ workflow state

    def init_state(self) -> Any:
        """``ctx.state`` at the start of an execution: the run's ``initial_state`` (or the
        schema's defaults), replaced at each replayed step by the snapshot recorded there."""
        schema = self.workflow.state_schema
        assert schema is not None
        req = self.state.requested
        self.user_state = schema.model_validate((req.initial_state if req else None) or {})
        self._last_state = to_json(self.user_state, what="the workflow state")
        return self.user_state

    async def _snapshot_state(self, event: ev.Event) -> None:
        """At a step boundary (a step's outcome, a suspension, the run's end): record the state
        when it changed since the last snapshot, as the step ``state@<boundary>``."""
        if isinstance(event, (ev.StepCompleted, ev.StepFailed)):
            if event.kind == "state":
                return
            boundary = event.key
        elif isinstance(event, ev.RunSuspended) and event.kind in _WOKEN_WITH_OUTCOME:
            # The step's outcome comes with the wake (no record here on the next execution):
            # the snapshot beside it is the one taken now. A retry or rate wait is not such a
            # boundary: its step records itself once it ran.
            boundary = event.step
        elif isinstance(event, (ev.RunCompleted, ev.RunFailed)):
            boundary = "end"
        else:
            return
        dump = to_json(self.user_state, what="the workflow state (ctx.state)")
        key = f"{STATE_PREFIX}{boundary}"
        if dump == self._last_state or key in self.state.steps:
            return  # unchanged, or recorded before a crash that kept the step from recording
        await self._append(
            ev.StepCompleted(key=key, kind="state", output=dump), msg_id=f"{self.run_id}/s/{key}"
        )
        self._last_state = dump

    def _restore_state(self, step_id: str) -> None:
        snap = self.state.steps.get(f"{STATE_PREFIX}{step_id}")
        if isinstance(snap, ev.StepCompleted) and self.workflow.state_schema is not None:
            self.user_state = self.workflow.state_schema.model_validate(snap.output)
            self._last_state = snap.output

    # ------------------------------------------------------------------ keys and replay

    def step_id(self, key: str | None, kind: str) -> str:
        """The key a step is recorded under. A key used again in one run gets ``#2``, ``#3``."""
        scope = step_scope.get()
        if key is None:
            counter = f"{scope}/{kind}" if scope else kind
            n = self._auto.get(counter, 0) + 1
            self._auto[counter] = n
            key = f"{kind}#{n}"
        if scope:
            key = f"{scope}/{key}"
        if not key or len(key) > 256:
            raise ValueError(f"step key must be 1-256 characters, got {key!r}")
        if self._streak >= 0:
            self._settle()
        n = self._counts.get(key, 0) + 1
        self._counts[key] = n
        return key if n == 1 else f"{key}#{n}"

    def next_step_id(self, key: str) -> str:
        """The key the next step asking for ``key`` will be recorded under (``step_id``
        without taking it)."""
        scope = step_scope.get()
        if scope:
            key = f"{scope}/{key}"
        if self._streak >= 0:
            self._settle()
        n = self._counts.get(key, 0) + 1
        return key if n == 1 else f"{key}#{n}"

    def recorded(
        self, step_id: str, kind: str, name: str | None
    ) -> ev.StepCompleted | ev.StepFailed | None:
        found = self.state.steps.get(step_id)
        if found is None:
            return None
        if found.kind != kind or (
            name is not None and found.name is not None and found.name != name
        ):
            raise NonDeterminismError(
                f"run {self.run_id}: step {step_id!r} is recorded as {found.kind} "
                f"{found.name or ''} but the code now asks for {kind} {name or ''} "
                "- the workflow code changed incompatibly since this run started"
            )
        self._unconsumed.discard(step_id)
        if kind == "tool":
            self._unconsumed.difference_update(self._nested_steps().get(step_id, ()))
        if self.user_state is not None:
            self._restore_state(step_id)
        return found

    def _nested_steps(self) -> dict[str, list[str]]:
        if self._nested is None:
            self._nested = {}
            for k in self._replay_keys:
                parts = k.split("/")
                for i in range(1, len(parts)):
                    self._nested.setdefault("/".join(parts[:i]), []).append(k)
        return self._nested

    async def check_new_step(self, step_id: str) -> None:
        """A step not in the history may only run once every recorded step was asked for -
        but for its own nested steps (``<step_id>/...``, a tool call's), which it asks for
        while it runs."""
        if self._claim is not None:
            await self.claimed()  # user code runs only in an execution that owns the run
        nested = f"{step_id}/"
        for _ in range(_QUIESCE_TURNS):
            if not self.is_replaying or all(k.startswith(nested) for k in self._unconsumed):
                return
            await asyncio.sleep(0)
        missing = [
            k for k in self._replay_keys if k in self._unconsumed and not k.startswith(nested)
        ]
        if missing:
            raise NonDeterminismError(
                f"run {self.run_id}: the code asks for new step {step_id!r} where the history "
                f"holds step {missing[0]!r}, which the code no longer reaches "
                "- the workflow code changed incompatibly since this run started"
            )

    def check_all_replayed(self) -> None:
        missing = [k for k in self._replay_keys if k in self._unconsumed]
        if missing:
            raise NonDeterminismError(
                f"run {self.run_id}: the workflow returned without reaching recorded step "
                f"{missing[0]!r} - the workflow code changed incompatibly since this run started"
            )

    # ------------------------------------------------------------------ steps

    async def patched(self, patch_id: str) -> bool:
        """Versioning: True where this run takes the new code path, False where its history was
        written by code without the patch. A True is recorded (a ``patch`` step), so the run
        keeps its answer on every replay; the same id asked again gives the same answer."""
        if patch_id in self._patches:
            return self._patches[patch_id]
        if not patch_id or len(patch_id) > 200:
            raise ValueError(f"patch id must be 1-200 characters, got {patch_id!r}")
        step_id = f"patch:{patch_id}"
        if self.recorded(step_id, "patch", None) is not None:
            value = True
        else:
            # Let sibling branches consume their recorded steps first (as check_new_step does).
            for _ in range(_QUIESCE_TURNS):
                if not self.is_replaying:
                    break
                await asyncio.sleep(0)
            # History that goes on past this point without the marker came from the old code.
            value = not self.is_replaying
            if value:
                await self.record(
                    ev.StepCompleted(key=step_id, kind="patch", output=True),
                    msg_id=f"{self.run_id}/s/{step_id}",
                )
        self._patches[patch_id] = value
        return value

    async def record_value(
        self, key: str | None, kind: ev.StepKind, make: Callable[[], Any]
    ) -> Any:
        step_id = self.step_id(key, kind)
        found = self.recorded(step_id, kind, None)
        if isinstance(found, ev.StepCompleted):
            return found.output
        await self.check_new_step(step_id)
        value = make()
        await self.record(
            ev.StepCompleted(key=step_id, kind=kind, output=value),
            msg_id=f"{self.run_id}/s/{step_id}",
        )
        return value

    async def run_step(
        self,
        key: str,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        retry: RetryPolicy | None,
    ) -> Any:
        step_id, name, out = self.replay_run(key, fn)
        if out is not NEW_STEP:
            return out
        return await self.run_new(step_id, name, fn, args, kwargs, retry)

    def replay_run(self, key: str, fn: Callable[..., Any]) -> tuple[str, str, Any]:
        """A ``ctx.step.run(key, fn)``: the step id it takes, ``fn``'s name and the recorded
        output typed by ``fn``'s return annotation, or ``NEW_STEP`` when the step is to run
        (``run_new``); a recorded failure raises. Not a coroutine: replaying a long run is a
        loop of these, and each call is most of its cost."""
        try:
            name, tp = _FNS[fn]
        except (KeyError, TypeError):
            if not callable(fn):
                raise TypeError(
                    f"ctx.step.run({key!r}, ...) needs a callable, got {fn!r}"
                ) from None
            name, tp = _fn_info(fn)
        streak = self._streak
        if streak >= 0:
            keys = self._replay_keys
            if streak < len(keys) and keys[streak] == key and step_scope.get() is None:
                assert self._restored is not None
                out = self._restored.completed_at(streak, name)
                if out is not NOT_RESTORED:
                    self._streak = streak + 1
                    # ``_typed`` inline: this is the loop of a long run's re-walk.
                    if tp is None or (tp in _NATIVE and type(out) is tp):
                        return key, name, out
                    return key, name, from_json(out, tp)
        step_id = self.step_id(key, "run")
        restored = self._restored
        if restored is not None:
            # A step restored from a replay snapshot and not asked for yet: its row holds what
            # replay needs, without building its event.
            out = restored.completed(step_id, name)
            if out is not NOT_RESTORED:
                self._pending.discard(step_id)
                if self.user_state is not None:
                    self._restore_state(step_id)
                return step_id, name, _typed(out, tp)
        found = self.recorded(step_id, "run", name)
        if found is None:
            return step_id, name, NEW_STEP
        if type(found) is ev.StepCompleted:
            return step_id, name, _typed(found.output, tp)
        assert isinstance(found, ev.StepFailed)
        raise StepFailedError(
            step_id,
            str(found.error.get("type")),
            str(found.error.get("message")),
            found.attempts,
        )

    async def run_new(
        self,
        step_id: str,
        name: str,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        retry: RetryPolicy | None,
    ) -> Any:
        """Run the step ``replay_run`` found new, then record its outcome."""
        await self.check_new_step(step_id)
        policy = retry or DEFAULT_STEP_RETRY
        attempt = self.state.attempt_failures.get(step_id, 0)
        self.inflight += 1
        self._idle.clear()
        try:
            return await self._attempts(step_id, name, fn, args, kwargs, policy, attempt)
        finally:
            self.inflight -= 1
            if self.inflight == 0:
                self._idle.set()

    async def wait_idle(self) -> None:
        """Until no step of this execution is running user code."""
        while self.inflight:
            await self._idle.wait()

    async def _attempts(
        self,
        step_id: str,
        name: str,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        policy: RetryPolicy,
        attempt: int,
    ) -> Any:
        while True:
            attempt += 1
            started = time.time()
            t0 = time.perf_counter()
            token = _current_step.set(StepInfo(self.run_id, step_id, attempt))
            try:
                result = await _call(fn, args, kwargs)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if policy.retries(exc, attempt):
                    await self._retry_later(step_id, name, attempt, exc, policy.delay(attempt))
                    continue
                await self._record_failure(step_id, name, attempt, exc)
                raise StepFailedError(step_id, type(exc).__name__, str(exc), attempt) from exc
            finally:
                _current_step.reset(token)
            duration = (time.perf_counter() - t0) * 1000
            try:
                output = to_json(result, what=f"the output of step {step_id!r}")
            except SerializationError as exc:
                await self._record_failure(step_id, name, attempt, exc)
                raise StepFailedError(step_id, "SerializationError", str(exc), attempt) from exc
            await self.record(
                ev.StepCompleted(
                    key=step_id,
                    kind="run",
                    name=name,
                    output=output,
                    attempts=attempt,
                    started_at=started,
                    duration_ms=round(duration, 3),
                ),
                msg_id=f"{self.run_id}/s/{step_id}",
            )
            return result

    async def _retry_later(
        self, step_id: str, name: str, attempt: int, exc: Exception, delay: float
    ) -> None:
        """Record a failed attempt that will be tried again after ``delay``, and wait for it:
        here for a short back-off, in the scheduler for a long one (the run holds no worker)."""
        await self.record(
            ev.StepAttemptFailed(
                key=step_id,
                kind="run",
                name=name,
                attempt=attempt,
                error=error_info(exc, step=step_id),
                retry_in=delay,
            ),
            msg_id=f"{self.run_id}/a/{step_id}/{attempt}",
        )
        if delay > self.settings.local_retry_limit:
            retry_later(self, step_id, attempt, delay)  # raises Suspend
        await asyncio.sleep(delay)

    async def _record_failure(self, step_id: str, name: str, attempt: int, exc: Exception) -> None:
        """Record that the step failed for good (its last attempt, or an output that is not
        JSON): replay raises the same ``StepFailedError`` from it."""
        await self.record(
            ev.StepFailed(
                key=step_id,
                kind="run",
                name=name,
                error=error_info(exc, step=step_id, retryable=False),
                attempts=attempt,
            ),
            msg_id=f"{self.run_id}/s/{step_id}",
        )


async def _call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - async callable objects
    ):
        return await fn(*args, **kwargs)
    # A sync function runs in a thread so the event loop keeps heartbeating; to_thread copies
    # the context, so current_step() works inside it.
    result = await asyncio.to_thread(fn, *args, **kwargs)
    if inspect.isawaitable(result):
        return await result
    return result
