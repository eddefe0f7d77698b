"""A run's history: every fact Polos records, and the fold that turns them into a run's state.

``PolosClient.history(run_id)`` returns these events with their stream sequences. (The name
``polos.events`` is kept for the publish/stream API of the original Polos SDK.)

Events are immutable and named in the past tense. A run's state is never stored: it is a
fold (`RunState.apply`) over the events of the run's history, in stream order, with a
sequence check so that a gap or a reordering is an error instead of a silent mistake.

On the wire an event is one JSON object: ``{"t": "<EventName>", ...fields}``. Fields hold
only JSON values (the converter turned user objects into JSON before the event was built),
so encoding is a single ``orjson.dumps``.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, get_args

import orjson

JSON = Any  # a value orjson can encode: dict, list, str, int, float, bool, None

# What a run is doing, as its history says (``RunState.status``, the run index, ``polos runs``).
RunStatus = Literal["unknown", "queued", "running", "suspended", "completed", "failed", "cancelled"]
RUN_STATUSES: tuple[RunStatus, ...] = get_args(RunStatus)
# What a recorded step was (``StepCompleted.kind``): the ``ctx.step`` call that made it.
StepKind = Literal[
    "run",
    "now",
    "uuid",
    "random",
    "patch",
    "suspend",
    "event",
    "sleep",
    "child",
    "invoke",
    "llm",
    "tool",
    "publish",
    "state",
]
# What a suspended run waits for (``RunSuspended.kind``): a resume, an event, a timer, its
# children, a retry back-off, a concurrency slot, a rate (a queue's, or an LLM step's tokens).
WaitKind = Literal["suspend", "event", "sleep", "child", "retry", "slot", "rate"]
# Who asked for a run (``RunRequested.source``).
RunSource = Literal["client", "raw", "child", "event", "schedule"]


def _now() -> float:
    return time.time()


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """Base of every recorded fact. ``at`` is the wall-clock time it was recorded (epoch s)."""

    KIND: ClassVar[str] = "ctl"  # the history subject kind it is appended to: ctl or step
    at: float = field(default_factory=_now)


@dataclass(frozen=True, slots=True, kw_only=True)
class ErrorInfo:
    """A failure, as data: the exception's type name, its message and where it came from."""

    type: str
    message: str
    step: str | None = None
    details: JSON = None
    retryable: bool = True


# --------------------------------------------------------------------------- control events


@dataclass(frozen=True, slots=True, kw_only=True)
class RunRequested(Event):
    run_id: str
    workflow: str
    input: JSON = None
    queue: str | None = None
    concurrency_key: str | None = None
    parent_run_id: str | None = None
    parent_step: str | None = None
    root_run_id: str | None = None
    trace_id: str | None = None
    source: RunSource = "client"
    # Who the run is for (children inherit them), the root's workflow, and the first value of
    # ``ctx.state`` (a workflow with a ``state_schema``).
    session_id: str | None = None
    user_id: str | None = None
    root_workflow: str | None = None
    initial_state: JSON = None


@dataclass(frozen=True, slots=True, kw_only=True)
class RunClaimed(Event):
    """A worker took the run's task; from here on only that worker appends to the run."""

    run_id: str
    worker_id: str
    attempt: int


@dataclass(frozen=True, slots=True, kw_only=True)
class RunCompleted(Event):
    run_id: str
    output: JSON = None


@dataclass(frozen=True, slots=True, kw_only=True)
class RunFailed(Event):
    run_id: str
    error: dict[str, JSON]


