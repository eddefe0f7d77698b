"""``python -m bench [--quick] [--only FIGURE] [--json PATH]``."""

from __future__ import annotations

import sys

from polos.cli import main

if __name__ == "__main__":
    main(["bench", *sys.argv[1:]])
