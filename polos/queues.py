"""Queues, concurrency keys and rate limits: limits that hold across the whole system.

    from polos import Queue, RateLimit, workflow

    llm_queue = Queue("llm", concurrency=5, per_key=2,
                      rate_limit=RateLimit(requests_per_minute=600))

    @workflow(queue=llm_queue)
    async def summarize(ctx, doc): ...

    await client.start(summarize, doc, concurrency_key=f"tenant-{tenant_id}")

Every workflow has a default queue (its own name) with no limit. A limited queue admits a run
only when it gets a slot: at most ``concurrency`` runs of the queue are active at once, and at
most ``per_key`` runs of one concurrency key. Only active executions hold slots; a run that
suspends, waits or sleeps gives its slot back and queues again when it wakes. Order: FIFO within
a key, round robin across keys. See docs/concurrency.md.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


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
            raise ValueError(
                f"queue name {self.name!r} must be 1-128 letters, digits, '_' or '-'"
            )
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


async def configure_queue(client: Any, queue: Queue) -> None:
    """Set a queue's limits system-wide from a ``PolosClient`` (no worker needed). Workers also
    publish the ``Queue`` objects of their workflows when they start."""
    from polos._private import limits

    await limits.put_queue(client.js, client.names, queue)


async def configure_rate_limit(client: Any, scope: str, limit: RateLimit | None) -> None:
    """Set (None: remove) the system-wide limit of LLM calls to ``"model:<name>"`` or
    ``"provider:<name>"`` from a ``PolosClient``."""
    from polos._private import limits

    if not (scope.startswith("model:") or scope.startswith("provider:")):
        raise ValueError(f"scope must be 'model:<name>' or 'provider:<name>', got {scope!r}")
    await limits.put_rate_limit(client.js, client.names, scope, limit)


__all__ = ["Queue", "RateLimit", "configure_queue", "configure_rate_limit"]
