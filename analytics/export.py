"""Export the event log to Parquet, incrementally by stream sequence.

Each source stream becomes a directory of Parquet files named ``<first_seq>-<last_seq>.parquet``.
The names are the export state: the next export starts after the highest ``last_seq`` on disk,
and a file appears only complete (written aside, then renamed), so running the export twice,
or again after a crash, adds nothing twice and loses nothing.

Rows are built from the raw JSON rather than the event registry, so events this version does
not know (added by a newer writer) are exported too, and a corrupt message becomes a row with
``type = '<undecodable>'`` instead of stopping the export.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
from nats.aio.client import Client as NATS

from polos._private.store import (
    Names,
    StoredMsg,
    connect,
    disconnect,
    ensure_topology,
    read_subject,
    resolve_payload,
)
from polos._private.store.follow import follow
from polos.config import Settings

log = logging.getLogger("polos.analytics")

_FILE_RE = re.compile(r"^(\d{20})-(\d{20})\.parquet$")
# An empty file with a table's columns, in every table directory: the glob of the views then
# always matches a file (DuckDB refuses a glob that matches none), so the duckdb CLI can read
# views.sql over any export. Not a data file: the export position ignores it.
SCHEMA_FILE = "_schema.parquet"
LOCK_FILE = ".lock"
_TS = pa.timestamp("us", tz="UTC")

HISTORY_SCHEMA = pa.schema(
    [
        ("seq", pa.int64()),
        ("subject", pa.string()),
        ("stored_at", _TS),  # when the server stored it
        ("run_id", pa.string()),
        ("type", pa.string()),  # the event class name
        ("recorded_at", _TS),  # when the writer recorded it (the event's own clock)
        ("workflow", pa.string()),
        ("key", pa.string()),
        ("kind", pa.string()),
        ("name", pa.string()),
        ("attempt", pa.int64()),  # RunClaimed / StepAttemptFailed
        ("attempts", pa.int64()),  # StepCompleted / StepFailed
        ("worker_id", pa.string()),
        ("started_at", _TS),
        ("duration_ms", pa.float64()),
        ("parent_run_id", pa.string()),
        ("root_run_id", pa.string()),
        ("input", pa.string()),  # JSON text
        ("output", pa.string()),  # JSON text
        ("error", pa.string()),  # JSON text
        ("meta", pa.string()),  # JSON text
        ("body", pa.string()),  # JSON text: the remaining fields
    ]
)

MESSAGE_SCHEMA = pa.schema(
    [
        ("seq", pa.int64()),
        ("subject", pa.string()),
        ("stored_at", _TS),
        ("topic", pa.string()),  # the subject after "<prefix>.event." / ".dlq." / ".cmd."
        ("data", pa.string()),  # JSON text when the payload is JSON, else the text
        ("headers", pa.string()),  # JSON text
    ]
)

# Columns of HISTORY_SCHEMA taken out of the event body as they are.
_PLAIN = ("workflow", "key", "kind", "name", "worker_id", "parent_run_id", "root_run_id")
_INTS = ("attempt", "attempts")
_JSON_COLS = ("input", "output", "error", "meta")


def _ts(epoch: Any) -> datetime | None:
    if isinstance(epoch, int | float) and not isinstance(epoch, bool):
        return datetime.fromtimestamp(float(epoch), tz=UTC)
    return None


def _server_time(stamp: str | None) -> datetime | None:
    if not stamp:
        return None
    with contextlib.suppress(ValueError):
        # Python parses at most microseconds; the server sends nanoseconds.
        head, _, frac = stamp.rstrip("Z").partition(".")
        return datetime.fromisoformat(f"{head}.{(frac or '0')[:6]:0<6}+00:00")
    return None


def _json_text(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value, default=str).decode()


def history_row(msg: StoredMsg) -> dict[str, Any]:
    """One row of the ``history`` table for one stored run-history message."""
    parts = msg.subject.split(".")
    row: dict[str, Any] = {
        "seq": msg.seq,
        "subject": msg.subject,
        "stored_at": _server_time(msg.time),
        "run_id": parts[2] if len(parts) >= 4 else None,
    }
    try:
        body = orjson.loads(msg.data)
        if not isinstance(body, dict):
            raise ValueError("not an object")
    except ValueError:
        row["type"] = "<undecodable>"
        row["body"] = _json_text(msg.data.decode("utf-8", "replace"))
        return row
    body = dict(body)
    row["type"] = str(body.pop("t", None) or "<untyped>")
    row["recorded_at"] = _ts(body.pop("at", None))
    if isinstance(body.get("run_id"), str):
        row["run_id"] = body.pop("run_id")
    for col in _PLAIN:
        value = body.pop(col, None)
        row[col] = None if value is None else str(value)
    for col in _INTS:
        value = body.pop(col, None)
        row[col] = value if isinstance(value, int) and not isinstance(value, bool) else None
    row["started_at"] = _ts(body.pop("started_at", None))
    duration = body.pop("duration_ms", None)
    row["duration_ms"] = float(duration) if isinstance(duration, int | float) else None
    for col in _JSON_COLS:
        row[col] = _json_text(body.pop(col, None)) if col in body else None
    row["body"] = _json_text(body)
    return row


def message_row(msg: StoredMsg, strip: str) -> dict[str, Any]:
    """One row of the ``external_events`` or ``dead_letters`` table."""
    try:
        orjson.loads(msg.data)
        data: str | None = msg.data.decode()
    except ValueError:
        data = _json_text(msg.data.decode("utf-8", "replace"))
    headers = {k: v for k, v in (msg.headers or {}).items() if not k.startswith("Nats-")}
    return {
        "seq": msg.seq,
        "subject": msg.subject,
        "stored_at": _server_time(msg.time),
        "topic": msg.subject[len(strip) :] if msg.subject.startswith(strip) else msg.subject,
        "data": data,
        "headers": _json_text(headers) if headers else None,
    }


@dataclass(frozen=True)
class Source:
    """One stream exported to one table directory."""

    table: str
    stream: str
    subject_filter: str  # what is subscribed to for news; reads take the whole stream
    schema: pa.Schema
    to_row: Callable[[StoredMsg], dict[str, Any]]


TABLES = ("history", "external_events", "dead_letters", "commands")


def sources(names: Names) -> list[Source]:
    p = names.prefix
    return [
        Source("history", names.runs_stream, f"{p}.run.>", HISTORY_SCHEMA, history_row),
        Source(
            "external_events",
            names.events_stream,
            f"{p}.event.>",
            MESSAGE_SCHEMA,
            lambda m: message_row(m, f"{p}.event."),
        ),
        Source(
            "dead_letters",
            names.dlq_stream,
            f"{p}.dlq.>",
            MESSAGE_SCHEMA,
            lambda m: message_row(m, f"{p}.dlq."),
        ),
        Source(
            "commands",
            names.cmd_stream,
            f"{p}.cmd.>",
            MESSAGE_SCHEMA,
            lambda m: message_row(m, f"{p}.cmd."),
        ),
    ]


def exported_upto(table_dir: Path) -> int:
    """The last stream sequence already on disk for one table (0 when none)."""
    last = 0
    if table_dir.is_dir():
        for f in table_dir.iterdir():
            m = _FILE_RE.match(f.name)
            if m:
                last = max(last, int(m.group(2)))
    return last


def write_part(table_dir: Path, schema: pa.Schema, rows: list[dict[str, Any]]) -> Path:
    """Write rows (in sequence order) as one Parquet file named by its sequence range."""
    table_dir.mkdir(parents=True, exist_ok=True)
    first, last = rows[0]["seq"], rows[-1]["seq"]
    final = table_dir / f"{first:020d}-{last:020d}.parquet"
    tmp = table_dir / f".{final.name}.{os.getpid()}.tmp"
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp, compression="zstd")
    # The rename is what makes the rows count as exported: a crash before it leaves a temp file.
    os.replace(tmp, final)
    return final


def ensure_schema_file(table_dir: Path, schema: pa.Schema) -> None:
    """Write the table's ``_schema.parquet`` unless it is there with these columns."""
    path = table_dir / SCHEMA_FILE
    with contextlib.suppress(Exception):
        if pq.read_schema(path).equals(schema, check_metadata=False):
            return
    table_dir.mkdir(parents=True, exist_ok=True)
    tmp = table_dir / f".{SCHEMA_FILE}.{os.getpid()}.tmp"
    pq.write_table(pa.Table.from_pylist([], schema=schema), tmp, compression="zstd")
    os.replace(tmp, path)


