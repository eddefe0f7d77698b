"""The one place that touches nats-py's private attributes.

Everything else goes through these functions; ``tests/test_natspy.py`` fails when nats-py
changes what they rely on.

- ``connection_of(js)``: the connection a JetStream context was made from (nats-py keeps it
  as ``JetStreamContext._nc`` and offers no public accessor).
- the header-block parser: ``Client._parse_header_lines`` is replaced by a faster one with the
  same results (``parse_header_lines``), checked against nats-py's own on samples first.
- ``sent(nc)``: until what the connection buffered is on its socket (``Client._pending_data_size``).
- ``coalesce_writes(nc, seconds)``, ``busy_when(nc, busy)``: nats-py's flusher task (``Client._flusher``) is
  replaced by the same loop that, while ``busy()`` says so, waits ``seconds`` before it
  writes; installed only over the implementation it copies (the names its code uses).
- ``subscribe_handing_over(nc, subject, on_msg)``: a subscription whose messages nats-py's read
  loop hands to a plain function as it parses them, through the slot nats-py keeps for the
  future of a one-reply request (``Subscription._future``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext

log = logging.getLogger("polos.natspy")

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


# What nats-py 2.16's ``Client._flusher`` refers to: ``_coalescing_flusher`` is that loop with
# one wait added. Another implementation keeps its own flusher (and writes at once).
FLUSHER_NAMES = frozenset(
    {
        "_transport",
        "_flush_queue",
        "is_connected",
        "is_connecting",
        "get",
        "_pending_data_size",
        "writelines",
        "_pending",
        "drain",
        "OSError",
        "_error_cb",
        "_process_op_err",
        "done",
        "set_result",
        "asyncio",
        "CancelledError",
        "RuntimeError",
        "AttributeError",
    }
)
_HOLD = "_polos_write_hold"  # our attributes on a nats-py Client (a plain class)
_BUSY = "_polos_write_busy"


async def _coalescing_flusher(self: NATS) -> None:
    """nats-py's flusher: wait for a kick, write everything buffered, resolve the kick. Here,
    a connection told to (``coalesce_writes``) first waits its hold while it is busy: what its
    other tasks publish meanwhile goes in the same write."""
    while True:
        if not self.is_connected or self.is_connecting:
            break
        # Looked up each time, as nats-py does: a reconnect makes a new queue and a new task.
        queue: asyncio.Queue[asyncio.Future[None]] = self._flush_queue  # type: ignore[assignment]
        future = await queue.get()
        try:
            if self._pending_data_size > 0:
                hold: float = getattr(self, _HOLD, 0.0)
                if hold:
                    busy: Callable[[], bool] | None = getattr(self, _BUSY, None)
                    if busy is not None and busy():
                        await asyncio.sleep(hold)
                transport = self._transport
                assert transport is not None
                transport.writelines(self._pending[:])
                self._pending = []
                self._pending_data_size = 0
                await transport.drain()  # type: ignore[no-untyped-call]
        except OSError as e:
            await self._error_cb(e)
            await self._process_op_err(e)
            break
        except (asyncio.CancelledError, RuntimeError, AttributeError):
            # RuntimeError: the event loop is closed (as nats-py has it)
            break
        finally:
            if not future.done():
                future.set_result(None)


def _install_coalescing_flusher() -> bool:
    from nats.aio.client import Client

    current = Client._flusher
    if current is _coalescing_flusher:
        return True
    if frozenset(current.__code__.co_names) != FLUSHER_NAMES:
        return False
    global NATS_FLUSHER
    NATS_FLUSHER = current
    Client._flusher = _coalescing_flusher  # type: ignore[method-assign]
    return True


# nats-py's own flusher, once replaced (for the test that pins what it refers to).
NATS_FLUSHER: Callable[..., Any] | None = None


# Before any connection exists: each connection starts its flusher when it connects (and
# again after a reconnect). Without a hold a connection writes exactly as nats-py does.
COALESCING = _install_coalescing_flusher()


def coalesce_writes(nc: NATS, seconds: float) -> None:
    """From now on ``nc`` holds its writes ``seconds`` while it is busy (0: never); what says
    so is given by ``busy_when`` (``store.writes`` counts the requests in flight)."""
    setattr(nc, _HOLD, max(0.0, seconds))


def busy_when(nc: NATS, busy: Callable[[], bool]) -> None:
    """What tells whether ``nc`` is busy enough to hold its writes."""
    setattr(nc, _BUSY, busy)


class _Handover:
    """Taken by nats-py for the future of a one-reply request (``subscribe(future=)``): it
    calls ``set_result(msg)`` from its read loop for each message of the subscription, so each
    is handed to ``on_msg`` there. A subscription with a callback instead puts each message on
    a queue for a task of its own: a turn of the event loop, a queue put and get and a task
    switch per message, on every publish ack, read result and delivery."""

    __slots__ = ("_on_msg",)

    def __init__(self, on_msg: Callable[[Msg], None]) -> None:
        self._on_msg = on_msg

    def cancelled(self) -> bool:
        return False

    def done(self) -> bool:
        return False

    def set_result(self, msg: Msg) -> None:
        try:
            self._on_msg(msg)
        except Exception:
            # Raised into nats-py's read loop it would close the connection: one bad message
            # must not cost every request on it.
            log.exception("handling a message on %s failed", msg.subject)


async def subscribe_handing_over(
    nc: NATS, subject: str, on_msg: Callable[[Msg], None]
) -> Subscription:
    """Subscribe ``subject`` with ``on_msg`` called for each message from nats-py's read loop,
    as it is parsed. ``on_msg`` must be quick and must not block: it runs between the reads of
    the connection (it resolves a future or starts a task). Unlimited messages (``max_msgs`` 0:
    nats-py keeps the subscription), no pending queue and so no slow-consumer limit."""
    return await nc.subscribe(subject, future=_Handover(on_msg))  # type: ignore[arg-type]


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
    "COALESCING",
    "FLUSHER_NAMES",
    "HEADER_SAMPLES",
    "NATS_FLUSHER",
    "NATS_HEADER_PARSER",
    "busy_when",
    "coalesce_writes",
    "connection_of",
    "nats_own_header_parser",
    "parse_header_lines",
    "sent",
    "subscribe_handing_over",
]
