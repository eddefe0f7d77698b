"""The top layer: the ``polos`` command (``polos.cli:main``), its subcommands and the demo.

Nothing imports it but the entry point; it reaches the server side only through the
entry-point registry (``polos._private.ops.plugins``).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import sys

from polos._private.ops import plugins
from polos._private.ops.commands import COMMANDS, DATA_DIR_HELP
from polos.errors import PolosError

# The SDK's own subcommands, registered on import; the installed plugins add theirs
# (``polos.commands`` entry points: the analytics, the web UI, the benchmark).
_OWN = ("core", "ops", "queues", "waiting", "trace", "demo", "check_deploy", "verbs")


def _load_plugins() -> None:
    for name in _OWN:
        importlib.import_module(f"polos.cli.{name}")
    plugins.load_commands()


def build_parser() -> argparse.ArgumentParser:
    _load_plugins()
    parser = argparse.ArgumentParser(
        prog="polos", description="Durable execution for AI agents on NATS JetStream"
    )
    parser.add_argument("--nats-url", help="NATS server or cluster URL (env POLOS_NATS_URL)")
    parser.add_argument(
        "--prefix", help="namespace of subjects, streams and buckets (env POLOS_PREFIX)"
    )
    parser.add_argument("--data-dir", help=DATA_DIR_HELP)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add_args, _, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        # Accept the global flags after the subcommand too: `polos runs --nats-url ...`.
        p.add_argument("--nats-url", dest="nats_url", default=argparse.SUPPRESS)
        p.add_argument("--prefix", dest="prefix", default=argparse.SUPPRESS)
        add_args(p)
        if not any("--data-dir" in a.option_strings for a in p._actions):  # demo has its own
            p.add_argument(
                "--data-dir", dest="data_dir", default=argparse.SUPPRESS, help=DATA_DIR_HELP
            )
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    handler = COMMANDS[args.command][1]
    try:
        code: int = asyncio.run(handler(args))
    except KeyboardInterrupt:
        code = 130
    except (PolosError, ValueError, TimeoutError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 1
    sys.exit(code)


__all__ = ["COMMANDS", "build_parser", "main"]
