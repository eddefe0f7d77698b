"""Settings shared by every Polos process: where NATS is, the namespace, and the timings.

Timings are configuration, not constants, so tests can make them tiny and operators can
trade failover speed against heartbeat traffic.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TypeVar

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
_PREFIX_RE = re.compile(r"^[A-Za-z0-9_-]{1,32}$")


_N = TypeVar("_N", int, float)


def _env_number(name: str, default: _N, parse: Callable[[str], _N], what: str) -> _N:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        return parse(raw)
    except ValueError:
        raise ValueError(f"{name} must be {what}, not {raw!r}") from None


def _env_float(name: str, default: float) -> float:
    return _env_number(name, default, float, "a number of seconds")


def _env_int(name: str, default: int) -> int:
    return _env_number(name, default, int, "a whole number")


@dataclass(frozen=True)
class Settings:
    """Connection and timing settings. Every field can be set from a ``POLOS_*`` variable."""

    nats_url: str = field(
        default_factory=lambda: os.environ.get("POLOS_NATS_URL", DEFAULT_NATS_URL)
    )
    # Namespaces every subject, stream and bucket, so tenants and tests share one server.
    prefix: str = field(default_factory=lambda: os.environ.get("POLOS_PREFIX", "polos"))
    # How long a task may go without a heartbeat before JetStream gives it to another worker.
    # This bounds failover time after a worker dies: ack_wait + one pull.
    task_ack_wait: float = field(default_factory=lambda: _env_float("POLOS_TASK_ACK_WAIT", 3.0))
    heartbeat_interval: float = field(
        default_factory=lambda: _env_float("POLOS_HEARTBEAT_INTERVAL", 1.0)
    )
    # A worker's registration expires this long after its last heartbeat.
    worker_ttl: float = field(default_factory=lambda: _env_float("POLOS_WORKER_TTL", 10.0))
    # Retry back-offs at most this long wait inside the worker; longer ones in the scheduler.
    local_retry_limit: float = field(
        default_factory=lambda: _env_float("POLOS_LOCAL_RETRY_LIMIT", 30.0)
    )
    # An LLM step whose tokens are there within this many seconds waits for them inside the
    # worker; a longer wait suspends the run (kind "rate") until they are, holding no worker.
    rate_wait_limit: float = field(default_factory=lambda: _env_float("POLOS_RATE_WAIT_LIMIT", 1.0))
    request_timeout: float = field(default_factory=lambda: _env_float("POLOS_REQUEST_TIMEOUT", 5.0))
    # How long a command, control event or timer handed to an orchestrator or scheduler
    # instance that then died waits before another instance gets it. Handlers take
    # milliseconds; this only bounds recovery after a crash.
    service_ack_wait: float = field(
        default_factory=lambda: _env_float("POLOS_SERVICE_ACK_WAIT", 10.0)
    )
    # A concurrency slot's lease: a worker that dies holding one gives it back this long after
    # its last renewal (renewed every third of it while the run executes).
    slot_lease: float = field(default_factory=lambda: _env_float("POLOS_SLOT_LEASE", 30.0))
    replicas: int = field(default_factory=lambda: _env_int("POLOS_REPLICAS", 1))
    # The span follower's back-off while its exporter (an OTLP collector) refuses spans: the
    # first retry after this long, doubling up to the max.
    telemetry_retry_initial: float = field(
        default_factory=lambda: _env_float("POLOS_TELEMETRY_RETRY_INITIAL", 1.0)
    )
    telemetry_retry_max: float = field(
        default_factory=lambda: _env_float("POLOS_TELEMETRY_RETRY_MAX", 30.0)
    )
    # A lost connection is retried at once, then after waits doubling up to this many seconds.
    reconnect_max_wait: float = field(
        default_factory=lambda: _env_float("POLOS_RECONNECT_MAX_WAIT", 2.0)
    )
    # Seconds the stream keeps message ids for de-duplication of retried appends and commands.
    duplicate_window: float = 600.0
    # The web UI's URL (``polos up`` records it; POLOS_UI_URL): a suspend's data then carries
    # ``_approval_url``, the page where a human answers it (docs/ui.md).
    ui_url: str | None = field(default_factory=lambda: os.environ.get("POLOS_UI_URL") or None)
    # Replay snapshots (a cache of a run's folded state, docs/architecture.md): a worker writes
    # one, in the background, each time a run it executes has this many events more than its
    # last snapshot covers, and when such a run suspends. 0: no snapshots.
    snapshot_events: int = field(default_factory=lambda: _env_int("POLOS_SNAPSHOT_EVENTS", 1000))
    # How long the orchestrator holds a run's RunRequested or RunClaimed for its next control
    # event, to write the run index once for both (the index is a projection: it is this much
    # late at most; 0 writes every event at once). Last: positional arguments keep their places.
    index_window: float = field(default_factory=lambda: _env_float("POLOS_INDEX_WINDOW", 0.05))
    # How long a busy connection (several requests awaiting their answers) holds what it has
    # to send, so that one socket write carries what its tasks publish meanwhile: on a loaded
    # machine a write is worth tens of microseconds of CPU on each side. A connection with
    # fewer requests in flight writes at once (a sequential run waits for nothing). 0: never.
    write_coalesce: float = field(
        default_factory=lambda: _env_float("POLOS_WRITE_COALESCE", 0.0005)
    )
    # The first threshold of Python's cyclic garbage collector in a Polos service process
    # (``polos up``, the orchestrator, the scheduler, ``polos worker``): container objects
    # allocated between two young collections. Python's 700 made a busy orchestrator collect
    # its young objects 185 times a second and its whole heap (the run index cache) one and a
    # half times a second, 65 ms each with nothing else running. 0: Python's own thresholds. A
    # process that embeds a Worker keeps its own collector.
    gc_threshold: int = field(default_factory=lambda: _env_int("POLOS_GC_THRESHOLD", 50_000))
    # How many messages a connection buffers before it writes them itself, without waiting for
    # its flusher task: with many tasks publishing in one turn of the event loop (a worker's
    # runs, each resumed by its ack) the flusher would send them all in one write after the
    # turn, nats-server would answer them all at once, and the two processes would take turns
    # instead of working at the same time. 0: the flusher writes everything.
    write_batch: int = field(default_factory=lambda: _env_int("POLOS_WRITE_BATCH", 32))

    def __post_init__(self) -> None:
        if not _PREFIX_RE.match(self.prefix):
            raise ValueError(
                f"prefix {self.prefix!r} must be 1-32 characters of letters, digits, '_' or '-'"
            )
        if self.write_batch < 0:
            raise ValueError(
                f"write_batch (POLOS_WRITE_BATCH) must be 0 (the flusher writes everything) "
                f"or more, not {self.write_batch}"
            )
        if self.gc_threshold < 0:
            raise ValueError(
                f"gc_threshold (POLOS_GC_THRESHOLD) must be 0 (Python's own) or more, "
                f"not {self.gc_threshold}"
            )

    def to_env(self) -> dict[str, str]:
        """These settings as the ``POLOS_*`` variables another process reads them from."""
        return {
            "POLOS_NATS_URL": self.nats_url,
            "POLOS_PREFIX": self.prefix,
            "POLOS_TASK_ACK_WAIT": str(self.task_ack_wait),
            "POLOS_HEARTBEAT_INTERVAL": str(self.heartbeat_interval),
            "POLOS_WORKER_TTL": str(self.worker_ttl),
            "POLOS_LOCAL_RETRY_LIMIT": str(self.local_retry_limit),
            "POLOS_RATE_WAIT_LIMIT": str(self.rate_wait_limit),
            "POLOS_REQUEST_TIMEOUT": str(self.request_timeout),
            "POLOS_SERVICE_ACK_WAIT": str(self.service_ack_wait),
            "POLOS_SLOT_LEASE": str(self.slot_lease),
            "POLOS_SNAPSHOT_EVENTS": str(self.snapshot_events),
            "POLOS_INDEX_WINDOW": str(self.index_window),
            "POLOS_WRITE_COALESCE": str(self.write_coalesce),
            "POLOS_GC_THRESHOLD": str(self.gc_threshold),
            "POLOS_WRITE_BATCH": str(self.write_batch),
            "POLOS_REPLICAS": str(self.replicas),
            "POLOS_TELEMETRY_RETRY_INITIAL": str(self.telemetry_retry_initial),
            "POLOS_TELEMETRY_RETRY_MAX": str(self.telemetry_retry_max),
            "POLOS_RECONNECT_MAX_WAIT": str(self.reconnect_max_wait),
            **({"POLOS_UI_URL": self.ui_url} if self.ui_url else {}),
        }

    def with_(self, **changes: object) -> Settings:
        return replace(self, **changes)  # type: ignore[arg-type]


__all__ = ["DEFAULT_NATS_URL", "Settings"]
