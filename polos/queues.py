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

from typing import TYPE_CHECKING

from polos._private import limits
from polos._private.model.values import Queue, RateLimit, queue

if TYPE_CHECKING:
    from polos.client import PolosClient


async def configure_queue(client: PolosClient, queue: Queue) -> None:
    """Set a queue's limits system-wide from a ``PolosClient`` (no worker needed). Workers also
    publish the ``Queue`` objects of their workflows when they start."""
    await limits.put_queue(client.js, client.names, queue)


async def configure_rate_limit(client: PolosClient, scope: str, limit: RateLimit | None) -> None:
    """Set (None: remove) the system-wide limit of LLM calls to ``"model:<name>"`` or
    ``"provider:<name>"`` from a ``PolosClient``."""
    if not (scope.startswith("model:") or scope.startswith("provider:")):
        raise ValueError(f"scope must be 'model:<name>' or 'provider:<name>', got {scope!r}")
    await limits.put_rate_limit(client.js, client.names, scope, limit)


__all__ = ["Queue", "RateLimit", "configure_queue", "configure_rate_limit", "queue"]
