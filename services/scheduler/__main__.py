"""``python -m polos_services.scheduler``: run one scheduler instance until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import logging

from polos._private.ops.runtime import run_main, run_until_signal, settings_from_args, tune_gc

from .scheduler import Scheduler


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m polos_services.scheduler")
    parser.add_argument("--nats-url")
    parser.add_argument("--prefix")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = settings_from_args(args)
    tune_gc(settings)
    run_main(run_until_signal(Scheduler(settings)))


if __name__ == "__main__":
    main()
