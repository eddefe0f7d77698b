"""OpenTelemetry spans made from the event log, not from the hot path.

``SpanFollower`` reads every run's history in stream order and turns events into spans:

- a step span per ``StepCompleted`` / ``StepFailed`` (``gen_ai`` conventions for ``kind="llm"``
  and ``kind="tool"``), a short error span per ``StepAttemptFailed``;
- a wait span per suspension, emitted when the run wakes (or ends while waiting);
- a run span per run, emitted at its terminal event, with the claims (worker, attempt),
  suspensions and wake-ups as span events, and the LLM usage and cost of the run and every
  run under it.

Each span is emitted while handling exactly one stream sequence. The spans of a batch are
handed to the exporter synchronously and the follower's position (the last sequence handled)
moves past them only once the exporter accepted them (``SpanExportResult.SUCCESS``); an
exporter that fails is retried with back-off, logged once when it starts failing and once when
it recovers, and nothing is dropped. A worker replaying a run appends nothing for replayed
steps, so replay cannot emit a span: "never twice on replay" is structural, not a flag checked
in the worker. Trace and span ids are derived from run ids and step keys (one trace per root
run, across suspends, worker changes and child runs), so the rare re-emission after a follower
crash between an accepted export and the position save carries the same ids.

Configuration is the standard ``OTEL_*`` environment (``OTEL_SERVICE_NAME``,
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_EXPORTER`` = otlp | console, the
``OTEL_EXPORTER_OTLP_*`` endpoint variables). OTLP over HTTP is a dependency of Polos; OTLP over
gRPC needs the ``grpc`` extra. A follower whose exporter cannot be made refuses to start, so it
never consumes the log without sending what it read.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib
import logging
import os
import random
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import orjson
from nats.aio.client import Client as NATS
from nats.js.kv import KeyValue
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    ConsoleSpanExporter,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)

from polos import history as ev
from polos._private.agents.decisions import decision_of
from polos._private.agents.pricing import LLMTotals
from polos._private.model.lineage import children_named
from polos._private.store import (
    Names,
    connect,
    disconnect,
    ensure_topology,
    read_run,
    read_subject,
    resolve_payload,
)
from polos._private.store.follow import follow
from polos.config import Settings
from polos.errors import PolosError

log = logging.getLogger("polos.telemetry")

POSITION_KEY = "otel_position"
TERMINAL_TYPES = (ev.RunCompleted, ev.RunFailed, ev.RunCancelled)


def telemetry_bucket(names: Names) -> str:
    """The KV bucket holding the followers' positions (a projection: delete it to re-emit)."""
    return names.telemetry_bucket


# --------------------------------------------------------------------------- deterministic ids


