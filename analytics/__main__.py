"""``python -m analytics``: the analytics service. Follows the namespace's streams into Parquet
and, with ``--otel``, emits OpenTelemetry spans from the run history, until SIGTERM/SIGINT.
Any number may run against one namespace only if each has its own ``--dir`` (the files are the
export position); the span follower's position is shared in KV, so run one of those."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os

from polos._private.runtime import settings_from_args, wait_for_signal

from .export import Exporter, ExportResult

log = logging.getLogger("polos.analytics")


async def serve(args: argparse.Namespace) -> None:
    settings = settings_from_args(args)
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    follower = None
    if args.otel:
        from polos._private.telemetry import SpanFollower

        # Made first: an exporter that cannot be made stops the service before it reads.
        follower = SpanFollower(settings)

    def report(result: ExportResult) -> None:
        log.info("exported %s in %.3f s", result.rows, result.seconds)

    async with Exporter(settings, args.dir, rows_per_file=args.rows_per_file) as exporter:
        tasks.append(asyncio.create_task(
            exporter.follow(stop, flush_interval=args.flush_interval, on_export=report)))
        if follower is not None:
            await follower.start()
            tasks.append(asyncio.create_task(follower.follow(stop)))
        try:
            await wait_for_signal()
        finally:
            stop.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
            if follower is not None:
                await follower.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m analytics")
    parser.add_argument("--nats-url")
    parser.add_argument("--prefix")
    parser.add_argument("--dir", default=os.environ.get("POLOS_ANALYTICS_DIR", "polos-analytics"))
    parser.add_argument("--flush-interval", type=float,
                        default=float(os.environ.get("POLOS_ANALYTICS_FLUSH_INTERVAL", "5")))
    parser.add_argument("--rows-per-file", type=int, default=100_000)
    parser.add_argument("--otel", action="store_true",
                        help="also emit OpenTelemetry spans (configured by OTEL_* variables)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from polos._private.telemetry import TelemetryConfigError

    try:
        asyncio.run(serve(args))
    except TelemetryConfigError as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
