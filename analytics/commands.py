"""The analytics' ``polos`` subcommands: ``polos analytics`` (export the log to Parquet),
``polos sql``, ``polos telemetry`` and ``polos retention``. Added to the ``polos`` command
through the ``polos.commands`` entry point."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

import orjson

from polos._private.ops import output
from polos._private.ops.commands import command, data_dir, settings_for, table
from polos._private.ops.retention import archive_exported_runs
from polos._private.ops.runtime import default_export_dir, wait_for_signal
from polos.client import PolosClient

from .export import ExportDirBusy, Exporter, ExportResult, exported_upto, has_data
from .spans import ExportStalled, SpanFollower, TelemetryConfigError
from .sql import connect as duckdb_connect
from .sql import views_sql

DIR_HELP = (
    "the export directory (env POLOS_ANALYTICS_DIR, default DATA_DIR/exports: where "
    "`polos up` keeps it current)"
)


def _dumps(value: Any, limit: int = 120) -> str:
    text = orjson.dumps(value, default=str).decode()
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --------------------------------------------------------------------------- analytics export


def _add_export(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "action",
        choices=["export", "compact"],
        help="export: copy new log messages to Parquet; "
        "compact: merge small files (left by --follow) into big ones",
    )
    p.add_argument("--dir", default=None, help=DIR_HELP)
    p.add_argument("--follow", action="store_true", help="keep exporting as messages arrive")
    p.add_argument(
        "--flush-interval",
        type=float,
        default=5.0,
        help="with --follow: at most one file per table per this many seconds",
    )
    p.add_argument("--rows-per-file", type=int, default=100_000)


@command("analytics", "export the event log to Parquet (incremental, idempotent)")(_add_export)
async def cmd_analytics(args: argparse.Namespace) -> int:

    args.dir = args.dir or str(default_export_dir(data_dir(args)))
    settings = settings_for(args, role="service")  # reads every stream of the namespace

    def report(result: ExportResult) -> None:
        rows = ", ".join(f"{t} {n}" for t, n in result.rows.items())
        print(
            f"exported {result.total} rows ({rows}) in {result.seconds:.3f} s "
            f"= {result.per_second:,.0f} events/s -> {args.dir}",
            flush=True,
        )

    try:
        if args.action == "compact":
            merged = await Exporter(settings, args.dir, rows_per_file=args.rows_per_file).compact()
            print(f"merged {merged} files away in {args.dir}")
            return 0
        async with Exporter(settings, args.dir, rows_per_file=args.rows_per_file) as exporter:
            if not args.follow:
                report(await exporter.export_once())
                return 0
            stop = asyncio.Event()
            signal_task = asyncio.create_task(wait_for_signal())
            signal_task.add_done_callback(lambda _t: stop.set())
            print(
                f"following namespace {settings.prefix!r} into {args.dir} (Ctrl-C stops)",
                flush=True,
            )
            await exporter.follow(stop, flush_interval=args.flush_interval, on_export=report)
            signal_task.cancel()
    except ExportDirBusy as exc:
        output.error(str(exc))
        return 1
    return 0


# --------------------------------------------------------------------------- sql


def _add_sql(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "query",
        nargs="?",
        help="SQL over the views runs, run_tree, run_ancestors, "
        "steps, events, llm_calls, tool_calls, decisions, costs, external_events, "
        "dead_letters, commands",
    )
    p.add_argument("--dir", default=None, help=DIR_HELP)
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.add_argument("--max-rows", type=int, default=200)
    p.add_argument(
        "--print-views",
        action="store_true",
        help="print the views as SQL for --dir (paths filled in), for the duckdb CLI: "
        "polos sql --print-views > polos.sql; duckdb -init polos.sql",
    )


def _cell(value: Any) -> output.Cell:
    if value is None:
        return output.styled("NULL", "dim")
    if isinstance(value, float):
        return repr(value)
    return str(value)


@command("sql", "run SQL (DuckDB) over the exported event log")(_add_sql)
async def cmd_sql(args: argparse.Namespace) -> int:
    import duckdb

    args.dir = args.dir or str(default_export_dir(data_dir(args)))

    if getattr(args, "print_views", False):
        print(
            f"-- Printed by `polos sql --print-views` for {Path(args.dir).resolve()}: the paths "
            "below are filled in;\n-- run it in duckdb with `duckdb -init FILE` or `.read FILE`.\n"
        )
        print(views_sql(args.dir))
        return 0
    if not args.query:
        output.error("polos sql QUERY (or --print-views)")
        return 2
    if not has_data(args.dir):
        where = Path(args.dir).resolve()
        print(
            f"nothing exported yet in {where}: `polos up` run from this directory exports "
            f"there as runs happen (unless --no-export); for another server, `polos analytics "
            f"export --dir {args.dir}`",
            file=sys.stderr,
        )
        return 1
    con = duckdb_connect(args.dir)
    try:
        rel = con.sql(args.query)
    except duckdb.Error as exc:
        output.error(str(exc))
        return 2
    if rel is None:  # a statement without a result (SET, CREATE ...)
        return 0
    columns = rel.columns
    if args.format == "table":
        rows = rel.limit(args.max_rows + 1).fetchall()
        more = len(rows) > args.max_rows
        rows = rows[: args.max_rows]
        cells = [[_cell(v) for v in r] for r in rows]
        # On a terminal the long columns (JSON, text) wrap; the short ones (ids) stay whole.
        long = [c for i, c in enumerate(columns) if max((len(r[i]) for r in cells), default=0) > 40]
        print(table(cells, columns, wrap=long or columns[-1:]))
        if more:
            output.hint(f"first {args.max_rows} rows shown (--max-rows N for more)")
        else:
            output.hint(f"{len(rows)} row{'s' * (len(rows) != 1)}")
        return 0
    rows = rel.fetchall()
    if args.format == "json":
        print(
            orjson.dumps([dict(zip(columns, r, strict=True)) for r in rows], default=str).decode()
        )
    else:
        import csv

        writer = csv.writer(sys.stdout)
        writer.writerow(columns)
        writer.writerows(rows)
    return 0


# --------------------------------------------------------------------------- telemetry


def _add_telemetry(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--once", action="store_true", help="emit spans for what is in the log now, then exit"
    )
    p.add_argument(
        "--retry-for",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="with --once: how long to retry an exporter that refuses spans before "
        "exiting 1 (the position stays before the spans not sent)",
    )


@command("telemetry", "emit OpenTelemetry spans from the run history (OTEL_* configure it)")(
    _add_telemetry
)
async def cmd_telemetry(args: argparse.Namespace) -> int:
    settings = settings_for(args, role="service")  # reads every stream of the namespace
    try:
        follower = SpanFollower(settings)
    except TelemetryConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    async with follower:
        if args.once:
            try:
                n = await follower.process_available(give_up_after=args.retry_for)
            except ExportStalled as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
            print(f"{n} events -> {follower.stats.spans} spans (position {follower.position})")
            return 0
        stop = asyncio.Event()
        signal_task = asyncio.create_task(wait_for_signal())
        signal_task.add_done_callback(lambda _t: stop.set())
        print(
            f"emitting spans for namespace {settings.prefix!r} from seq "
            f"{follower.position + 1} (Ctrl-C stops)",
            flush=True,
        )
        await follower.follow(stop)
        signal_task.cancel()
    return 0


# --------------------------------------------------------------------------- retention


def _add_retention(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--export-dir",
        default=None,
        help="the analytics export directory (its history table is the safe point; "
        "default: where `polos up` exports, DATA_DIR/exports)",
    )
    p.add_argument(
        "--older-than",
        type=float,
        default=7 * 24 * 3600,
        help="seconds a run must have been finished (default 7 days)",
    )
    p.add_argument("--dry-run", action="store_true", help="only say what would be archived")


@command("retention", "remove finished, exported runs from the hot history stream")(_add_retention)
async def cmd_retention(args: argparse.Namespace) -> int:
    export_dir = Path(args.export_dir or default_export_dir(data_dir(args)))
    upto = exported_upto(export_dir / "history")
    # Purging history is the services' right, not a client's.
    client = await PolosClient.connect(settings=settings_for(args, role="service"))
    try:
        result = await archive_exported_runs(
            client.nc,
            client.js,
            client.names,
            exported_upto=upto,
            older_than=args.older_than,
            dry_run=args.dry_run,
        )
    finally:
        await client.close()
    verb = "would archive" if args.dry_run else "archived"
    print(
        f"{verb} {len(result.archived)} runs (exported up to seq {upto}); kept "
        f"{result.kept_not_exported} not yet exported, {result.kept_too_recent} too recent; "
        f"{result.payload_objects_deleted} payload objects deleted"
    )
    return 0
