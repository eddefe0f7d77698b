"""The one place that touches nats-py's private attributes.

Everything else goes through these functions; ``tests/test_natspy.py`` fails when nats-py
changes what they rely on.

- ``connection_of(js)``: the connection a JetStream context was made from (nats-py keeps it
  as ``JetStreamContext._nc`` and offers no public accessor).
- the header-block parser: ``Client._parse_header_lines`` is replaced by a faster one with the
  same results (``parse_header_lines``), checked against nats-py's own on samples first.
- ``sent(nc)``: until what the connection buffered is on its socket (``Client._pending_data_size``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Iterator

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

_HDR_WS = " \t\n\r\x0b\x0c"  # what bytes.strip() strips: the ASCII path must strip the same


def parse_header_lines(raw: bytes) -> dict[str, str]:
    """nats-py's header-block parser, same results, about 3x faster.

    Every message with headers goes through it (each event of a history read, each command,
    each fenced append's echo to subscribers): it was 40% of a history read and 30% of the
    orchestrator's CPU under load. nats-py checks each header name for whitespace one character
    at a time in a generator; here an all-ASCII block (the normal case) is decoded once and
    checked with C-level string methods. Anything else takes nats-py's own byte-level steps.
    """
    out: dict[str, str] = {}
    if raw.isascii():
        for line in raw.decode("ascii").split("\r\n"):
            name, sep, value = line.partition(":")
            if not sep:
                continue
            key = name.strip(_HDR_WS)
            if key and key.split() != [key]:  # a name with whitespace inside is dropped
                continue
            out[key] = value.strip(_HDR_WS)
        return out
    for bline in raw.split(b"\r\n"):
        bname, bsep, bvalue = bline.partition(b":")
        if not bsep:
            continue
        try:
            key = bname.strip().decode("ascii")
        except UnicodeDecodeError:
            continue
        if key and key.split() != [key]:
            continue
        out[key] = bvalue.strip().decode("utf-8", "replace")
    return out


HEADER_SAMPLES = (
    b"Nats-Msg-Id: a/s/1\r\nNats-Sequence: 12\r\n\r\n",
    b"A:b\r\nBad Name: x\r\n \tC :\t d \r\nno colon\r\n:\r\nE: \xc3\xa9\xff\r\n\xc3\xa9: x\r\n",
    b"K\x1c: v\x1c\r\nK2:\x0bv\x0c\r\n",
    b"",
)


async def sent(nc: NATS, turns: int = 8) -> None:
    """Until what ``nc`` has buffered is written to its socket, for at most ``turns`` turns
    of the event loop. nats-py writes from a flusher task, a turn or two after a publish: work
    that holds the loop right after a request (a long re-walk) would hold the request back
    too, where it could be on its way meanwhile."""
    for _ in range(turns):
        await asyncio.sleep(0)  # the publishing task, then the flusher, take their turns
        if not nc._pending_data_size:
            return


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


@contextlib.contextmanager
def nats_own_header_parser() -> Iterator[None]:
    """nats-py's own header parser for the duration (the benchmark's before/after figure)."""
    from nats.aio.client import Client

    original = NATS_HEADER_PARSER
    if original is None:
        yield
        return
    Client._parse_header_lines = staticmethod(original)  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        Client._parse_header_lines = staticmethod(parse_header_lines)  # type: ignore[method-assign]


__all__ = [
    "HEADER_SAMPLES",
    "NATS_HEADER_PARSER",
    "connection_of",
    "nats_own_header_parser",
    "parse_header_lines",
    "sent",
]
