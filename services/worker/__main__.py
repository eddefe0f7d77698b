"""``python -m polos_services.worker MODULE``: serve every workflow of MODULE until SIGTERM."""

from __future__ import annotations

import argparse
import logging

from polos._private.runtime import load_workflows, run_main, run_until_signal, settings_from_args
from polos.worker import Worker


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m polos_services.worker")
    parser.add_argument("module", help="module name or .py file that defines @workflow functions")
    parser.add_argument("--nats-url")
    parser.add_argument("--prefix")
    parser.add_argument("--max-concurrent-runs", type=int, default=200)
    parser.add_argument("--worker-id")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    worker = Worker(
        load_workflows(args.module),
        settings=settings_from_args(args),
        max_concurrent_runs=args.max_concurrent_runs,
        worker_id=args.worker_id,
    )
    run_main(run_until_signal(worker))


if __name__ == "__main__":
    main()
