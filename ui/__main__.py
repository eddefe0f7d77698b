"""``python -m polos_ui`` is ``polos ui``."""

from __future__ import annotations

import sys

from polos.cli import main

main(["ui", *sys.argv[1:]])