@dataclass(frozen=True, slots=True, kw_only=True)
class RunCancelled(Event):
    run_id: str
    reason: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class RunSuspended(Event):
    """The run stopped executing until ``wake`` (a resume, an event, a timer, a child) arrives.

    ``kind`` says what it waits for: suspend | event | sleep | child | retry | slot | rate.
    ``kind="rate"`` at ``step="admission"`` waits for a queue's rate; at an LLM step, for the
    tokens it booked (``data``), until ``wake_at``.
    """

    run_id: str
    step: str
    kind: WaitKind
    data: JSON = None
    topic: str | None = None
    wake_at: float | None = None
    timeout_at: float | None = None
    children: list[str] | None = None
    # kind "event": the events-stream sequence already consumed for this topic by earlier waits
    # of the run (0: none), and the run's start time, from which a first wait reads events.
    cursor: int | None = None
    since: float | None = None
    # The worker that suspended the run writes a replay snapshot covering this event (a long
    # run): a resume can take the run from its control events without asking for it. A hint:
    # a snapshot not (yet) there costs the worker a read of the log, never a wrong replay.
    snapshot: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class RunWoken(Event):
    """Something the run waited for arrived; the orchestrator has re-dispatched it."""

    run_id: str
    step: str
    reason: str
    # The outcome of the awaited step (a resume, an event, a timer, children's results), when
    # the wake carries one: the fold records it as the step's StepCompleted of ``kind``, so
    # replay finds it in the history like any other step. None for a wake without an outcome
    # (a retry back-off ended).
    kind: StepKind | None = None
    output: JSON = None
    workflow: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class RunAdmitted(RunWoken):
    """A run that waited for a concurrency slot (or a queue's rate) got it.

    A kind of ``RunWoken``, so the fold and the index treat it as one (the run is queued for a
    worker again); it names the slot keys its task carries, so a crash between this append and
    the task's publish can be repaired from the log alone.
    """

    queue: str
    concurrency_key: str | None = None
    slots: list[str] = field(default_factory=list)
    lease: float = 30.0


# --------------------------------------------------------------------------- step events


@dataclass(frozen=True, slots=True, kw_only=True)
class StepCompleted(Event):
    KIND: ClassVar[str] = "step"
    key: str
    kind: StepKind
    name: str | None = None  # the function's qualified name, for the determinism check
    output: JSON = None
    attempts: int = 1
    started_at: float | None = None
    duration_ms: float | None = None
    meta: JSON = None


@dataclass(frozen=True, slots=True, kw_only=True)
class StepAttemptFailed(Event):
    KIND: ClassVar[str] = "step"
    key: str
    kind: StepKind
    name: str | None
    attempt: int
    error: dict[str, JSON]
    retry_in: float


@dataclass(frozen=True, slots=True, kw_only=True)
class StepFailed(Event):
    KIND: ClassVar[str] = "step"
    key: str
    kind: StepKind
    name: str | None
    error: dict[str, JSON]
    attempts: int = 1


# --------------------------------------------------------------------------- codec

_REGISTRY: dict[str, type[Event]] = {}

# The subject kinds of a run's history (``<prefix>.run.<id>.<kind>``). The runs stream stores
# only these, and a history is read kind by kind: a new kind must be added here.
HISTORY_KINDS: tuple[str, ...] = ("ctl", "step")


def register(cls: type[Event]) -> type[Event]:
    """Make an event class decodable. Every concrete event in this module is registered."""
    if cls.KIND not in HISTORY_KINDS:
        raise ValueError(f"event {cls.__name__}: KIND {cls.KIND!r} is not one of {HISTORY_KINDS}")
    _REGISTRY[cls.__name__] = cls
    return cls


for _cls in (
    RunRequested,
    RunClaimed,
    RunCompleted,
    RunFailed,
    RunCancelled,
    RunSuspended,
    RunWoken,
    RunAdmitted,
    StepCompleted,
    StepAttemptFailed,
    StepFailed,
):
    register(_cls)


class EventDecodeError(ValueError):
    """A history message that is not a known event: corruption or a newer writer."""


# Field names per event class: ``dataclasses.fields`` builds a tuple on every call, and every
# append and every history message goes through here.
_FIELDS: dict[type[Event], tuple[str, ...]] = {}


def _field_names(cls: type[Event]) -> tuple[str, ...]:
    names = _FIELDS.get(cls)
    if names is None:
        names = _FIELDS[cls] = tuple(f.name for f in dataclasses.fields(cls))
    return names


def encode_dict(event: Event) -> dict[str, JSON]:
    """The event's fields as a dict (without the type tag)."""
    return {name: getattr(event, name) for name in _field_names(type(event))}


def encode(event: Event) -> bytes:
    body: dict[str, JSON] = {"t": type(event).__name__}
    body.update(encode_dict(event))
    return orjson.dumps(body)


def decode(data: bytes) -> Event:
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise EventDecodeError(f"not a Polos event: {data[:200]!r}") from exc
    return decode_body(body, data)


