"""The one place that touches nats-py's private attributes.

Everything else goes through these functions; ``tests/test_natspy.py`` fails when nats-py
changes what they rely on.

- ``connection_of(js)``: the connection a JetStream context was made from (nats-py keeps it
  as ``JetStreamContext._nc`` and offers no public accessor).
- the header-block parser: ``Client._parse_header_lines`` is replaced by a faster one with the
  same results (``parse_header_lines``), checked against nats-py's own on samples first.
- ``sent(nc)``: until what the connection buffered is on its socket (``Client._pending_data_size``).
- ``write_batches(nc, messages)``: the replaced publish writes a connection's buffer to its
  socket itself (``Client._transport``, its ``StreamWriter``) once that many messages wait.
- ``coalesce_writes(nc, seconds)``, ``busy_when(nc, busy)``: nats-py's flusher task (``Client._flusher``) is
  replaced by the same loop that, while ``busy()`` says so, waits ``seconds`` before it
  writes; installed only over the implementation it copies (the names its code uses).
- ``subscribe_handing_over(nc, subject, on_msg)``: a subscription whose messages nats-py's read
  loop hands to a plain function as it parses them, through the slot nats-py keeps for the
  future of a one-reply request (``Subscription._future``).
- ``Client.publish`` is replaced by one that writes the same bytes (``publish_command``, checked
  against nats-py's own ``_send_publish`` on samples first) for a connected client, and leaves
  every other case (closed, draining, reconnecting, a full buffer, a payload over the limit) to
  nats-py's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

import nats.aio.client
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.aio.transport import TcpTransport
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
_BATCH = "_polos_write_batch"


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


def write_batches(nc: NATS, messages: int) -> None:
    """From now on ``nc`` writes what it buffered itself once ``messages`` are waiting (0:
    its flusher writes everything, once per turn of the event loop). Many tasks publishing in
    one turn (a worker's runs, each resumed by its ack) would otherwise go out in one write
    after the turn, nats-server would answer them all at once, and the two would take turns
    rather than work at the same time: measured, 200 runs appending at once made 17,000 appends
    a second with the client 64 % busy, 23,500 with writes of 8 or 32. Done by the replaced
    ``Client.publish``: where nats-py's own is kept (``FAST_PUBLISH`` false), it has no effect."""
    setattr(nc, _BATCH, max(0, messages))


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


class WildcardInbox:
    """One wildcard inbox subscription of a connection, made on first use, whose answers are
    told apart by their last token, a counter (``prefix + token``).

    An inbox per request costs a SUB and an UNSUB (each a change to the server's routing
    table) and, with nats-py's callback subscriptions, a task turn per message; this is paid
    once per connection. The publish acks' requester and the direct reader have one each, and
    route what arrives in ``on_msg`` (from the read loop: ``subscribe_handing_over``).
    """

    __slots__ = ("_lock", "_nc", "_next", "_on_msg", "_sub", "cut", "prefix")

    def __init__(self, nc: NATS, on_msg: Callable[[Msg], None]) -> None:
        self._nc = nc
        self._on_msg = on_msg
        self.prefix = nc.new_inbox() + "."
        self.cut = len(self.prefix)  # msg.subject[cut:] is the token it answers
        self._sub: Subscription | None = None
        self._lock = asyncio.Lock()
        self._next = 0

    async def ready(self) -> None:
        """Subscribed (once; concurrent first callers wait for the one subscription)."""
        if self._sub is None:
            async with self._lock:
                if self._sub is None:
                    self._sub = await subscribe_handing_over(
                        self._nc, self.prefix + "*", self._on_msg
                    )

    def token(self) -> str:
        """A token no answer on this inbox has had."""
        self._next += 1
        return str(self._next)


# nats-py's rule for a header name, and what it does to a value's line breaks.
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VALUE_NEWLINES = str.maketrans({"\r": " ", "\n": " "})
_NAMES: dict[str, bytes] = {}  # a checked header name -> its encoded "Name: "; few distinct names
_NAMES_MAX = 512


def _header_name(key: str) -> bytes | None:
    known = _NAMES.get(key)
    if known is not None:
        return known
    name = key.strip()
    if not name:
        return None  # nats-py skips an empty name
    if not _HEADER_NAME.fullmatch(name):
        raise nats.errors.BadHeaderError(name)
    encoded = name.encode() + b": "
    if len(_NAMES) < _NAMES_MAX:
        _NAMES[key] = encoded
    return encoded


def publish_command(
    subject: str, reply: str, payload: bytes, headers: dict[str, str] | None
) -> bytes:
    """The PUB or HPUB command nats-py 2.16's ``_send_publish`` buffers for a message, built
    without its per-call work on the header block: each name is checked once per process (a
    regular expression per header per publish), the block is joined once.

    Measured on a connected client, a fenced append's three headers: 8.4 µs per publish in
    nats-py's path against 1.9-2.5 µs here; a worker publishes about 12 per 10-step run."""
    if headers is None:
        return b"".join((f"PUB {subject} {reply} {len(payload)}\r\n".encode(), payload, b"\r\n"))
    parts = [b"NATS/1.0\r\n"]
    for key, value in headers.items():
        name = _header_name(key)
        if name is None:
            continue
        value = value.strip()
        if "\r" in value or "\n" in value:
            value = value.translate(_VALUE_NEWLINES)
        parts.append(name + value.encode() + b"\r\n")
    parts.append(b"\r\n")
    hdr = b"".join(parts)
    size = len(hdr)
    return b"".join(
        (f"HPUB {subject} {reply} {size} {size + len(payload)}\r\n".encode(), hdr, payload, b"\r\n")
    )


# What nats-py 2.16's ``Client.publish`` refers to: ``_publish`` repeats its checks, and leaves
# anything but a connected client with room in its buffer to it.
PUBLISH_NAMES = frozenset(
    {
        "ConnectionClosedError",
        "ConnectionDrainingError",
        "MaxPayloadError",
        "OutboundBufferLimitError",
        "_max_payload",
        "_max_pending_size",
        "_pending_data_size",
        "_send_publish",
        "_skip_subject_validation",
        "_validate_subject",
        "errors",
        "is_closed",
        "is_connected",
        "is_draining_pubs",
        "len",
    }
)
# Messages the built command is compared on with nats-py's before it is used.
PUBLISH_SAMPLES: tuple[tuple[str, str, bytes, dict[str, str] | None], ...] = (
    ("a.b", "", b"", None),
    ("polos.x.run.r1.ctl", "_INBOX.abc.7", b'{"k":1}', None),
    (
        "polos.x.run.r1.step",
        "_INBOX.abc.8",
        b"\x00\xffdata",
        {
            "Nats-Expected-Last-Subject-Sequence": "12",
            "Nats-Expected-Last-Subject-Sequence-Subject": "polos.x.run.r1.>",
            "Nats-Msg-Id": "r1/s/step-3",
        },
    ),
    ("s", "r", b"x", {" Padded ": "  v  ", "": "skipped", "Lines": "a\r\nb\nc", "Uni": "\u00e9"}),
)

NATS_PUBLISH: Callable[..., Any] | None = None  # nats-py's own, once replaced


async def _publish(
    self: NATS,
    subject: str,
    payload: bytes = b"",
    reply: str = "",
    headers: dict[str, str] | None = None,
) -> None:
    """``Client.publish`` for a connected client: the same checks and bytes as nats-py's, the
    command built by ``publish_command`` and the flusher woken without a coroutine of its own.
    Every publish of the process goes through here: appends and their acks, deliveries' acks,
    pull requests, reads, command answers."""
    flusher = self._flusher_task
    queue = self._flush_queue
    if (
        self._status != _CONNECTED  # closed, draining or reconnecting: nats-py's rules
        or queue is None
        or flusher is None
        or flusher.done()
        or len(payload) > self._max_payload
    ):
        assert NATS_PUBLISH is not None
        await NATS_PUBLISH(self, subject, payload, reply, headers)
        return
    if not self._skip_subject_validation:
        _validate_subject(subject)
        if reply:
            _validate_subject(reply)
    if not subject:
        raise nats.errors.BadSubjectError
    cmd = publish_command(subject, reply, payload, headers)
    if self._max_pending_size > 0 and self._pending_data_size + len(cmd) > self._max_pending_size:
        assert NATS_PUBLISH is not None
        await NATS_PUBLISH(self, subject, payload, reply, headers)  # it flushes a full buffer
        return
    pending = self._pending
    pending.append(cmd)
    self._pending_data_size += len(cmd)
    self.stats["out_msgs"] += 1
    self.stats["out_bytes"] += len(payload)
    batch: int = getattr(self, _BATCH, 0)
    if batch and len(pending) >= batch and _write_now(self):
        return
    if queue.empty():
        # nats-py's ``_flush_pending``: a future on the flusher's queue wakes it
        queue.put_nowait(asyncio.get_running_loop().create_future())


def _write_now(self: NATS) -> bool:
    """Write what ``self`` buffered to its socket now, as its flusher would (False: left to
    the flusher, which waits for a full socket to drain). For a plain TCP connection whose
    socket takes it."""
    transport = self._transport
    if type(transport) is not TcpTransport:
        return False  # a WebSocket one writes its own way
    writer = transport._io_writer
    if writer is None or writer.transport.get_write_buffer_size() > _WRITE_NOW_MAX_BACKLOG:
        return False
    transport.writelines(self._pending)  # type: ignore[no-untyped-call]  # as the flusher
    self._pending = []
    self._pending_data_size = 0
    return True


# Bytes waiting in a socket's buffer beyond which a connection leaves its writes to its
# flusher (which awaits the socket's drain) rather than add to them.
_WRITE_NOW_MAX_BACKLOG = 1 << 20


def _no_validation(subject: str) -> None:
    raise RuntimeError("nats-py has no _validate_subject: the fast publish is not installed")


# nats-py's own subject check (CR, LF or whitespace in a subject would inject protocol lines).
_validate_subject: Callable[[str], None] = getattr(
    nats.aio.client, "_validate_subject", _no_validation
)
_CONNECTED = NATS.CONNECTED


def _nats_py_command(
    subject: str, reply: str, payload: bytes, headers: dict[str, str] | None
) -> bytes:
    """What nats-py's own ``_send_publish`` buffers for the message, on a client never
    connected (it has no flusher to wake, so the coroutine finishes without suspending)."""
    from nats.aio.client import Client

    c = Client()
    coro = c._send_publish(subject, reply, payload, len(payload), headers)
    try:
        coro.send(None)
    except StopIteration:
        return b"".join(c._pending)
    coro.close()
    raise RuntimeError("nats-py's _send_publish suspended")


def _install_fast_publish() -> bool:
    from nats.aio.client import Client

    if Client.publish is _publish:
        return True
    if os.environ.get("POLOS_FAST_PUBLISH", "1") == "0":
        return False
    if frozenset(Client.publish.__code__.co_names) != PUBLISH_NAMES:
        return False
    if _validate_subject is _no_validation:
        return False
    try:
        same = all(
            _nats_py_command(*sample) == publish_command(*sample) for sample in PUBLISH_SAMPLES
        )
    except Exception:
        return False
    if not same:
        return False
    global NATS_PUBLISH
    NATS_PUBLISH = Client.publish
    Client.publish = _publish  # type: ignore[method-assign]
    return True


FAST_PUBLISH = _install_fast_publish()


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
    "FAST_PUBLISH",
    "FLUSHER_NAMES",
    "HEADER_SAMPLES",
    "NATS_FLUSHER",
    "NATS_HEADER_PARSER",
    "NATS_PUBLISH",
    "PUBLISH_NAMES",
    "PUBLISH_SAMPLES",
    "WildcardInbox",
    "busy_when",
    "coalesce_writes",
    "connection_of",
    "nats_own_header_parser",
    "parse_header_lines",
    "publish_command",
    "sent",
    "subscribe_handing_over",
    "write_batches",
]