def _h(text: str, bits: int) -> int:
    value = int.from_bytes(hashlib.sha256(text.encode()).digest()[: bits // 8], "big")
    return value or 1  # zero is the invalid id in OpenTelemetry


def trace_id_for(root_run_id: str) -> int:
    """The trace id of every span of a root run and all its descendants."""
    return _h(f"polos/trace/{root_run_id}", 128)


def run_span_id(run_id: str) -> int:
    return _h(f"polos/run/{run_id}", 64)


def step_span_id(run_id: str, key: str) -> int:
    return _h(f"polos/step/{run_id}/{key}", 64)


class _PlannedIds(IdGenerator):
    """Hands out the id planned for the span being started; random ids otherwise."""

    def __init__(self) -> None:
        self.next_span_id: int | None = None
        self.next_trace_id: int | None = None

    def generate_span_id(self) -> int:
        planned, self.next_span_id = self.next_span_id, None
        return planned if planned is not None else random.getrandbits(64) or 1

    def generate_trace_id(self) -> int:
        planned, self.next_trace_id = self.next_trace_id, None
        return planned if planned is not None else random.getrandbits(128) or 1


# --------------------------------------------------------------------------- configuration


class TelemetryConfigError(PolosError):
    """The span exporter the ``OTEL_*`` environment asks for cannot be made: the follower does
    not start (and so does not move its position past spans it could not send)."""


class ExportStalled(PolosError):
    """The exporter did not accept a batch of spans in the time allowed; the position stays
    before them, so a later follower sends them."""


_OTLP_PACKAGES = {
    "http": (
        "opentelemetry-exporter-otlp-proto-http",
        "it is a dependency of polos: reinstall polos",
    ),
    "grpc": ("opentelemetry-exporter-otlp-proto-grpc", "pip install 'polos[grpc]'"),
}


def exporter_from_env() -> SpanExporter:
    """The span exporter the standard ``OTEL_TRACES_EXPORTER`` variable asks for; a
    ``TelemetryConfigError`` (one line: what is wrong and how to fix it) when it cannot be made."""
    choice = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",")[0].strip().lower()
    if choice in ("none", ""):
        raise TelemetryConfigError(
            f"OTEL_TRACES_EXPORTER={choice!r}: the span follower has nowhere to send spans and "
            "does not start (use otlp or console)"
        )
    if choice == "console":
        return ConsoleSpanExporter()
    if choice == "otlp":
        protocol = (
            os.environ.get(
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
                os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            )
            .strip()
            .lower()
        )
        if protocol not in ("http/protobuf", "grpc"):
            raise TelemetryConfigError(
                f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r} is not supported: use http/protobuf "
                "or grpc"
            )
        transport = "grpc" if protocol == "grpc" else "http"
        try:
            module = importlib.import_module(
                f"opentelemetry.exporter.otlp.proto.{transport}.trace_exporter"
            )
        except ImportError as exc:
            package, fix = _OTLP_PACKAGES[transport]
            raise TelemetryConfigError(
                f"OTEL_TRACES_EXPORTER=otlp ({protocol}) needs {package}, which is not "
                f"installed ({exc}): {fix}; the span follower does not start"
            ) from exc
        # Endpoint, headers and timeouts come from the OTEL_EXPORTER_OTLP_* variables.
        exporter: SpanExporter = module.OTLPSpanExporter()
        return exporter
    raise TelemetryConfigError(f"OTEL_TRACES_EXPORTER={choice!r}: use otlp or console")


class _Collect(SpanProcessor):
    """Keeps the ended spans of the batch being handled, for one synchronous export."""

    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []

    def on_end(self, span: ReadableSpan) -> None:
        self.spans.append(span)


_EXPORT_THREAD = "polos-telemetry-export"


class _ExporterLog(logging.Filter):
    """Holds back what the exporter logs from the follower's export thread (it logs every
    failed attempt): the follower logs an outage once, quoting the exporter's first word."""

    def __init__(self) -> None:
        super().__init__()
        self.last: str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.threadName or not record.threadName.startswith(_EXPORT_THREAD):
            return True
        if record.levelno >= logging.WARNING and self.last is None:
            self.last = record.getMessage()  # the first names the cause; later ones give up
        return False


