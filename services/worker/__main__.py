"""``python -m polos_services.worker MODULE``: serve every workflow of MODULE until SIGTERM.

The same command as ``polos worker`` (one implementation), logging at INFO like the other
services.
"""

from __future__ import annotations

import sys

from polos.cli import main as polos_main


def main(argv: list[str] | None = None) -> None:
    polos_main(["-v", "worker", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
