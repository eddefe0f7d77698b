"""``python -m polos_analytics``: the analytics service. Follows the namespace's streams into
Parquet and, with ``--otel``, emits OpenTelemetry spans from the run history, until
SIGTERM/SIGINT (or, with ``--until-stdin-closes``, until its parent closes its stdin: how
`polos up` runs it). One exporter per ``--dir`` (the files are the export position; a second
one on the same directory is refused); the span follower's position is shared in KV, so run
one of those per namespace."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys

from polos._private.ops.runtime import default_export_dir, settings_from_args, wait_for_signal

from .export import ExportDirBusy, Exporter, ExportResult

log = logging.getLogger("polos.analytics")


async def _stdin_closed() -> None:
    """Returns when stdin reaches its end: the parent that holds its other end is gone."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while await reader.read(4096):
        pass


async def serve(args: argparse.Namespace) -> None:
    settings = settings_from_args(args)
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []

    def report(result: ExportResult) -> None:
        log.info("exported %s in %.3f s", result.rows, result.seconds)

    exporter = None
    follower = None
    if args.otel:
        from .spans import SpanFollower

        # Made first: an exporter that cannot be made stops the service before it reads.
        follower = SpanFollower(settings)
    try:
        if args.export:
            exporter = Exporter(settings, args.dir, rows_per_file=args.rows_per_file)
            await exporter.connect()
            tasks.append(
                asyncio.create_task(
                    exporter.follow(
                        stop,
                        flush_interval=args.flush_interval,
                        on_export=report,
                        idle=args.idle,
                        max_lag=args.max_lag,
                    )
                )
            )
            log.info("exporting namespace %r into %s", settings.prefix, args.dir)
        if follower is not None:
            await follower.start()
            tasks.append(asyncio.create_task(follower.follow(stop)))
            log.info("emitting spans for namespace %r", settings.prefix)
        ends = [asyncio.ensure_future(wait_for_signal())]
        if args.until_stdin_closes:
            ends.append(asyncio.ensure_future(_stdin_closed()))
        try:
            await asyncio.wait(ends, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for end in ends:
                end.cancel()
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
        if follower is not None:
            await follower.stop()
        if exporter is not None:
            await exporter.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m polos_analytics")
    parser.add_argument("--nats-url")
    parser.add_argument("--prefix")
    parser.add_argument(
        "--dir",
        default=str(default_export_dir()),
        help="where the Parquet files go (env POLOS_ANALYTICS_DIR, default "
        "<POLOS_DATA_DIR or .polos>/exports)",
    )
    parser.add_argument(
        "--export",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="follow the streams into Parquet (--no-export: spans only)",
    )
    parser.add_argument(
        "--flush-interval",
        type=float,
        default=float(os.environ.get("POLOS_ANALYTICS_FLUSH_INTERVAL", "5")),
    )
    parser.add_argument("--rows-per-file", type=int, default=100_000)
    parser.add_argument(
        "--idle",
        type=float,
        default=0.0,
        help="export only once the streams were quiet this many seconds (0: at "
        "once), so a pass never competes with a burst of appends",
    )
    parser.add_argument(
        "--max-lag",
        type=float,
        default=30.0,
        help="with --idle: export at the latest this many seconds after new messages, quiet or not",
    )
    parser.add_argument(
        "--otel",
        action="store_true",
        help="also emit OpenTelemetry spans (configured by OTEL_* variables)",
    )
    parser.add_argument(
        "--until-stdin-closes",
        action="store_true",
        help="also stop when stdin closes (a parent process holds it open)",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="lower this process's CPU priority by N (os.nice): beside the "
        "services on one machine, exporting yields the CPU to them",
    )
    args = parser.parse_args(argv)
    if args.nice:
        os.nice(args.nice)
    if not (args.export or args.otel):
        parser.error("nothing to do: --no-export without --otel")
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    from .spans import TelemetryConfigError

    try:
        asyncio.run(serve(args))
    except (ExportDirBusy, TelemetryConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
