"""``python -m polos ...`` is the ``polos`` command."""

from polos.cli import main

main()