def _exporter_loggers(exporter: SpanExporter) -> list[logging.Logger]:
    """The loggers an exporter writes to: its classes' modules, and the OTLP clients'."""
    names = {cls.__module__ for cls in type(exporter).__mro__}
    names |= {
        "opentelemetry.exporter.otlp.common.http",
        "opentelemetry.exporter.otlp.proto.grpc.exporter",
        "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    }
    return [logging.getLogger(n) for n in sorted(names) if n.startswith("opentelemetry")]


# --------------------------------------------------------------------------- the follower


@dataclass
class _Run:
    """What the follower remembers about a run between its events."""

    run_id: str
    trace_id: int
    parent_span_id: int | None
    requested_at: float
    workflow: str
    root_run_id: str
    root_workflow: str | None  # None when the root run's request is gone from the log
    parent_run_id: str | None = None
    # The agent a ``polos_agent`` child run runs (its request names it).
    agent: str | None = None
    open_wait: tuple[int, ev.RunSuspended] | None = None
    # True when this follower saw the run from its RunRequested on: then the fields below are
    # the whole story and the run span needs no history read (and ``tree`` holds every LLM call
    # of the run and the runs under it, which were all appended after that request).
    complete: bool = False
    marks: list[tuple[str, float, dict[str, Any]]] = field(default_factory=list)
    attempts: int = 0
    workers: set[str] = field(default_factory=set)
    steps: int = 0
    tree: LLMTotals = field(default_factory=LLMTotals)

    def note(self, event: ev.Event) -> None:
        """Fold what the run span reports about one event."""
        if isinstance(event, ev.RunClaimed):
            self.attempts = max(self.attempts, event.attempt)
            self.workers.add(event.worker_id)
            self.marks.append(
                ("claimed", event.at, {"worker_id": event.worker_id, "attempt": event.attempt})
            )
        elif isinstance(event, ev.RunSuspended):
            self.marks.append(("suspended", event.at, {"step": event.step, "kind": event.kind}))
        elif isinstance(event, ev.RunWoken):
            self.marks.append(("woken", event.at, {"step": event.step, "reason": event.reason}))
            if getattr(event, "kind", None):  # a wake that records the awaited step's outcome
                self.steps += 1
        elif isinstance(event, ev.StepCompleted | ev.StepFailed):
            self.steps += 1


def _ns(t: float) -> int:
    return int(t * 1e9)


def _attr(value: Any) -> Any:
    """An attribute value OpenTelemetry accepts: scalars as they are, the rest as JSON."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    return orjson.dumps(value, default=str).decode()


@dataclass
class FollowerStats:
    events: int = 0
    spans: int = 0
    batches: int = 0
    by_type: dict[str, int] = field(default_factory=dict)


class SpanFollower:
    """Turns the run history of one namespace into OpenTelemetry spans, once per event."""

    def __init__(
        self,
        settings: Settings,
        *,
        exporter: SpanExporter | None = None,
        resource: Resource | None = None,
        batch: int = 1000,
        cache_size: int = 100_000,
        nc: NATS | None = None,
        position_key: str = POSITION_KEY,
        export_chunk: int = 512,
    ) -> None:
        self.settings = settings
        self.names = Names(settings.prefix)
        self.batch = batch
        self.export_chunk = export_chunk
        self.position_key = position_key
        self.stats = FollowerStats()
        self._ids = _PlannedIds()
        attrs = {
            "service.name": os.environ.get("OTEL_SERVICE_NAME", "polos"),
            "polos.namespace": settings.prefix,
        }
        self.provider = TracerProvider(
            resource=resource or Resource.create(attrs), id_generator=self._ids
        )
        # Made before anything is read: a follower that cannot send refuses to start.
        self.exporter = exporter if exporter is not None else exporter_from_env()
        # Spans are collected per batch and exported synchronously, so the position moves only
        # past spans the exporter accepted (a BatchSpanProcessor drops what it cannot send).
        self._collect = _Collect()
        self.provider.add_span_processor(self._collect)
        self.tracer = self.provider.get_tracer("polos")
        self._runs: OrderedDict[str, _Run] = OrderedDict()
        self._cache_size = cache_size
        self._nc = nc
        self._own_nc = nc is None
        self._kv: KeyValue | None = None
        self.position = 0
        # Spans handled but not yet accepted, and the sequence they take the position to.
        self._pending: list[ReadableSpan] = []
        self._pending_upto: int | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=_EXPORT_THREAD)
        self._exporter_log = _ExporterLog()
        self._outage: tuple[float, int] | None = None  # (since, failed tries) while failing

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        for logger in _exporter_loggers(self.exporter):
            logger.addFilter(self._exporter_log)
        if self._nc is None:
            self._nc = await connect(self.settings, name="polos-telemetry")
        js = self._nc.jetstream(timeout=self.settings.request_timeout)
        # A span follower is a service: it ensures the topology (its bucket is a row of it).
        await ensure_topology(js, self.names, self.settings)
        self._kv = await js.key_value(telemetry_bucket(self.names))
        self.position = await self._load_position()

    async def stop(self) -> None:
        # Spans not accepted yet are not lost: the position is still before them.
        with contextlib.suppress(Exception):
            self.exporter.shutdown()  # also cuts short an export retrying in the thread
        self.provider.shutdown()
        self._pool.shutdown(wait=False, cancel_futures=True)
        for logger in _exporter_loggers(self.exporter):
            logger.removeFilter(self._exporter_log)
        if self._own_nc and self._nc is not None:
            with contextlib.suppress(Exception):
                await disconnect(self._nc)
            self._nc = None

    async def __aenter__(self) -> SpanFollower:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _load_position(self) -> int:
        assert self._kv is not None
        try:
            entry = await self._kv.get(self.position_key)
        except Exception:
            return 0
        try:
            return int((entry.value or b"0").decode())
        except ValueError:
            return 0

    async def _save_position(self) -> None:
        assert self._kv is not None
        await self._kv.put(self.position_key, str(self.position).encode())

    # ------------------------------------------------------------------ exporting

    def _export_in_thread(self, spans: Sequence[ReadableSpan]) -> tuple[bool, str | None]:
        self._exporter_log.last = None
        try:
            result = self.exporter.export(spans)
        except Exception as exc:  # an exporter that raises is one that did not accept
            return False, f"{type(exc).__name__}: {exc}"
        if result is SpanExportResult.SUCCESS:
            return True, None
        return False, self._exporter_log.last

    async def _deliver(self, stop: asyncio.Event | None, give_up_after: float | None) -> bool:
        """Export the pending spans until the exporter accepts them, backing off while it fails.

        True when accepted (or nothing was pending); False when ``stop`` was set first. Raises
        ``ExportStalled`` after ``give_up_after`` seconds of failures. The pending spans stay
        pending either way, so a later call sends exactly them."""
        if not self._pending:
            return True
        loop = asyncio.get_running_loop()
        began = time.monotonic()
        delay = self.settings.telemetry_retry_initial
        while True:
            attempt = asyncio.ensure_future(
                loop.run_in_executor(self._pool, self._export_in_thread, list(self._pending))
            )
            waits: set[asyncio.Future[Any]] = {attempt}
            stopper = asyncio.ensure_future(stop.wait()) if stop is not None else None
            if stopper is not None:
                waits.add(stopper)
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if stopper is not None:
                stopper.cancel()
            if not attempt.done():
                # Stopping: the thread's export is abandoned (stop() shuts the exporter), and
                # the position stays before these spans whatever it answers.
                attempt.cancel()
                return False
            accepted, why = attempt.result()
            if accepted:
                if self._outage is not None:
                    since, tries = self._outage
                    log.warning(
                        "telemetry: the exporter accepts spans again after %.1f s and %d failed "
                        "tries; sending from seq %d on",
                        time.monotonic() - since,
                        tries,
                        self.position + 1,
                    )
                    self._outage = None
                self._pending = []
                return True
            if self._outage is None:
                self._outage = (time.monotonic(), 1)
                log.warning(
                    "telemetry: the exporter did not accept %d spans (%s); retrying with back-off "
                    "up to %g s, the position stays at seq %d until it does",
                    len(self._pending),
                    why or "no reason given",
                    self.settings.telemetry_retry_max,
                    self.position,
                )
            else:
                since, tries = self._outage
                self._outage = (since, tries + 1)
                log.debug("telemetry: export failed again (%s)", why)
            if give_up_after is not None and time.monotonic() - began + delay > give_up_after:
                raise ExportStalled(
                    f"the exporter did not accept {len(self._pending)} spans in "
                    f"{give_up_after:g} s ({why or 'no reason given'}); the position stays at "
                    f"seq {self.position}"
                )
            if stop is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                if stop.is_set():
                    return False
            else:
                await asyncio.sleep(delay)
            delay = min(self.settings.telemetry_retry_max, delay * 2)

    async def _commit(self, stop: asyncio.Event | None, give_up_after: float | None) -> bool:
        """Send the pending spans, then move the position past the events that made them."""
        if self._pending_upto is None:
            return True
        if not await self._deliver(stop, give_up_after):
            return False
        self.position = self._pending_upto
        self._pending_upto = None
        await self._save_position()
        self.stats.batches += 1
        return True

    # ------------------------------------------------------------------ reading

    async def process_available(
        self, stop: asyncio.Event | None = None, *, give_up_after: float | None = None
    ) -> int:
        """Handle every history event after the saved position; returns how many.

        Returns early (the position before what was not sent) when ``stop`` is set while the
        exporter refuses spans; raises ``ExportStalled`` after ``give_up_after`` seconds of
        refusals (None: retry until it accepts)."""
        assert self._nc is not None, "follower not started"
        handled = 0
        # Spans a previous call handled but could not send go first: their events are not
        # handled again (the run state already holds them).
        if not await self._commit(stop, give_up_after):
            return handled
        while True:
            # The whole stream: ">" is the server's unfiltered fast path (see analytics.export).
            msgs = await read_subject(
                self._nc,
                self.names.runs_stream,
                ">",
                start_seq=self.position + 1,
                limit=self.batch,
                timeout=self.settings.request_timeout,
            )
            if not msgs:
                return handled
            for m in msgs:
                handled += 1
                self._pending_upto = m.seq
                try:
                    event = ev.decode((await resolve_payload(self._nc, self.names, m)).data)
                except ev.EventDecodeError:
                    log.warning("skipping undecodable history message at seq %d", m.seq)
                    continue
                run_id = m.subject.split(".")[2]
                try:
                    await self.handle(m.seq, run_id, event)
                except Exception:
                    # Telemetry must never stall on one odd run: log it and go on.
                    log.exception("no span for %s at seq %d", type(event).__name__, m.seq)
                self.stats.events += 1
                name = type(event).__name__
                self.stats.by_type[name] = self.stats.by_type.get(name, 0) + 1
                if len(self._collect.spans) >= self.export_chunk:
                    # Sent in chunks within a batch: a thousand spans held until the batch
                    # ends cost more in garbage collection than the extra requests. The
                    # position still moves once per batch, after its last chunk is accepted.
                    self._pending.extend(self._collect.spans)
                    self._collect.spans = []
                    if not await self._deliver(stop, give_up_after):
                        return handled
            self._pending.extend(self._collect.spans)
            self._collect.spans = []
            if not await self._commit(stop, give_up_after):
                return handled
            if len(msgs) < self.batch:
                return handled

    async def follow(self, stop: asyncio.Event) -> None:
        """Handle events as they are appended (``store.follow``: woken by the history's
        subjects, no polling, and the last event of a burst is not missed)."""
        assert self._nc is not None, "follower not started"
        await follow(
            self._nc,
            [f"{self.names.prefix}.run.>"],
            stop,
            lambda: self.process_available(stop),
            name="telemetry follower",
        )

    async def _history(self, run_id: str, upto: int | None = None) -> list[tuple[int, ev.Event]]:
        assert self._nc is not None
        msgs = await read_run(self._nc, self.names, run_id, timeout=self.settings.request_timeout)
        out: list[tuple[int, ev.Event]] = []
        for m in msgs:
            if upto is not None and m.seq > upto:
                break
            # Only control events and counts are read here: stubs need no resolving.
            with contextlib.suppress(ev.EventDecodeError):
                out.append((m.seq, ev.decode(m.data)))
        return out

    # ------------------------------------------------------------------ runs

    def _remember(self, run: _Run) -> _Run:
        self._runs[run.run_id] = run
        self._runs.move_to_end(run.run_id)
        while len(self._runs) > self._cache_size:
            self._runs.popitem(last=False)
        return run

    async def _run_from_request(self, req: ev.RunRequested, depth: int = 0) -> _Run:
        parent_span: int | None = None
        root = req.root_run_id
        trace_id: int | None = None
        if req.trace_id and len(req.trace_id) == 32:
            # A W3C trace id handed in by the caller wins: the run joins the caller's trace.
            with contextlib.suppress(ValueError):
                trace_id = int(req.trace_id, 16) or None
        root_workflow: str | None = None
        if req.parent_run_id:
            parent_span = (
                step_span_id(req.parent_run_id, req.parent_step)
                if req.parent_step
                else run_span_id(req.parent_run_id)
            )
            if depth < 32:
                parent = await self._run_info(req.parent_run_id, depth + 1)
                if parent is not None and (root is None or root == parent.root_run_id):
                    root = parent.root_run_id
                    root_workflow = parent.root_workflow
                    trace_id = trace_id or parent.trace_id
            root = root or req.parent_run_id
        root = root or req.run_id
        if root_workflow is None:
            if root == req.run_id:
                root_workflow = req.workflow
            else:
                top = await self._run_info(root, depth + 1) if depth < 32 else None
                root_workflow = top.workflow if top is not None else None
        agent = req.input.get("agent") if isinstance(req.input, dict) else None
        return _Run(
            run_id=req.run_id,
            trace_id=trace_id or trace_id_for(root),
            parent_span_id=parent_span,
            requested_at=req.at,
            workflow=req.workflow,
            root_run_id=root,
            root_workflow=root_workflow,
            parent_run_id=req.parent_run_id,
            agent=str(agent) if agent is not None and req.workflow == "polos_agent" else None,
        )

    async def _run_info(self, run_id: str, depth: int = 0) -> _Run | None:
        run = self._runs.get(run_id)
        if run is not None:
            return run
        # Not seen since this follower started (it started mid-run): the first event says.
        assert self._nc is not None
        # RunRequested is the first control event.
        msgs = await read_subject(
            self._nc,
            self.names.runs_stream,
            self.names.run_subject(run_id, "ctl"),
            limit=1,
            timeout=self.settings.request_timeout,
        )
        if not msgs:
            return None
        first = ev.decode(msgs[0].data)
        if not isinstance(first, ev.RunRequested):
            return None
        return self._remember(await self._run_from_request(first, depth))

    def _context(self, run: _Run, parent_span_id: int | None) -> Any:
        if parent_span_id is None:
            return None
        parent = SpanContext(
            trace_id=run.trace_id,
            span_id=parent_span_id,
            is_remote=True,
            trace_flags=TraceFlags(TraceFlags.SAMPLED),
        )
        return trace.set_span_in_context(NonRecordingSpan(parent))

    def _emit(
        self,
        run: _Run,
        *,
        name: str,
        span_id: int,
        parent_span_id: int | None,
        start: float,
        end: float,
        attributes: dict[str, Any],
        error: str | None = None,
        events: list[tuple[str, float, dict[str, Any]]] | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
    ) -> None:
        self._ids.next_span_id = span_id
        self._ids.next_trace_id = run.trace_id
        span = self.tracer.start_span(
            name,
            context=self._context(run, parent_span_id),
            kind=kind,
            start_time=_ns(min(start, end)),
            attributes={k: _attr(v) for k, v in attributes.items() if v is not None},
        )
        for ev_name, at, attrs in events or []:
            span.add_event(
                ev_name, {k: _attr(v) for k, v in attrs.items() if v is not None}, timestamp=_ns(at)
            )
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, error))
        else:
            span.set_status(Status(StatusCode.OK))
        span.end(end_time=_ns(end))
        self.stats.spans += 1

    async def handle(self, seq: int, run_id: str, event: ev.Event) -> None:
        """Emit the spans one history event closes (most events close none)."""
        if isinstance(event, ev.RunRequested):
            started = await self._run_from_request(event)
            started.complete = True
            self._remember(started)
            return
        run = await self._run_info(run_id)
        if run is None:
            return
        run.note(event)
        base = {"polos.run_id": run_id, "polos.workflow": run.workflow, "polos.seq": seq}
        if isinstance(event, ev.StepCompleted) and event.kind == "llm":
            await self._roll_up(run, event.meta)
        if isinstance(event, ev.StepCompleted | ev.StepFailed):
            self._step_span(run, seq, event, base)
        elif isinstance(event, ev.StepAttemptFailed):
            self._emit(
                run,
                name=f"step {event.key} attempt {event.attempt}",
                span_id=_h(f"polos/attempt/{run_id}/{event.key}/{event.attempt}", 64),
                parent_span_id=run_span_id(run_id),
                start=event.at,
                end=event.at,
                attributes={
                    **base,
                    "polos.step.key": event.key,
                    "polos.step.kind": event.kind,
                    "polos.step.attempt": event.attempt,
                    "polos.retry_in_s": event.retry_in,
                    "error.type": event.error.get("type"),
                },
                error=str(event.error.get("message")),
            )
        elif isinstance(event, ev.RunSuspended):
            run.open_wait = (seq, event)
        elif isinstance(event, ev.RunWoken):
            await self._close_wait(
                run,
                seq,
                event.at,
                base,
                reason=event.reason,
                records_step=bool(getattr(event, "kind", None)),
            )
        elif isinstance(event, TERMINAL_TYPES):
            if not run.complete:
                # Seen only part of the run (a restart, an evicted cache): the log has the rest.
                history = await self._history(run_id, upto=seq)
                first = history[0][1] if history else None
                if isinstance(first, ev.RunRequested):
                    fresh = await self._run_from_request(first)
                    for _, e in history:
                        fresh.note(e)
                    fresh.open_wait = run.open_wait
                    run = fresh
                run.tree = await self._tree_from_log(run_id, history, seq)
                await self._close_wait(
                    run, seq, event.at, base, reason=type(event).__name__, history=history
                )
            else:
                await self._close_wait(
                    run, seq, event.at, base, reason=type(event).__name__, history=[]
                )
            self._run_span(run, event, base)
            self._runs.pop(run_id, None)

    async def _roll_up(self, run: _Run, meta: Any) -> None:
        """Count one LLM call in the totals of its run and of every run above it."""
        node: _Run | None = run
        for depth in range(33):
            if node is None:
                return
            node.tree.add_step(meta)
            if not node.parent_run_id or depth == 32:
                return
            node = await self._run_info(node.parent_run_id)

    async def _tree_from_log(
        self, run_id: str, history: list[tuple[int, ev.Event]], upto: int
    ) -> LLMTotals:
        """The LLM totals of a run and the runs under it, read from the log (for a run this
        follower did not see from its start); only what was appended up to ``upto`` counts,
        as it would have in stream order."""
        totals = LLMTotals()
        seen = {run_id}
        todo = [history]
        while todo:
            for s, e in todo.pop():
                if s > upto:
                    break
                if isinstance(e, ev.StepCompleted) and e.kind == "llm":
                    totals.add_step(e.meta)
                for child in children_named(e):
                    if child not in seen and len(seen) < 10_000:
                        seen.add(child)
                        todo.append(await self._history(child, upto=upto))
        return totals

    def _step_span(
        self, run: _Run, seq: int, e: ev.StepCompleted | ev.StepFailed, base: dict[str, Any]
    ) -> None:
        meta: dict[str, Any] = {}
        duration: float | None = None
        started: float | None = None
        if isinstance(e, ev.StepCompleted):
            meta = e.meta if isinstance(e.meta, dict) else {}
            duration, started = e.duration_ms, e.started_at
        if started is None:
            started = e.at - (duration or 0.0) / 1000.0
        attrs: dict[str, Any] = {
            **base,
            "polos.step.key": e.key,
            "polos.step.kind": e.kind,
            "polos.step.name": e.name,
            "polos.step.attempts": e.attempts,
            "polos.idempotency_key": f"{run.run_id}:{e.key}",
        }
        name = f"step {e.key}"
        kind = SpanKind.INTERNAL
        if e.kind == "llm":
            usage = meta.get("usage") or {}
            output = (
                e.output if isinstance(e, ev.StepCompleted) and isinstance(e.output, dict) else {}
            )
            model = meta.get("model") or e.name
            name = f"chat {model}"
            kind = SpanKind.CLIENT
            finish = meta.get("finish_reason")
            attrs.update(
                {
                    "gen_ai.operation.name": "chat",
                    "gen_ai.system": meta.get("provider"),
                    "gen_ai.provider.name": meta.get("provider"),
                    "gen_ai.request.model": model,
                    "gen_ai.response.model": model,
                    "gen_ai.request.temperature": meta.get("temperature"),
                    "gen_ai.usage.input_tokens": usage.get("prompt_tokens"),
                    "gen_ai.usage.output_tokens": usage.get("completion_tokens"),
                    "gen_ai.usage.cached_tokens": usage.get("cached_tokens"),
                    "gen_ai.response.finish_reasons": [finish] if isinstance(finish, str) else None,
                    "gen_ai.agent.name": meta.get("agent"),
                    "gen_ai.request.tools": [str(t) for t in meta.get("tools_offered") or []],
                    "polos.llm.tool_calls": [
                        str(c.get("name"))
                        for c in output.get("tool_calls") or []
                        if isinstance(c, dict)
                    ],
                    "polos.llm.latency_ms": meta.get("latency_ms"),
                    "polos.cost_usd": meta.get("cost_usd"),
                    "server.address": meta.get("base_url"),
                    # What the cost rolls up to: the run that was started and its workflow (an
                    # agent's own run is the generic polos_agent workflow).
                    "polos.root_run_id": run.root_run_id,
                    "polos.root_workflow": run.root_workflow,
                }
            )
            choice = decision_of(output, meta)
            if choice["chosen"]:
                attrs.update(
                    {
                        "polos.decision.chosen": [str(t) for t in choice["chosen"]],
                        "polos.decision.alternatives": [str(t) for t in choice["alternatives"]],
                    }
                )
            attrs["polos.decision.reason"] = choice.get("reason")
        elif e.kind == "tool":
            name = f"execute_tool {e.name}"
            attrs.update(
                {
                    "gen_ai.operation.name": "execute_tool",
                    "gen_ai.tool.name": e.name,
                    "gen_ai.tool.call.id": meta.get("tool_call_id"),
                    "gen_ai.agent.name": meta.get("agent"),
                    "polos.tool.decision": meta.get("decision"),
                }
            )
        error: str | None = None
        if isinstance(e, ev.StepFailed):
            error = f"{e.error.get('type')}: {e.error.get('message')}"
            attrs["error.type"] = e.error.get("type")
        elif e.kind == "tool" and meta.get("error"):
            error = str(meta.get("error"))
            attrs["error.type"] = "ToolError"
        self._emit(
            run,
            name=name,
            span_id=step_span_id(run.run_id, e.key),
            parent_span_id=run_span_id(run.run_id),
            start=started,
            end=e.at,
            attributes=attrs,
            error=error,
            kind=kind,
        )

    async def _close_wait(
        self,
        run: _Run,
        seq: int,
        at: float,
        base: dict[str, Any],
        *,
        reason: str,
        history: list[tuple[int, ev.Event]] | None = None,
        records_step: bool = False,
    ) -> None:
        opened = run.open_wait
        if opened is None:
            # The follower (re)started while the run waited: the history knows the suspension.
            if history is None:
                history = await self._history(run.run_id, upto=seq)
            for s, e in history:
                if s >= seq:
                    break
                if isinstance(e, ev.RunSuspended):
                    opened = (s, e)
                elif isinstance(e, ev.RunWoken):
                    opened = None
        run.open_wait = None
        if opened is None:
            return
        s_seq, sus = opened
        # A wake that records the awaited step's outcome is that step's only record, so the
        # wait span takes the step's span id: child runs started by the step hang under it.
        span_id = (
            step_span_id(run.run_id, sus.step)
            if records_step
            else _h(f"polos/wait/{run.run_id}/{s_seq}", 64)
        )
        self._emit(
            run,
            name=f"wait {sus.kind} {sus.step}",
            span_id=span_id,
            parent_span_id=run_span_id(run.run_id),
            start=sus.at,
            end=at,
            attributes={
                **base,
                "polos.wait.kind": sus.kind,
                "polos.wait.step": sus.step,
                "polos.wait.topic": sus.topic,
                "polos.wait.children": sus.children,
                "polos.wait.woken_by": reason,
            },
        )

    def _run_span(self, run: _Run, end: ev.Event, base: dict[str, Any]) -> None:
        status = {"RunCompleted": "completed", "RunFailed": "failed", "RunCancelled": "cancelled"}[
            type(end).__name__
        ]
        error = None
        if isinstance(end, ev.RunFailed):
            error = f"{end.error.get('type')}: {end.error.get('message')}"
        tree = run.tree
        # Totals of the run and every run under it (child workflows, agents), under names of
        # their own: backends that sum gen_ai.usage.* over a trace's spans count each LLM call
        # once, on its chat span.
        totals: dict[str, Any] = (
            {
                "polos.total.llm_calls": tree.llm_calls,
                "polos.total.input_tokens": tree.input_tokens,
                "polos.total.output_tokens": tree.output_tokens,
                "polos.total.tokens": tree.total_tokens,
                "polos.total.cost_usd": round(tree.cost_usd, 10),
            }
            if tree.llm_calls
            else {}
        )
        agent = {"gen_ai.agent.name": run.agent} if run.agent else {}
        self._emit(
            run,
            name=f"run {run.workflow}",
            span_id=run_span_id(run.run_id),
            parent_span_id=run.parent_span_id,
            start=run.requested_at,
            end=end.at,
            attributes={
                **base,
                "polos.status": status,
                "polos.attempts": run.attempts,
                "polos.workers": len(run.workers),
                "polos.steps": run.steps,
                "polos.root_run_id": run.root_run_id,
                "polos.root_workflow": run.root_workflow,
                **agent,
                **totals,
            },
            error=error,
            events=run.marks,
            kind=SpanKind.SERVER if run.parent_span_id is None else SpanKind.INTERNAL,
        )


__all__ = [
    "ExportStalled",
    "SpanFollower",
    "TelemetryConfigError",
    "exporter_from_env",
    "resolve_payload",
    "run_span_id",
    "step_span_id",
    "trace_id_for",
]
