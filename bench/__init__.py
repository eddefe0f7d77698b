"""The Polos benchmark: ``python -m bench`` or ``polos bench``. See BENCHMARKS.md."""

from __future__ import annotations

import argparse
import dataclasses
import os

from polos._private.ops.commands import command


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes: checks the benchmark runs, not how fast (CI smoke)",
    )
    p.add_argument(
        "--only",
        action="append",
        default=None,
        help="run only this figure (repeatable): publish, overhead, reads, e2e, first_step, "
        "throughput, failover, replay, long, suspend, export",
    )
    p.add_argument("--json", dest="json_path", help="also write the figures to this JSON file")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (server data, logs)")
    p.add_argument(
        "--suspended-runs",
        type=int,
        default=None,
        help="how many runs wait at once in the suspended-runs figure (default 10,000)",
    )
    p.add_argument(
        "--started-runs",
        type=int,
        default=None,
        help="how many of the --suspended-runs are started, suspended and resumed through the "
        "services, the rest being copies of one real suspended run written straight to the "
        "streams (default: all; e.g. --suspended-runs 1000000 --started-runs 50000 measures "
        "the services with a million runs waiting in a few minutes)",
    )
    p.add_argument(
        "--long-steps",
        type=int,
        default=None,
        help="completed steps of the long run the `long` figure resumes (default 10,000)",
    )
    p.add_argument(
        "--external",
        action="store_true",
        help="use the server at --nats-url instead of an embedded one",
    )
    p.add_argument(
        "--sync",
        choices=("always", "interval"),
        default=None,
        help="the embedded server's sync_interval, as `polos up --sync`: always = fsync "
        "every write before its ack; interval = the shipped 10 s (the default)",
    )
    p.add_argument(
        "--cluster",
        action="store_true",
        help="run against a 3-node loopback cluster with every stream R3 "
        "(POLOS_REPLICAS=3) instead of one server",
    )


@command("bench", "measure Polos against raw JetStream on this machine")(add_args)
async def cmd_bench(args: argparse.Namespace) -> int:
    # Imported here so `polos --help` does not pay for the benchmark's imports.
    from .runner import FIGURES, Sizes, run_bench

    only = set(args.only) if args.only else None
    unknown = (only or set()) - set(FIGURES)
    if unknown:
        print(
            f"error: unknown figure(s) {', '.join(sorted(unknown))}; choose from "
            f"{', '.join(FIGURES)}"
        )
        return 2
    url = (
        (getattr(args, "nats_url", None) or os.environ.get("POLOS_NATS_URL"))
        if args.external
        else None
    )
    if args.external and not url:
        print("error: --external needs --nats-url (or POLOS_NATS_URL)")
        return 2
    if args.external and (args.sync or args.cluster):
        print(
            "error: --sync and --cluster configure the servers the benchmark starts; "
            "with --external, configure your server"
        )
        return 2
    sizes = Sizes.quick() if args.quick else Sizes()
    if args.suspended_runs is not None and args.suspended_runs < 1:
        print("error: --suspended-runs must be at least 1")
        return 2
    if args.suspended_runs:
        sizes = dataclasses.replace(sizes, suspended_runs=args.suspended_runs)
    if args.started_runs is not None:
        if not 1 <= args.started_runs <= sizes.suspended_runs:
            print(
                f"error: --started-runs must be between 1 and --suspended-runs "
                f"({sizes.suspended_runs:,}), got {args.started_runs:,}"
            )
            return 2
        sizes = dataclasses.replace(sizes, started_runs=args.started_runs)
    if args.long_steps:
        sizes = dataclasses.replace(sizes, long_steps=args.long_steps)
    report = await run_bench(
        sizes,
        only=only,
        nats_url=url,
        keep=args.keep,
        json_path=args.json_path,
        sync=args.sync,
        cluster=args.cluster,
    )
    return 1 if report.failed else 0
