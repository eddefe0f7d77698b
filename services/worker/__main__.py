"""``python -m polos_services.worker MODULE``: serve every workflow of MODULE until SIGTERM.

The same command as ``polos worker`` (one implementation, ``polos.worker.serve_module``),
logging at INFO like the other services.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from polos._private.ops.commands import DATA_DIR_HELP, add_worker_args, settings_for
from polos.errors import PolosError
from polos.worker import serve_module


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m polos_services.worker")
    parser.add_argument("--nats-url")
    parser.add_argument("--prefix")
    parser.add_argument("--data-dir", help=DATA_DIR_HELP)
    add_worker_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        asyncio.run(
            serve_module(
                args.module,
                settings_for(args, role="worker"),
                max_concurrent_runs=args.max_concurrent_runs,
                worker_id=args.worker_id,
                dev_llm=args.dev_llm,
            )
        )
        code = 0
    except KeyboardInterrupt:
        code = 130
    except (PolosError, ValueError, TimeoutError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 1
    sys.exit(code)


if __name__ == "__main__":
    main()
