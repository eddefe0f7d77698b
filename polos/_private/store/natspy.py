"""The one place that touches nats-py's private attributes.

Everything else goes through these functions; ``tests/test_natspy.py`` fails when nats-py
changes what they rely on.

- ``connection_of(js)``: the connection a JetStream context was made from (nats-py keeps it
  as ``JetStreamContext._nc`` and offers no public accessor).
- the header-block parser: ``Client._parse_header_lines`` is replaced by a faster one with the
  same results (``read.parse_header_lines``), checked against nats-py's own on samples first.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from polos._private.store.read import HEADER_SAMPLES, parse_header_lines


def connection_of(js: JetStreamContext) -> NATS:
    """The NATS connection behind ``js``."""
    nc: NATS = js._nc
    return nc


def _install_fast_header_parser() -> None:
    # Only over the implementation it was checked against (same results on the samples), and
    # never if POLOS_FAST_HEADERS=0.
    from nats.aio.client import Client

    current = getattr(Client, "_parse_header_lines", None)
    if current is None or current is parse_header_lines:
        return
    if os.environ.get("POLOS_FAST_HEADERS", "1") == "0":
        return
    try:
        same = all(current(s) == parse_header_lines(s) for s in HEADER_SAMPLES)
    except Exception:
        return
    if same:
        global NATS_HEADER_PARSER
        NATS_HEADER_PARSER = current
        Client._parse_header_lines = staticmethod(parse_header_lines)  # type: ignore[method-assign]


# nats-py's own parser, kept for the benchmark's before/after figure.
NATS_HEADER_PARSER: Callable[[bytes], dict[str, str]] | None = None
_install_fast_header_parser()


__all__ = ["NATS_HEADER_PARSER", "connection_of"]
