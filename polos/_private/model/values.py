"""The value types user code hands to Polos and every layer reads: a step's retry policy and
what a running step knows of itself, a workflow's definition, queues and rate limits.

Defined here, below every layer that uses them; the public modules (``polos.workflow``,
``polos.queues``) re-export them.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from polos.workflow import WorkflowContext

I = TypeVar("I")  # noqa: E741 - the conventional name for an input type
O = TypeVar("O")  # noqa: E741

_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How a step is retried: ``max_attempts`` in all, waiting ``initial_interval`` seconds and
    multiplying by ``backoff`` (capped at ``max_interval``) between attempts.

    ``retry_on`` lists the exception types that retry; ``non_retryable`` wins over it.
    """

    max_attempts: int = 3
    initial_interval: float = 1.0
    backoff: float = 2.0
    max_interval: float = 60.0
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    non_retryable: tuple[type[BaseException], ...] = ()

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        return float(min(self.max_interval, self.initial_interval * self.backoff ** (attempt - 1)))

    def retries(self, exc: BaseException, attempt: int) -> bool:
        if attempt >= self.max_attempts or isinstance(exc, self.non_retryable):
            return False
        return isinstance(exc, self.retry_on)


DEFAULT_STEP_RETRY = RetryPolicy()
NO_RETRY = RetryPolicy(max_attempts=1)


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """What a running step knows about itself; read it with ``polos.current_step()``."""

    run_id: str
    key: str
    attempt: int

    @property
    def idempotency_key(self) -> str:
        """Stable across retries, replays and workers: pass it to Stripe and friends."""
        return f"{self.run_id}:{self.key}"


@dataclasses.dataclass(eq=False)
class WorkflowDefinition(Generic[I, O]):
    """A registered workflow. Calling it runs the function directly (no durability)."""

    fn: Callable[..., Awaitable[O]]
    name: str
    input_type: Any
    output_type: Any
    takes_input: bool
    queue: str | None = None
    trigger_on_event: str | None = None
    # The declared cron (None: none) and its time zone; ``schedulable`` also for
    # ``schedule=True`` (schedules made through the API only).
    schedule: str | None = None
    timezone: str | None = None
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    description: str | None = None
    schedulable: bool = False
    schedule_key: str | None = None
    # trigger_on_event: how many events one run receives, and how long the first of a batch
    # waits for the others (None: no limit). batch_size 1 without a timeout: one event a run.
    batch_size: int = 1
    batch_timeout_seconds: float | None = None
    on_start: list[Callable[..., Any]] = dataclasses.field(default_factory=list)
    on_end: list[Callable[..., Any]] = dataclasses.field(default_factory=list)
    state_schema: type[BaseModel] | None = None

    async def __call__(self, ctx: WorkflowContext, input: Any = None) -> O:
        if self.takes_input:
            return await self.fn(ctx, input)
        return await self.fn(ctx)

    @property
    def task_queue(self) -> str:
        return self.queue or self.name

    # The original's ``Workflow.invoke`` / ``Workflow.run``: the client (a ``PolosClient`` or a
    # ``Polos``) does the work (``polos/client.py``); here only the delegation, since this
    # layer cannot import the client.

    async def invoke(self, client: Any, payload: Any = None, **options: Any) -> Any:
        """Start a run of this workflow; returns its ``ExecutionHandle`` at once. Options:
        ``queue``, ``concurrency_key``, ``session_id``, ``user_id``, ``initial_state``
        (``run_timeout_seconds`` is refused: runs have no time limit here)."""
        return await client._invoke_definition(self, payload, **options)

    async def run(self, client: Any, payload: Any = None, **options: Any) -> O:
        """Start a run of this workflow and wait for its output (``timeout=600.0`` seconds,
        None: no limit; ``TimeoutError`` after it). Options as ``invoke``."""
        return typing.cast(O, await client._run_definition(self, payload, **options))

    @property
    def id(self) -> str:
        """The registered name (the original SDK's ``Workflow.id``)."""
        return self.name

    # The original SDK's attribute names of the same things.
    @property
    def is_schedulable(self) -> bool:
        return self.schedulable

    @property
    def queue_name(self) -> str | None:
        return self.queue

    @property
    def queue_concurrency_limit(self) -> int | None:
        q = self.options.get("queue_def")
        return q.concurrency if isinstance(q, Queue) else None

    @property
    def batched(self) -> bool:
        """An event trigger that hands each run a list of events (``BatchEventPayload``)."""
        return self.batch_size != 1 or self.batch_timeout_seconds is not None


