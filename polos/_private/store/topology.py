"""The one topology table: every stream, KV bucket and object store of a namespace, with its
configuration and which roles may write, read and delete in it.

Only the service role creates or updates the topology (``ensure_topology``: the orchestrator,
the scheduler, the exporters at start, ``polos up`` before it says it is up, ``polos init``).
Workers and clients never do: they ``check_topology`` once per connection, which turns "not
there" into one line naming what is missing and how to create it, instead of a timeout on a
request their user may not make. ``polos._private.ops.auth`` generates every role's NATS
permissions from ``TOPOLOGY`` and ``CORE_SUBJECTS``, so a new bucket is granted where it is
declared, or nowhere.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RePublish, RetentionPolicy, StorageType, StreamConfig

from polos._private.store.names import Names, kv_stream, object_stream
from polos._private.store.namespace import namespace
from polos.config import Settings
from polos.errors import TopologyMissingError

SERVICE, WORKER, CLIENT = "service", "worker", "client"
ROLES = (SERVICE, WORKER, CLIENT)
Kind = Literal["stream", "kv", "object"]

DAY = 24 * 3600.0
# nats-py's own default for a KV bucket's duplicate window (a TTL shorter than it wins).
KV_DUPLICATE_WINDOW = 120.0

CREATE_HINT = (
    "create it with `polos init` (as the service role), or start `polos up` or any Polos "
    "service (orchestrator, scheduler) against this server"
)


@dataclass(frozen=True)
class Store:
    """One row of the topology: a stream, a KV bucket or an object store."""

    name: str  # the attribute of ``Names`` that names it
    kind: Kind
    what: str  # what it holds, for errors and the docs
    write: tuple[str, ...]  # roles that publish on its subjects (KV puts, object puts)
    read: tuple[str, ...] = ROLES  # roles that read it: direct gets, consumers
    # Roles that delete single messages by sequence (a slot release, a served admission).
    delete_msg: tuple[str, ...] = ()
    # Roles that may write only some of its subjects: role -> those subjects.
    write_only: Mapping[str, Callable[[Names], list[str]]] = field(default_factory=dict)
    subjects: Callable[[Names], list[str]] | None = None  # a stream's subjects
    options: Callable[[Settings], dict[str, Any]] = field(default=lambda s: {})
    # Stored messages the server republishes on a core subject (after the store, never for a
    # refused one): (source filter, destination) of the names.
    republish: Callable[[Names], tuple[str, str]] | None = None

    def bucket(self, names: Names) -> str:
        """Its name as its users say it: a stream's name, or a bucket's."""
        return str(getattr(names, self.name))

    def stream(self, names: Names) -> str:
        """The name of the JetStream stream that holds it."""
        b = self.bucket(names)
        return (
            kv_stream(b) if self.kind == "kv" else object_stream(b) if self.kind == "object" else b
        )

    def stream_subjects(self, names: Names) -> list[str]:
        b = self.bucket(names)
        if self.kind == "kv":
            return [f"$KV.{b}.>"]
        if self.kind == "object":
            return [f"$O.{b}.C.>", f"$O.{b}.M.>"]
        assert self.subjects is not None, f"stream {self.name} declares no subjects"
        return self.subjects(names)

    def writes(self, role: str, names: Names) -> list[str]:
        """The subjects ``role`` may publish on to write here (none: it may not)."""
        if role in self.write:
            b = self.bucket(names)
            return [f"$O.{b}.>"] if self.kind == "object" else self.stream_subjects(names)
        only = self.write_only.get(role)
        return only(names) if only is not None else []

    def label(self, names: Names) -> str:
        kind = {"stream": "stream", "kv": "KV bucket", "object": "object store"}[self.kind]
        return f"{kind} {self.bucket(names)}"

    def config(self, names: Names, settings: Settings) -> StreamConfig:
        """The stream's configuration (a bucket's as nats-py would make it, plus ours)."""
        base: dict[str, Any] = {
            "name": self.stream(names),
            "subjects": self.stream_subjects(names),
            "storage": StorageType.FILE,
            "num_replicas": settings.replicas,
        }
        if self.kind == "stream":
            base.update(
                retention=RetentionPolicy.LIMITS, duplicate_window=settings.duplicate_window
            )
        elif self.kind == "kv":
            # What ``js.create_key_value(KeyValueConfig(history=1, direct=True))`` makes, so a
            # bucket made by an earlier version compares equal.
            base.update(
                retention=RetentionPolicy.LIMITS,
                allow_direct=True,
                allow_rollup_hdrs=True,
                allow_msg_ttl=True,
                deny_delete=True,
                discard=DiscardPolicy.NEW,
                duplicate_window=KV_DUPLICATE_WINDOW,
                max_msgs_per_subject=1,
                max_msgs=-1,
                max_consumers=-1,
            )
        else:  # what ``js.create_object_store`` makes
            base.update(
                discard=DiscardPolicy.NEW, allow_rollup_hdrs=True, allow_direct=True, max_bytes=-1
            )
        base.update(self.options(settings))
        if self.republish is not None:
            src, dest = self.republish(names)
            base["republish"] = RePublish(src=src, dest=dest)
        return StreamConfig(**base)


def _kv_ttl(ttl: float) -> dict[str, Any]:
    return {"max_age": ttl, "duplicate_window": min(KV_DUPLICATE_WINDOW, ttl)}


ANY = ROLES

TOPOLOGY: tuple[Store, ...] = (
    # ------------------------------------------------------------------ streams
    Store(
        "cmd_stream",
        "stream",
        "commands: start, cancel, resume, child runs",
        write=ANY,
        read=(SERVICE,),
        subjects=lambda n: [n.cmd_filter],
        # Kept for the longest wait we promise (a resume may come weeks after the suspend):
        # they are the replayable input of the orchestrator.
        options=lambda s: {"max_age": 90 * DAY, "allow_direct": True},
    ),
    Store(
        "runs_stream",
        "stream",
        "run histories",
        write=(SERVICE, WORKER),
        subjects=lambda n: n.runs_subjects,
        # Batch direct get reads a run's history in one request.
        options=lambda s: {"allow_direct": True},
        # ``result()`` hears a run's end from the stored copy: no read after it.
        republish=lambda n: (n.ctl_filter, n.stored_ctl_subject("{{wildcard(1)}}")),
    ),
    Store(
        "tasks_stream",
        "stream",
        "tasks for workers (a work queue)",
        # A consumer on the work queue takes tasks: a client may only look at it.
        write=(SERVICE,),
        read=(SERVICE, WORKER),
        subjects=lambda n: [n.tasks_filter],
        options=lambda s: {"retention": RetentionPolicy.WORK_QUEUE},
    ),
    Store(
        "events_stream",
        "stream",
        "external events (wait_for_event, triggers)",
        write=ANY,
        subjects=lambda n: [n.events_filter],
        options=lambda s: {"max_age": 90 * DAY, "allow_direct": True},
    ),
    Store(
        "timers_stream",
        "stream",
        "timers and cron schedules (message schedules)",
        write=(SERVICE,),
        write_only={CLIENT: lambda n: [n.cron_filter]},
        subjects=lambda n: [n.timers_filter],
        # Timers are message schedules (server 2.12+): the server fires them itself. A client
        # deletes a schedule by rolling its subject up to a tombstone that expires.
        options=lambda s: {
            "allow_direct": True,
            "allow_rollup_hdrs": True,
            "allow_msg_schedules": True,
            "allow_msg_ttl": True,
        },
    ),
    Store(
        "dlq_stream",
        "stream",
        "dead letters",
        write=(SERVICE, WORKER),
        subjects=lambda n: [n.dlq_filter],
        options=lambda s: {
            "max_age": 30 * DAY,
            "discard": DiscardPolicy.OLD,
            "allow_direct": True,
            "duplicate_window": None,
        },
    ),
    Store(
        "admit_stream",
        "stream",
        "runs waiting for admission to a queue",
        write=(SERVICE,),
        delete_msg=(SERVICE,),
        subjects=lambda n: [n.admit_filter()],
        options=lambda s: {"allow_direct": True, "deny_delete": False},
    ),
    # ------------------------------------------------------------------ KV buckets
    Store("runs_bucket", "kv", "the run index", write=(SERVICE,)),
    Store(
        "workers_bucket",
        "kv",
        "live workers",
        write=(SERVICE, WORKER),
        options=lambda s: _kv_ttl(s.worker_ttl),
    ),
    Store("workflows_bucket", "kv", "registered workflows", write=(SERVICE, WORKER)),
    Store("waits_bucket", "kv", "runs waiting for an event", write=(SERVICE,)),
    Store(
        "slots_bucket",
        "kv",
        "concurrency slots and LLM rate buckets",
        write=(SERVICE, WORKER),
        delete_msg=(SERVICE, WORKER),
        # Written with raw compare-and-set publishes (limits.SlotStore): a release deletes one
        # exact revision (a bucket made by nats-py denies that), leases are per-message TTLs,
        # and no limit markers, so an expired key leaves nothing behind.
        options=lambda s: {
            "deny_delete": False,
            "allow_msg_ttl": True,
            "subject_delete_marker_ttl": None,
            "duplicate_window": 1.0,
        },
    ),
    Store("queues_bucket", "kv", "queue and rate-limit configuration", write=ANY),
    Store("memory_bucket", "kv", "agents' shared memory", write=ANY),
    # Written by agent runs only (a turn is recorded by the run that made it); clients read
    # (the UI, polos.memory.get_session_memory).
    Store("sessions_bucket", "kv", "agents' conversation history", write=(SERVICE, WORKER)),
    Store("telemetry_bucket", "kv", "span followers' positions", write=(SERVICE,)),
    # A cache of long runs' folded state that replay starts from (store/snapshots.py): written
    # and read by the workers that execute runs, removed by the services (cancel, retention).
    Store(
        "snapshots_bucket",
        "kv",
        "replay snapshots of long runs (a cache)",
        write=(SERVICE, WORKER),
        read=(SERVICE, WORKER),
    ),
    # ------------------------------------------------------------------ object stores
    Store(
        "payloads_bucket",
        "object",
        "event fields too large for one message",
        write=ANY,
        options=lambda s: {"description": "Polos: event fields too large for one message"},
    ),
)

BY_NAME: dict[str, Store] = {row.name: row for row in TOPOLOGY}


@dataclass(frozen=True)
class CoreSubject:
    """A core NATS subject (no stream behind it) and who may publish and subscribe on it."""

    subject: Callable[[Names], str]
    what: str
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]


CORE_SUBJECTS: tuple[CoreSubject, ...] = (
    CoreSubject(
        lambda n: n.signal_filter,
        "cancel signals to the worker holding a run",
        publish=(SERVICE,),
        subscribe=(SERVICE, WORKER),
    ),
    CoreSubject(
        lambda n: n.deltas_filter,
        "live LLM text deltas of agents",
        publish=(SERVICE, WORKER),
        subscribe=(SERVICE, CLIENT),
    ),
    # Waiting for a run's end listens to its control subject (besides reading the history).
    CoreSubject(
        lambda n: n.ctl_filter,
        "run control events, as they are appended",
        publish=(),
        subscribe=ANY,
    ),
    # The runs stream's republished control events: only what the stream stored, so no role
    # may publish here (the server's own republish needs no grant).
    CoreSubject(
        lambda n: n.stored_ctl_filter,
        "run control events, once stored",
        publish=(),
        subscribe=ANY,
    ),
    # The web UI (the client role) follows a run page's step results as they are appended:
    # what a client may read from the runs stream anyway.
    CoreSubject(
        lambda n: n.step_filter,
        "run step results, as they are appended",
        publish=(),
        subscribe=(SERVICE, CLIENT),
    ),
)


# --------------------------------------------------------------------------- service role


def _republishes(have: StreamConfig, want: RePublish | None) -> bool:
    """Whether ``have`` republishes as ``want`` says (trivially, when it says nothing)."""
    got = have.republish
    return want is None or (got is not None and (got.src, got.dest) == (want.src, want.dest))


async def _ensure_stream(js: JetStreamContext, cfg: StreamConfig) -> bool:
    """Make the stream or widen it; True once it republishes as ``cfg`` says."""
    # Look before creating: a service restart finds everything there in one request each.
    with contextlib.suppress(nats.js.errors.APIError):
        info = await js.stream_info(str(cfg.name))
        if set(cfg.subjects or []) <= set(info.config.subjects or []):
            if _republishes(info.config, cfg.republish):
                return True
            # Made by an earlier version: add the republish to the config as it is, edits kept.
            info.config.republish = cfg.republish
            await js.update_stream(info.config)
            return True
    try:
        await js.add_stream(cfg)
    except (nats.errors.TimeoutError, TimeoutError) as exc:
        # A user without the right gets no answer at all (the server drops the request).
        raise TimeoutError(
            f"no answer creating stream {cfg.name}: the server is busy, or this user may not "
            f"create streams (only the service role may)"
        ) from exc
    except nats.js.errors.BadRequestError as exc:
        # 10058: exists with a different config. Keep the operator's edits, but widen subjects.
        if exc.err_code != 10058:
            raise
        try:
            await js.update_stream(cfg)
        except nats.js.errors.APIError:
            return cfg.republish is None
    return True


async def ensure_topology(js: JetStreamContext, names: Names, settings: Settings) -> None:
    """Create (or widen) every stream, bucket and object store of the namespace. Idempotent.

    Service role only: other roles may not create streams. Workers and clients call
    ``check_topology``."""
    done = await asyncio.gather(
        *(_ensure_stream(js, row.config(names, settings)) for row in TOPOLOGY)
    )
    ns = namespace(js, names, settings)
    ns.topology_checked = True
    ns.stored_ctl = done[TOPOLOGY.index(BY_NAME["runs_stream"])]


# --------------------------------------------------------------------------- workers, clients


def missing(names: Names, name: str) -> TopologyMissingError:
    """The error for one row found missing where it is used (``name``: its ``Names`` attribute)."""
    row = BY_NAME[name]
    return TopologyMissingError(
        f"{row.label(names)} ({row.what}) is missing on this server: {CREATE_HINT}"
    )


async def check_topology(js: JetStreamContext, names: Names) -> None:
    """Raise ``TopologyMissingError`` naming what is missing (or lacks subjects), once per
    connection. One stream-info request per row, all at once."""
    ns = namespace(js, names)
    if ns.topology_checked:
        return

    async def look(row: Store) -> str | None:
        stream = row.stream(names)
        try:
            info = await js.stream_info(stream)
        except nats.js.errors.NotFoundError:
            return "missing"
        except (nats.errors.TimeoutError, TimeoutError) as exc:
            raise TimeoutError(
                f"no answer about {row.label(names)}: the server is busy, or "
                f"this user may not read it (roles' permissions come from the topology)"
            ) from exc
        lacking = set(row.stream_subjects(names)) - set(info.config.subjects or [])
        if row.republish is not None:
            # Services of an earlier version made it without: result() then reads instead.
            src, dest = row.republish(names)
            ns.stored_ctl = _republishes(info.config, RePublish(src=src, dest=dest))
        return f"lacks subjects {', '.join(sorted(lacking))}" if lacking else None

    found = await asyncio.gather(*(look(row) for row in TOPOLOGY))
    bad = [(row, why) for row, why in zip(TOPOLOGY, found, strict=True) if why is not None]
    if not bad:
        ns.topology_checked = True
        return
    if all(why == "missing" for _, why in bad) and len(bad) == len(TOPOLOGY):
        raise TopologyMissingError(
            f"namespace {names.prefix!r} has no streams or buckets on this server (none of its "
            f"{len(TOPOLOGY)}): {CREATE_HINT}"
        )
    parts = [
        f"{row.label(names)} ({row.what}) {'is missing' if why == 'missing' else why}"
        for row, why in bad
    ]
    raise TopologyMissingError("; ".join(parts) + f": {CREATE_HINT}")


__all__ = [
    "CORE_SUBJECTS",
    "ROLES",
    "TOPOLOGY",
    "CoreSubject",
    "Store",
    "TopologyMissingError",
    "check_topology",
    "ensure_topology",
    "missing",
]