def decode_body(body: Any, raw: bytes | None = None) -> Event:
    """An event from its decoded JSON object (``{"t": <type>, ...fields}``)."""
    try:
        cls = _REGISTRY[body["t"]]
    except (KeyError, TypeError) as exc:
        shown = raw[:200] if raw is not None else repr(body)[:200]
        raise EventDecodeError(f"not a Polos event: {shown!r}") from exc
    names = _field_names(cls)
    try:
        # Fields a newer writer added are ignored, so old readers can read new histories.
        return cls(**{k: v for k, v in body.items() if k in names})
    except TypeError as exc:
        raise EventDecodeError(f"malformed {cls.__name__}: {exc}") from exc


# --------------------------------------------------------------------------- state as a fold

TERMINAL: frozenset[RunStatus] = frozenset({"completed", "failed", "cancelled"})


class SequenceError(RuntimeError):
    """Events were applied out of stream order: the fold refuses rather than guess."""


@dataclass(slots=True)
class RunState:
    """What a run's history says, folded in order. Rebuildable at any time from the log."""

    run_id: str
    last_seq: int = 0
    workflow: str | None = None
    requested: RunRequested | None = None
    status: RunStatus = "unknown"
    attempt: int = 0
    worker_id: str | None = None
    steps: dict[str, StepCompleted | StepFailed] = field(default_factory=dict)
    step_order: list[str] = field(default_factory=list)
    attempt_failures: dict[str, int] = field(default_factory=dict)
    suspended: RunSuspended | None = None
    # The last rate wait of each LLM step (``RunSuspended(kind="rate")``): the tokens it booked,
    # which the step uses once woken instead of taking them again.
    rate_waits: dict[str, RunSuspended] = field(default_factory=dict)
    output: JSON = None
    error: dict[str, JSON] | None = None
    created_at: float | None = None
    updated_at: float | None = None
    events: int = 0
    # Claims of a run that was still running (its worker was lost), not wakes after a wait.
    restarts: int = 0

    @property
    def done(self) -> bool:
        return self.status in TERMINAL

    def apply(self, seq: int, event: Event) -> None:
        if seq <= self.last_seq:
            raise SequenceError(
                f"run {self.run_id}: event {type(event).__name__} at seq {seq} "
                f"is not after seq {self.last_seq}"
            )
        self.last_seq = seq
        self.events += 1
        self.updated_at = event.at
        if isinstance(event, RunRequested):
            self.requested = event
            self.workflow = event.workflow
            self.status = "queued"
            self.created_at = event.at
        elif isinstance(event, RunClaimed):
            if self.status == "running":
                self.restarts += 1  # claimed again while running: the last worker was lost
            self.attempt = event.attempt
            self.worker_id = event.worker_id
            if not self.done:
                self.status = "running"
                self.suspended = None
        elif isinstance(event, (StepCompleted, StepFailed)):
            if event.key not in self.steps:
                self.step_order.append(event.key)
            self.steps[event.key] = event
        elif isinstance(event, StepAttemptFailed):
            self.attempt_failures[event.key] = event.attempt
        elif isinstance(event, RunSuspended):
            self.suspended = event
            if event.kind == "rate" and event.step != "admission":
                self.rate_waits[event.step] = event
            if not self.done:
                self.status = "suspended"
        elif isinstance(event, RunWoken):
            if event.kind is not None and event.step not in self.steps:
                self.step_order.append(event.step)
                self.steps[event.step] = StepCompleted(
                    key=event.step, kind=event.kind, output=event.output, at=event.at
                )
            if not self.done:
                self.status = "queued"
                self.suspended = None
        elif isinstance(event, RunCompleted):
            self.status, self.output = "completed", event.output
        elif isinstance(event, RunFailed):
            self.status, self.error = "failed", event.error
        elif isinstance(event, RunCancelled):
            self.status = "cancelled"

    @classmethod
    def fold(cls, run_id: str, history: list[tuple[int, Event]]) -> RunState:
        state = cls(run_id=run_id)
        for seq, event in history:
            state.apply(seq, event)
        return state


__all__ = [
    "RUN_STATUSES",
    "TERMINAL",
    "ErrorInfo",
    "Event",
    "EventDecodeError",
    "RunAdmitted",
    "RunCancelled",
    "RunClaimed",
    "RunCompleted",
    "RunFailed",
    "RunRequested",
    "RunSource",
    "RunState",
    "RunStatus",
    "RunSuspended",
    "RunWoken",
    "SequenceError",
    "StepAttemptFailed",
    "StepCompleted",
    "StepFailed",
    "StepKind",
    "WaitKind",
    "decode",
    "decode_body",
    "encode",
    "encode_dict",
    "register",
]
