"""The ``polos`` command (the ``polos`` script is ``polos.cli:main``). Every subcommand takes
``--nats-url`` (or ``POLOS_NATS_URL``), ``--prefix`` (or ``POLOS_PREFIX``) and ``--data-dir``.
The commands live in ``polos._private.cli`` and in the installed plugins."""

from __future__ import annotations

from polos._private.cli import COMMANDS, build_parser, main

__all__ = ["COMMANDS", "build_parser", "main"]

if __name__ == "__main__":
    main()
