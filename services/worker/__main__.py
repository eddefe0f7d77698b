"""``python -m polos_services.worker MODULE``: serve every workflow of MODULE until SIGTERM.

The same command as ``polos worker`` (one implementation, ``polos._private.ops.serve``),
logging at INFO like the other services.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from polos._private.ops.commands import DATA_DIR_HELP
from polos._private.ops.serve import add_worker_args, serve_worker
from polos.errors import PolosError


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m polos_services.worker")
    parser.add_argument("--nats-url")
    parser.add_argument("--prefix")
    parser.add_argument("--data-dir", help=DATA_DIR_HELP)
    add_worker_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        code = asyncio.run(serve_worker(args))
    except KeyboardInterrupt:
        code = 130
    except (PolosError, ValueError, TimeoutError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 1
    sys.exit(code)


if __name__ == "__main__":
    main()
