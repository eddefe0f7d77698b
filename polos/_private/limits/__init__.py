"""Limits that hold across every process of a namespace: concurrency slots (``slots``), queue
and rate-limit configuration (``config``), the worker's side of admission (``admission``), and
token-aware rate limits for LLM calls (``rates``). The orchestrator's side of admission is
``polos_services.orchestrator.admission``.
"""

from polos._private.limits.admission import (
    NOT_ADMITTED,
    admission_needed,
    declared_queues,
    requeue_for_slot,
    run_holding_slots,
    send_to_admission,
)
from polos._private.limits.config import (
    LimitsConfig,
    put_queue,
    put_rate_limit,
    queue_key,
    queue_stats,
    rate_key,
    register_queues,
)
from polos._private.limits.rates import (
    Booking,
    RateLimited,
    RateStore,
    Reservation,
    TokenLimiter,
    reserve_for_step,
    retry_after_seconds,
    scopes,
)
from polos._private.limits.slots import (
    DEFAULT_KEY,
    Entry,
    SlotLease,
    SlotStore,
    pool_names,
    store_for,
    token,
)

__all__ = [
    "DEFAULT_KEY",
    "NOT_ADMITTED",
    "Booking",
    "Entry",
    "LimitsConfig",
    "RateLimited",
    "RateStore",
    "Reservation",
    "SlotLease",
    "SlotStore",
    "TokenLimiter",
    "admission_needed",
    "declared_queues",
    "pool_names",
    "put_queue",
    "put_rate_limit",
    "queue_key",
    "queue_stats",
    "rate_key",
    "register_queues",
    "requeue_for_slot",
    "reserve_for_step",
    "retry_after_seconds",
    "run_holding_slots",
    "scopes",
    "send_to_admission",
    "store_for",
    "token",
]
