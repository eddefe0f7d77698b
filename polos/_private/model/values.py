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
from typing import TYPE_CHECKING, Any, Generic, TypeVar

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
    schedule: str | None = None
    timezone: str | None = None
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

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
        ``queue``, ``concurrency_key`` (``session_id``, ``user_id``, ``initial_state``,
        ``run_timeout_seconds`` are refused, not supported here yet)."""
        return await client._invoke_definition(self, payload, **options)

    async def run(self, client: Any, payload: Any = None, **options: Any) -> O:
        """Start a run of this workflow and wait for its output (``timeout=600.0`` seconds,
        None: no limit; ``TimeoutError`` after it). Options as ``invoke``."""
        return typing.cast(O, await client._run_definition(self, payload, **options))


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

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise ValueError(f"queue name {self.name!r} must be 1-128 letters, digits, '_' or '-'")
        for name in ("concurrency", "per_key"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"Queue.{name} must be a positive int or None, got {v!r}")

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


__all__ = [
    "DEFAULT_STEP_RETRY",
    "NO_RETRY",
    "Queue",
    "RateLimit",
    "RetryPolicy",
    "StepInfo",
    "WorkflowDefinition",
]