def has_data(out_dir: str | os.PathLike[str]) -> bool:
    """Whether any table under ``out_dir`` holds exported rows (a data file, not a schema)."""
    return any(exported_upto(Path(out_dir) / table) for table in TABLES)


class ExportDirBusy(RuntimeError):
    """Another exporter writes to this directory."""


class _DirLock:
    """One writer per export directory. The file names are the export position, so two
    exporters writing the same directory would each export the same messages into files of
    different ranges: duplicate rows. An ``flock`` is released by the kernel when its process
    dies, so a crashed exporter never leaves the directory locked."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._fd: int | None = None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        try:
            import fcntl
        except ImportError:  # no flock on this platform: one writer is the operator's promise
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ExportDirBusy(
                f"another exporter (pid {holder}) writes to {self.directory}: one exporter per "
                "directory (`polos up` keeps its export current while it runs; give another "
                "--dir for a second one)"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _parts(table_dir: Path) -> list[tuple[int, int, Path]]:
    found = []
    if table_dir.is_dir():
        for f in table_dir.iterdir():
            m = _FILE_RE.match(f.name)
            if m:
                found.append((int(m.group(1)), int(m.group(2)), f))
    return sorted(found)


def repair(table_dir: Path) -> int:
    """Finish an interrupted compaction: drop files whose range another file covers."""
    parts = _parts(table_dir)
    removed = 0
    for first, last, path in parts:
        if any(a <= first and last <= b and (a, b) != (first, last) for a, b, _ in parts):
            path.unlink(missing_ok=True)
            removed += 1
    for tmp in table_dir.glob(".*.tmp") if table_dir.is_dir() else []:
        tmp.unlink(missing_ok=True)  # a write a crash cut short; its rows are exported again
    return removed


def compact(table_dir: Path, schema: pa.Schema, target_rows: int) -> int:
    """Merge runs of small consecutive files into files of up to ``target_rows`` rows.

    The merged file is written (and renamed into place) before the small ones are deleted, so
    a crash in between leaves duplicates that ``repair`` removes; the export position (the
    highest sequence on disk) never moves backwards. Returns how many files were merged away.
    """
    repair(table_dir)
    groups: list[list[tuple[int, int, Path]]] = [[]]
    size = 0
    for part in _parts(table_dir):
        rows = pq.ParquetFile(part[2]).metadata.num_rows
        if rows >= target_rows or size + rows > target_rows:
            groups.append([])
            size = 0
        if rows < target_rows:
            groups[-1].append(part)
            size += rows
    merged = 0
    for group in groups:
        if len(group) < 2:
            continue
        table = pa.concat_tables([pq.read_table(p, schema=schema) for _, _, p in group])
        final = table_dir / f"{group[0][0]:020d}-{group[-1][1]:020d}.parquet"
        tmp = table_dir / f".{final.name}.{os.getpid()}.tmp"
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, final)
        for _, _, p in group:
            if p != final:
                p.unlink(missing_ok=True)
        merged += len(group) - 1
    return merged


@dataclass
class ExportResult:
    rows: dict[str, int] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.rows.values())

    @property
    def per_second(self) -> float:
        return self.total / self.seconds if self.seconds > 0 else 0.0


class Exporter:
    """Copies new messages of the namespace's streams into Parquet under ``out_dir``."""

    def __init__(
        self,
        settings: Settings,
        out_dir: str | os.PathLike[str],
        *,
        rows_per_file: int = 100_000,
        nc: NATS | None = None,
    ) -> None:
        self.settings = settings
        self.names = Names(settings.prefix)
        self.out = Path(out_dir)
        self.rows_per_file = rows_per_file
        self._nc = nc
        self._own_nc = nc is None
        self._repaired: set[str] = set()
        self._lock = _DirLock(self.out)

    async def __aenter__(self) -> Exporter:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        self._lock.acquire()
        if self._nc is None:
            self._nc = await connect(self.settings, name="polos-analytics")
        js = self._nc.jetstream(timeout=self.settings.request_timeout)
        await ensure_topology(js, self.names, self.settings)

    async def close(self) -> None:
        if self._own_nc and self._nc is not None:
            with contextlib.suppress(Exception):
                await disconnect(self._nc)
            self._nc = None
        self._lock.release()

    async def compact(self) -> int:
        """Merge the small files follow mode leaves into files of ``rows_per_file`` rows."""
        held = self._lock._fd is not None
        self._lock.acquire()  # a compaction racing an export would delete the files it reads
        try:
            merged = 0
            for src in sources(self.names):
                merged += await asyncio.to_thread(
                    compact, self.out / src.table, src.schema, self.rows_per_file
                )
            return merged
        finally:
            if not held:
                self._lock.release()

    async def export_source(self, src: Source, result: ExportResult) -> None:
        assert self._nc is not None, "exporter not connected"
        table_dir = self.out / src.table
        if src.table not in self._repaired:
            await asyncio.to_thread(repair, table_dir)
            await asyncio.to_thread(ensure_schema_file, table_dir, src.schema)
            self._repaired.add(src.table)
        start = exported_upto(table_dir) + 1
        while True:
            # Every source is its whole stream. ">" is the server's unfiltered fast path; a
            # filter naming the stream's subjects (<p>.run.> over <p>.run.*.ctl and .step) makes
            # it match every message, which read the history 2-3x slower.
            msgs = await read_subject(
                self._nc,
                src.stream,
                ">",
                start_seq=start,
                limit=self.rows_per_file,
                timeout=self.settings.request_timeout,
            )
            if not msgs:
                return
            if src.table == "history":
                msgs = [await resolve_payload(self._nc, self.names, m) for m in msgs]
            rows = [src.to_row(m) for m in msgs]
            # Parquet writing is CPU work: keep the event loop (and its heartbeats) free.
            path = await asyncio.to_thread(write_part, table_dir, src.schema, rows)
            result.files.append(path)
            result.rows[src.table] = result.rows.get(src.table, 0) + len(rows)
            start = msgs[-1].seq + 1
            if len(msgs) < self.rows_per_file:
                return

    async def export_once(self) -> ExportResult:
        """Export everything new in every source; returns how many rows went to each table."""
        if self._nc is None:
            await self.connect()
        result = ExportResult()
        t0 = time.perf_counter()
        for src in sources(self.names):
            result.rows.setdefault(src.table, 0)
            await self.export_source(src, result)
        result.seconds = time.perf_counter() - t0
        return result

    async def follow(
        self,
        stop: asyncio.Event,
        *,
        flush_interval: float = 5.0,
        on_export: Callable[[ExportResult], None] | None = None,
        compact_every: int = 100,
        idle: float = 0.0,
        max_lag: float = 30.0,
    ) -> None:
        """Export whenever new messages arrive, at most once per ``flush_interval``; with
        ``idle``, only once the streams have been quiet that long (or ``max_lag`` after the
        first new message, quiet or not): a pass reads the streams the services are writing, and
        deferring it past a burst keeps it from competing with the appends.

        New messages are noticed as ``store.follow`` notices them (one-shot subscriptions, a
        pass after every woken one: no polling, no copy of every message, nothing missed). The
        export itself reads the streams by sequence, so a restart picks up where the files
        end. Every ``compact_every`` exports the small files are merged (0: never).
        """
        if self._nc is None:
            await self.connect()
        assert self._nc is not None
        exports = 0

        async def export_pass() -> int:
            nonlocal exports
            result = await self.export_once()
            if result.total:
                exports += 1
                if on_export is not None:
                    on_export(result)
                if compact_every and exports % compact_every == 0:
                    try:
                        await self.compact()
                    except Exception:
                        log.exception("compaction failed; the small files stay")
            return int(result.total)

        await follow(
            self._nc,
            [s.subject_filter for s in sources(self.names)],
            stop,
            export_pass,
            name="export",
            interval=flush_interval,
            idle=idle,
            max_lag=max_lag,
            error_delay=flush_interval,
        )
        # A last export so a clean stop leaves nothing behind.
        with contextlib.suppress(Exception):
            result = await self.export_once()
            if result.total and on_export is not None:
                on_export(result)


__all__ = [
    "HISTORY_SCHEMA",
    "MESSAGE_SCHEMA",
    "SCHEMA_FILE",
    "TABLES",
    "ExportDirBusy",
    "ExportResult",
    "Exporter",
    "Source",
    "compact",
    "ensure_schema_file",
    "exported_upto",
    "has_data",
    "history_row",
    "message_row",
    "repair",
    "sources",
    "write_part",
]
