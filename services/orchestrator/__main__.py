"""``python -m polos_services.orchestrator``: run one orchestrator instance until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import logging

from polos._private.ops.runtime import service_main

from .orchestrator import Orchestrator


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m polos_services.orchestrator")
    parser.add_argument("--nats-url")
    parser.add_argument("--prefix")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    service_main(args, Orchestrator)


if __name__ == "__main__":
    main()