@dataclass(frozen=True)
class RateLimit:
    """A system-wide rate: requests and/or tokens per minute, as a token bucket.

    Capacity refills continuously; the bucket holds at most ``burst_seconds`` worth of it
    (default a full minute, like the providers' own limits). Lower it for a smoother rate.
    """

    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    burst_seconds: float = 60.0

    def __post_init__(self) -> None:
        for name in ("requests_per_minute", "tokens_per_minute"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ValueError(f"RateLimit.{name} must be > 0 or None, got {v!r}")
        if not self.burst_seconds > 0:
            raise ValueError(f"RateLimit.burst_seconds must be > 0, got {self.burst_seconds!r}")

    @property
    def limited(self) -> bool:
        return bool(self.requests_per_minute or self.tokens_per_minute)

    @property
    def token_capacity(self) -> float:
        return (self.tokens_per_minute or 0.0) * self.burst_seconds / 60.0

    @property
    def request_capacity(self) -> float:
        # At least one request fits, however small the burst.
        return max(1.0, (self.requests_per_minute or 0.0) * self.burst_seconds / 60.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "requests_per_minute": self.requests_per_minute,
            "tokens_per_minute": self.tokens_per_minute,
            "burst_seconds": self.burst_seconds,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RateLimit:
        return cls(
            requests_per_minute=data.get("requests_per_minute"),
            tokens_per_minute=data.get("tokens_per_minute"),
            burst_seconds=float(data.get("burst_seconds") or 60.0),
        )


@dataclass(frozen=True)
class Queue:
    """A named admission queue with system-wide limits.

    ``concurrency``: active runs of the queue at once, across every key (None: no limit).
    ``per_key``: active runs of one ``concurrency_key`` at once (None: no limit).
    ``rate_limit``: how fast runs may be admitted (``requests_per_minute``; a run is a request).
    """

    name: str
    concurrency: int | None = None
    per_key: int | None = None
    rate_limit: RateLimit | None = None
    # The original SDK's name of ``concurrency``: one limit, given either way.
    concurrency_limit: dataclasses.InitVar[int | None] = None

    def __post_init__(self, concurrency_limit: int | None) -> None:
        if concurrency_limit is not None:
            if self.concurrency is not None and self.concurrency != concurrency_limit:
                raise ValueError(
                    f"Queue {self.name!r}: concurrency={self.concurrency!r} and "
                    f"concurrency_limit={concurrency_limit!r} are the same limit; give one"
                )
            object.__setattr__(self, "concurrency", concurrency_limit)
        if not _NAME_RE.match(self.name):
            raise ValueError(f"queue name {self.name!r} must be 1-128 letters, digits, '_' or '-'")
        for name in ("concurrency", "per_key"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"Queue.{name} must be a positive int or None, got {v!r}")

    def __repr__(self) -> str:
        return f"Queue(name={self.name!r}, concurrency_limit={self.concurrency!r})"

    @property
    def limited(self) -> bool:
        return (
            self.concurrency is not None
            or self.per_key is not None
            or (self.rate_limit is not None and bool(self.rate_limit.requests_per_minute))
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "concurrency": self.concurrency,
            "per_key": self.per_key,
            "rate_limit": self.rate_limit.to_dict() if self.rate_limit else None,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Queue:
        rl = data.get("rate_limit")
        return cls(
            name=str(data["name"]),
            concurrency=data.get("concurrency"),
            per_key=data.get("per_key"),
            rate_limit=RateLimit.from_dict(rl) if rl else None,
        )


def queue(name: str, concurrency_limit: int | None = None) -> Queue:
    """The original SDK's helper: ``queue("api-calls", concurrency_limit=5)``."""
    return Queue(name, concurrency=concurrency_limit)


# --------------------------------------------------------------------------- payload types
# The shapes the original SDK hands to workflows (names and fields are its own).


class WorkflowState(BaseModel):
    """Base of a ``state_schema``: ``ctx.state`` is an instance, validated on assignment,
    recorded in the run's history at each step boundary and restored on replay."""

    model_config = ConfigDict(validate_assignment=True)


class EventItem(BaseModel):
    """One event as a triggered run or ``wait_for_event`` sees it."""

    model_config = ConfigDict(extra="ignore")

    id: str
    sequence_id: int
    topic: str
    event_type: str | None = None
    data: Any = None
    created_at: datetime


class EventPayload(EventItem):
    """The input of a ``trigger_on_event`` run (one event a run), and what
    ``ctx.step.wait_for_event`` returns."""


class BatchEventPayload(BaseModel):
    """The input of a ``trigger_on_event`` run with ``batch_size``/``batch_timeout_seconds``:
    its events in stream order."""

    model_config = ConfigDict(extra="ignore")

    events: list[EventItem] = []


class SchedulePayload(BaseModel):
    """The input of a scheduled run. ``timestamp`` is the time the firing was due (not when
    it was handled), ``last_timestamp`` the previous firing's (None for the first),
    ``upcoming`` the next one."""

    model_config = ConfigDict(extra="ignore")

    timestamp: datetime
    last_timestamp: datetime | None = None
    timezone: str = "UTC"
    schedule_id: str
    key: str
    upcoming: datetime | None = None


class BatchWorkflowInput(BaseModel):
    """One child of ``ctx.step.batch_invoke``/``batch_invoke_and_wait``."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    id: str
    payload: Any | None = None
    initial_state: Any | None = None
    run_timeout_seconds: int | None = None


class BatchStepResult(BaseModel):
    """One child's outcome in a batch: ``success`` with ``result``, or ``error``."""

    model_config = ConfigDict(extra="ignore", arbitrary_types_allowed=True)

    workflow_id: str
    success: bool
    result: Any | None = None
    error: str | None = None


# The header carrying an event's type (``EventPayload.event_type``); the body stays the data.
EVENT_TYPE_HEADER = "Polos-Event-Type"


__all__ = [
    "DEFAULT_STEP_RETRY",
    "EVENT_TYPE_HEADER",
    "NO_RETRY",
    "BatchEventPayload",
    "BatchStepResult",
    "BatchWorkflowInput",
    "EventItem",
    "EventPayload",
    "Queue",
    "RateLimit",
    "RetryPolicy",
    "SchedulePayload",
    "StepInfo",
    "WorkflowDefinition",
    "WorkflowState",
    "queue",
]
