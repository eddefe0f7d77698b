"""The JetStream layer: fenced appends, history reads and task pulling.

Names and the topology are in ``polos._private.store`` (re-exported here): a subject's shape
and a stream's configuration are defined once, there.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import heapq
import logging
import os
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, get_args

import nats
import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
)

from polos import history as ev
from polos._private import connection, payloads

# The catalogue of names and the topology live in the store layer; re-exported here so the
# rest of the tree keeps importing them from jetstream.
from polos._private.store.names import RUN_KINDS as RUN_KINDS
from polos._private.store.names import Names as Names
from polos._private.store.topology import check_topology as check_topology
from polos._private.store.topology import ensure_topology as ensure_topology
from polos.config import Settings
from polos.errors import ConnectionFailedError

_T = TypeVar("_T")

log = logging.getLogger("polos.jetstream")

EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
EXPECTED_LAST_SUBJECT_SEQ_SUBJECT = "Nats-Expected-Last-Subject-Sequence-Subject"
MSG_ID = "Nats-Msg-Id"
REPLY_HEADER = "Polos-Reply"  # where the orchestrator answers a command, when the sender asks
WRONG_LAST_SEQUENCE = 10071


def valid_token(value: str) -> bool:
    """True if ``value`` can be one subject token (run ids, workflow names)."""
    return bool(value) and len(value) <= 128 and all(c.isalnum() or c in "_-" for c in value)


class FencedOut(Exception):
    """An append found the run's history moved on: another writer owns the run now."""

    def __init__(self, run_id: str, expected: int) -> None:
        super().__init__(f"run {run_id}: history moved past seq {expected}")
        self.run_id = run_id
        self.expected = expected


class AppendUnavailable(TimeoutError):
    """JetStream did not take an append in time (leader election, restart): try the run later.

    Not the run's fault, so it must never fail the run; the worker hands the task back.
    """


async def connect(
    settings: Settings,
    name: str,
    *,
    on_reconnect: Callable[[], Awaitable[None]] | None = None,
) -> NATS:
    """Connect a command or a client: fails fast with ``ConnectionFailedError``; once
    connected, reconnects forever (see ``polos._private.connection``)."""
    return await connection.connect(settings, name, on_reconnect=on_reconnect)


# Where a long-running process learns that its connection failed for good.
Fatal = connection.Fatal


async def connect_service(
    settings: Settings,
    name: str,
    *,
    on_fatal: Callable[[ConnectionFailedError], None],
    on_reconnect: Callable[[], Awaitable[None]] | None = None,
) -> NATS:
    """Connect a long-running process: waits for the server, reconnects forever, and calls
    ``on_fatal`` when the server refuses its credentials (see ``polos._private.connection``)."""
    return await connection.connect_service(
        settings, name, on_fatal=on_fatal, on_reconnect=on_reconnect
    )


async def close(nc: NATS, *, flush_timeout: float = 2.0) -> None:
    """Close a connection whose owner has already stopped its own consumers.

    Not ``drain()``: nats-py's drain waits (up to 30 s) for every subscription's pending
    messages to be consumed, and an iterator subscription nobody reads any more (a KV watcher
    of a cancelled task) never empties. Unacknowledged JetStream messages are redelivered to
    another instance anyway; what matters is that our own publishes are flushed.
    """
    with contextlib.suppress(Exception):
        await asyncio.wait_for(nc.flush(), timeout=flush_timeout)
    with contextlib.suppress(Exception):
        await nc.close()


# --------------------------------------------------------------------------- appends


async def append(
    js: JetStreamContext,
    names: Names,
    run_id: str,
    event: ev.Event,
    *,
    expected_last_seq: int,
    msg_id: str,
    timeout: float = 5.0,
) -> int:
    """Append ``event`` to the run's history iff the history still ends at ``expected_last_seq``.

    The fence covers all of the run's subjects. A retried append (its ack was lost) must not
    write twice: the message id de-duplicates it, but the server checks the fence before the
    id, so a retry whose first try was stored is refused as fenced. That refusal is recognised
    by finding our own message id at the end of the subject, and returns its sequence.
    """
    headers = {
        EXPECTED_LAST_SUBJECT_SEQ: str(expected_last_seq),
        EXPECTED_LAST_SUBJECT_SEQ_SUBJECT: names.run_filter(run_id),
        MSG_ID: msg_id,
    }
    subject = names.run_subject(run_id, event.KIND)
    payload = ev.encode(event)
    limit = payloads.inline_limit(js._nc)
    if len(payload) > limit:
        # Too big for one message: large fields go to the Object Store, the event to a stub.
        payload = await payloads.offload(js, names, run_id, orjson.loads(payload), limit)
        headers[payloads.HEADER] = "refs"

    async def once(attempt: int) -> int:
        try:
            ack = await publish(js._nc, subject, payload, timeout=timeout, headers=headers)
        except nats.js.errors.APIError as exc:
            if exc.err_code != WRONG_LAST_SEQUENCE:
                raise
            if attempt:
                mine = await _stored_by_us(js, names, subject, msg_id, payload)
                if mine is not None:
                    return mine
            raise FencedOut(run_id, expected_last_seq) from exc
        if ack.duplicate and not await _is_stored_at(js, names, subject, ack.seq, payload):
            # A clustered stream's leader answers a known message id before it checks the
            # fence: "duplicate" then means an earlier execution of the run wrote this record
            # (a stale task, a lost ack), not that this append landed.
            raise FencedOut(run_id, expected_last_seq)
        return ack.seq

    return await retry_transient(once, timeout=timeout, what=f"append to run {run_id}")


async def _is_stored_at(
    js: JetStreamContext, names: Names, subject: str, seq: int, payload: bytes
) -> bool:
    """Whether the message at ``seq`` is this very append (same bytes: another writer's
    record of the same fact has another timestamp)."""
    msgs = await read_subject(js._nc, names.runs_stream, subject, start_seq=seq, limit=1)
    return bool(msgs) and msgs[0].seq == seq and msgs[0].data == payload


def is_transient(exc: BaseException) -> bool:
    """Whether JetStream may take the same request a moment later: no stream leader (an
    election), no responders, a reconnect, or no answer (maybe a lost ack)."""
    if isinstance(exc, nats.js.errors.APIError):
        return exc.code == 503
    return isinstance(exc, (nats.errors.TimeoutError, nats.errors.NoRespondersError,
                            nats.js.errors.NoStreamResponseError,
                            nats.errors.ConnectionReconnectingError))


async def retry_transient(
    op: Callable[[int], Awaitable[_T]], *, timeout: float, what: str
) -> _T:
    """``op(attempt)`` until it returns, retrying transient errors (``is_transient``) with
    back-off for long enough to ride out a leader election or a server restart; then
    ``AppendUnavailable``. Only for writes a retry cannot double: a ``Nats-Msg-Id`` or a
    fence makes the server drop or refuse a second copy."""
    deadline = time.monotonic() + max(timeout * 6, 30.0)
    attempt = 0
    while True:
        try:
            return await op(attempt)
        except Exception as exc:
            if not is_transient(exc):
                raise
        attempt += 1
        if time.monotonic() > deadline:
            raise AppendUnavailable(f"{what} timed out")
        await asyncio.sleep(min(0.05 * 2**attempt, 1.0))


async def _stored_by_us(
    js: JetStreamContext, names: Names, subject: str, msg_id: str, payload: bytes
) -> int | None:
    """The sequence of the last message on ``subject`` if it is this very append: same id and
    same bytes (another writer's record of the same fact has another timestamp)."""
    last = await last_for_subject(js._nc, names.runs_stream, subject)
    if last is not None and (last.headers or {}).get(MSG_ID) == msg_id and last.data == payload:
        return last.seq
    return None


# --------------------------------------------------------------------------- reads


@dataclass(frozen=True, slots=True)
class StoredMsg:
    seq: int
    subject: str
    data: bytes
    time: str | None
    headers: dict[str, str] | None


_HDR_WS = " \t\n\r\x0b\x0c"  # what bytes.strip() strips: the ASCII path must strip the same


def _parse_header_lines(raw: bytes) -> dict[str, str]:
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


_HDR_SAMPLES = (
    b"Nats-Msg-Id: a/s/1\r\nNats-Sequence: 12\r\n\r\n",
    b"A:b\r\nBad Name: x\r\n \tC :\t d \r\nno colon\r\n:\r\nE: \xc3\xa9\xff\r\n\xc3\xa9: x\r\n",
    b"K\x1c: v\x1c\r\nK2:\x0bv\x0c\r\n",
    b"",
)


def _install_fast_header_parser() -> None:
    # Only over the implementation it was checked against (same results on the samples), and
    # never if POLOS_FAST_HEADERS=0.
    from nats.aio.client import Client

    current = getattr(Client, "_parse_header_lines", None)
    if current is None or current is _parse_header_lines:
        return
    if os.environ.get("POLOS_FAST_HEADERS", "1") == "0":
        return
    try:
        same = all(current(s) == _parse_header_lines(s) for s in _HDR_SAMPLES)
    except Exception:
        return
    if same:
        global NATS_HEADER_PARSER
        NATS_HEADER_PARSER = current
        Client._parse_header_lines = staticmethod(_parse_header_lines)  # type: ignore[method-assign]


# nats-py's own parser, kept for the benchmark's before/after figure.
NATS_HEADER_PARSER: Callable[[bytes], dict[str, str]] | None = None
_install_fast_header_parser()


class _Batch:
    __slots__ = ("done", "msgs")

    def __init__(self) -> None:
        self.msgs: list[StoredMsg] = []
        self.done: asyncio.Future[dict[str, str]] = asyncio.get_running_loop().create_future()


class _DirectReader:
    """One wildcard inbox subscription per connection for every batch direct get it makes.

    Reading a run's history is on the hot path (every task a worker takes starts with it).
    A subscription per read costs a SUB and an UNSUB, and ``next_msg`` costs a task per
    message; here each answer is routed by its inbox token to its batch in a callback, which
    halves the time of a read.
    """

    def __init__(self, nc: NATS) -> None:
        self._nc = nc
        self._prefix = nc.new_inbox() + "."
        self._cut = len(self._prefix)
        self._open: dict[str, _Batch] = {}
        self._sub: Any = None
        self._lock = asyncio.Lock()
        self._next = 0

    async def _on_msg(self, msg: Msg) -> None:
        batch = self._open.get(msg.subject[self._cut :])
        if batch is None:
            return  # the rest of a batch whose reader gave up (timeout)
        hdrs = msg.headers or {}
        if hdrs.get("Status"):
            if not batch.done.done():
                batch.done.set_result(hdrs)
            return
        batch.msgs.append(
            StoredMsg(
                seq=int(hdrs["Nats-Sequence"]),
                subject=hdrs.get("Nats-Subject", ""),
                data=msg.data,
                time=hdrs.get("Nats-Time-Stamp"),
                headers=hdrs,
            )
        )

    async def get(self, stream: str, req: dict[str, Any], timeout: float) -> tuple[_Batch, dict[str, str]]:
        if self._sub is None:
            async with self._lock:
                if self._sub is None:
                    self._sub = await self._nc.subscribe(self._prefix + "*", cb=self._on_msg)
        self._next += 1
        token = str(self._next)
        batch = _Batch()
        self._open[token] = batch
        try:
            await self._nc.publish(
                f"$JS.API.DIRECT.GET.{stream}", orjson.dumps(req), reply=self._prefix + token
            )
            # The timeout is for silence, not for the whole batch: a long answer still streaming
            # in is not a dead server.
            seen = -1
            while True:
                done, _ = await asyncio.wait((batch.done,), timeout=timeout)
                if done:
                    return batch, batch.done.result()
                if len(batch.msgs) == seen:
                    raise nats.errors.TimeoutError
                seen = len(batch.msgs)
        finally:
            self._open.pop(token, None)


_readers: weakref.WeakKeyDictionary[NATS, _DirectReader] = weakref.WeakKeyDictionary()


def _expire(fut: asyncio.Future[Msg]) -> None:
    if not fut.done():
        fut.set_exception(nats.errors.TimeoutError())


class _Requester:
    """Request/reply for JetStream's publish acks over one wildcard inbox subscription.

    What nats-py's ``js.publish`` costs beyond the round trip (measured: a random token from
    ``os.urandom`` per request, ``asyncio.wait_for``, stdlib JSON and a ``PubAck`` per ack) is
    CPU taken from the workers and the orchestrator on every append. Here a counter names each
    request, a timer handle bounds it, and orjson reads the ack.
    """

    def __init__(self, nc: NATS) -> None:
        self._nc = nc
        self._prefix = nc.new_inbox() + "."
        self._cut = len(self._prefix)
        self._open: dict[str, asyncio.Future[Msg]] = {}
        self._sub: Any = None
        self._lock = asyncio.Lock()
        self._next = 0

    async def _on_msg(self, msg: Msg) -> None:
        fut = self._open.pop(msg.subject[self._cut :], None)
        if fut is not None and not fut.done():
            fut.set_result(msg)

    async def request(
        self, subject: str, payload: bytes, headers: dict[str, str] | None, timeout: float
    ) -> Msg:
        if self._sub is None:
            async with self._lock:
                if self._sub is None:
                    self._sub = await self._nc.subscribe(self._prefix + "*", cb=self._on_msg)
        self._next += 1
        token = str(self._next)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Msg] = loop.create_future()
        self._open[token] = fut
        timer = loop.call_later(timeout, _expire, fut)
        try:
            await self._nc.publish(subject, payload, reply=self._prefix + token, headers=headers)
            return await fut
        finally:
            timer.cancel()
            self._open.pop(token, None)


_requesters: weakref.WeakKeyDictionary[NATS, _Requester] = weakref.WeakKeyDictionary()


@dataclass(frozen=True, slots=True)
class Ack:
    seq: int
    duplicate: bool


async def publish(
    nc: NATS,
    subject: str,
    payload: bytes,
    *,
    headers: dict[str, str] | None = None,
    timeout: float = 5.0,
) -> Ack:
    """``js.publish`` with the same errors, at less CPU per call (see ``_Requester``)."""
    req = _requesters.get(nc)
    if req is None:
        req = _requesters[nc] = _Requester(nc)
    msg = await req.request(subject, payload, headers, timeout)
    if msg.headers and msg.headers.get("Status") == "503":
        raise nats.js.errors.NoStreamResponseError
    resp = orjson.loads(msg.data)
    err = resp.get("error")
    if err:
        nats.js.errors.APIError.from_error(err)  # raises the matching APIError subclass
    return Ack(seq=int(resp["seq"]), duplicate=bool(resp.get("duplicate", False)))


async def read_subject(
    nc: NATS,
    stream: str,
    subject_filter: str,
    *,
    start_seq: int = 1,
    start_time: str | None = None,
    limit: int | None = None,
    timeout: float = 5.0,
) -> list[StoredMsg]:
    """All stored messages matching ``subject_filter`` from ``start_seq``, via batch direct get.

    One request per 1,000 messages: the server streams them back and ends with an EOB status.
    """
    reader = _readers.get(nc)
    if reader is None:
        reader = _readers[nc] = _DirectReader(nc)
    out: list[StoredMsg] = []
    seq = start_seq
    unavailable = 0
    while True:
        batch = 1000 if limit is None else min(1000, limit - len(out))
        if batch <= 0:
            return out
        req: dict[str, Any] = {"next_by_subj": subject_filter, "batch": batch}
        if start_time is not None and seq == start_seq:
            req["start_time"] = start_time
        else:
            req["seq"] = seq
        try:
            got, hdrs = await reader.get(stream, req, timeout)
        except nats.errors.TimeoutError:
            # A lost request (our connection moved to another node): reads are idempotent.
            unavailable += 10
            if unavailable >= 40:
                raise
            continue
        out.extend(got.msgs)
        if got.msgs:
            seq = got.msgs[-1].seq + 1
        status = hdrs.get("Status")
        if status == "503" and unavailable < 40:
            # No responder: a clustered stream is electing a leader, or a node restarts. Ask
            # again from where we are (bounded: about 20 s in all).
            unavailable += 1
            await asyncio.sleep(min(0.05 * unavailable, 1.0))
            continue
        if status == "204":  # end of batch
            more = int(hdrs.get("Nats-Num-Pending", "0") or 0) > 0
        elif status == "404":
            more = False
        else:
            raise RuntimeError(f"direct get on {stream}: {status} {hdrs}")
        if not more:
            return out


async def last_for_subject(
    nc: NATS, stream: str, subject: str, timeout: float = 5.0
) -> StoredMsg | None:
    """The last message stored on ``subject`` (a literal subject), or None."""
    try:
        msg = await nc.request(
            f"$JS.API.DIRECT.GET.{stream}.{subject}", b"", timeout=timeout
        )
    except nats.errors.NoRespondersError:
        return None
    hdrs = msg.headers or {}
    if hdrs.get("Status"):
        return None
    return StoredMsg(
        seq=int(hdrs["Nats-Sequence"]),
        subject=hdrs.get("Nats-Subject", subject),
        data=msg.data,
        time=hdrs.get("Nats-Time-Stamp"),
        headers=hdrs,
    )


async def last_per_subject(
    nc: NATS, stream: str, subject_filter: str, timeout: float = 5.0
) -> list[StoredMsg]:
    """The last message of every subject matching ``subject_filter`` (KV listings)."""
    out: list[StoredMsg] = []
    up_to_seq: int | None = None
    seen: set[str] = set()
    while True:
        req: dict[str, Any] = {"multi_last": [subject_filter], "batch": 1024}
        if up_to_seq is not None:
            req["up_to_seq"] = up_to_seq
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        got = 0
        try:
            await nc.publish(f"$JS.API.DIRECT.GET.{stream}", orjson.dumps(req), reply=inbox)
            while True:
                msg = await sub.next_msg(timeout)
                hdrs = msg.headers or {}
                status = hdrs.get("Status")
                if status:
                    if status not in ("204", "404"):
                        raise RuntimeError(f"direct get on {stream}: {status} {hdrs}")
                    break
                subj = hdrs.get("Nats-Subject", "")
                got += 1
                if subj in seen:
                    continue
                seen.add(subj)
                out.append(
                    StoredMsg(
                        seq=int(hdrs["Nats-Sequence"]),
                        subject=subj,
                        data=msg.data,
                        time=hdrs.get("Nats-Time-Stamp"),
                        headers=hdrs,
                    )
                )
        finally:
            await sub.unsubscribe()
        # The server caps one answer; a full answer means there may be more subjects.
        if got < 1024:
            return out
        up_to_seq = min(m.seq for m in out[-got:]) - 1 if got else None
        if not up_to_seq or up_to_seq <= 0:
            return out


async def read_run(
    nc: NATS,
    names: Names,
    run_id: str,
    *,
    start_seq: int = 1,
    timeout: float = 5.0,
    kinds: tuple[str, ...] = RUN_KINDS,
) -> list[StoredMsg]:
    """The run's stored messages in stream order.

    Read kind by kind (literal subjects, concurrently) and merged by sequence, not with the
    wildcard ``<p>.run.<id>.*``: the server finds a literal subject's messages from its subject
    index, while a wildcard filter makes it walk the stream's blocks between the run's
    messages. A suspended run's events are far apart, so with 100,000 runs in the stream the
    wildcard read took 18 ms and the literal one 0.8 ms (BENCHMARKS.md). The runs stream
    stores only these kinds (``Names.runs_subjects``), so nothing the fence counts is missed.
    ``kinds`` narrows the read (control events only: the run's status and outcome).
    """
    parts = await asyncio.gather(*(
        read_subject(nc, names.runs_stream, names.run_subject(run_id, kind),
                     start_seq=start_seq, timeout=timeout)
        for kind in kinds
    ))
    if len(parts) == 1:
        return parts[0]
    return list(heapq.merge(*parts, key=lambda m: m.seq))


async def read_history(
    nc: NATS, names: Names, run_id: str, *, start_seq: int = 1,
    kinds: tuple[str, ...] = RUN_KINDS,
) -> list[tuple[int, ev.Event]]:
    """The run's events in stream order (one batch direct get per kind for up to 1,000)."""
    msgs = await read_run(nc, names, run_id, start_seq=start_seq, kinds=kinds)
    return (await _decode_run(nc, names, msgs))[0]


async def _decode_run(
    nc: NATS, names: Names, msgs: list[StoredMsg]
) -> tuple[list[tuple[int, ev.Event]], list[tuple[int, bytes]] | None]:
    """The events of a run's messages, and their stored bodies by sequence (None when a
    body is a stub whose fields live in the Object Store)."""
    history: list[tuple[int, ev.Event]] = []
    bodies: list[tuple[int, bytes]] | None = []
    for m in msgs:
        data = m.data
        if m.headers and m.headers.get(payloads.HEADER):
            data = await payloads.resolve(nc.jetstream(), names, data)
            bodies = None
        elif bodies is not None:
            bodies.append((m.seq, data))
        history.append((m.seq, ev.decode(data)))
    return history, bodies


async def load_state(
    nc: NATS, names: Names, run_id: str, *, kinds: tuple[str, ...] = RUN_KINDS
) -> ev.RunState:
    """The run's state folded from its history (``kinds=("ctl",)``: status and outcome only,
    without the steps)."""
    return ev.RunState.fold(run_id, await read_history(nc, names, run_id, kinds=kinds))


async def load_run(
    nc: NATS, names: Names, run_id: str
) -> tuple[ev.RunState, list[tuple[int, bytes]] | None]:
    """The run's state and its stored event bodies by sequence, or None for the bodies when an
    event's fields live in the Object Store: the bodies are what a task can carry to a worker
    (``Orchestrator.dispatch``), and a stub is no use to it."""
    history, bodies = await _decode_run(nc, names, await read_run(nc, names, run_id))
    return ev.RunState.fold(run_id, history), bodies


# --------------------------------------------------------------------------- dead letters


# Who dead-letters, one subject each (``<p>.dlq.<source>``): a command the orchestrator cannot
# act on, a control-subject message that is not an event, a run input that fails its
# annotation, a task that is not a task, an external event that is not JSON (or whose payload
# object is missing), a timer firing or cron schedule the scheduler cannot use, an admission
# entry that is not JSON. docs/architecture.md lists the same; tests/test_docs.py compares.
DlqSource = Literal["cmd", "ctl", "input", "task", "event", "timer", "schedule", "admit"]
DLQ_SOURCES: tuple[DlqSource, ...] = get_args(DlqSource)


async def dead_letter(
    js: JetStreamContext,
    names: Names,
    *,
    source: DlqSource,
    reason: str,
    subject: str,
    data: bytes,
    headers: dict[str, str] | None = None,
    details: Any = None,
) -> None:
    """Keep a message we cannot process, with why, instead of dropping it."""
    if source not in DLQ_SOURCES:  # the type says so too; this is for untyped callers
        raise ValueError(f"dead-letter source {source!r} is not one of {', '.join(DLQ_SOURCES)}")
    try:
        text: str | None = data.decode("utf-8")
        encoded_b64 = None
    except UnicodeDecodeError:
        text, encoded_b64 = None, base64.b64encode(data).decode()
    body = {
        "source": source,
        "reason": reason,
        "details": details,
        "subject": subject,
        "data": text,
        "data_b64": encoded_b64,
        "headers": headers or {},
        "at": time.time(),
    }
    try:
        await js.publish(names.dlq_subject(source), orjson.dumps(body, default=str))
    except Exception:  # the dead-letter path must never take a service down with it
        log.exception("could not dead-letter a message from %s: %s", subject, reason)


# --------------------------------------------------------------------------- consumers


async def ensure_consumer(
    js: JetStreamContext,
    stream: str,
    durable: str,
    filter_subject: str,
    *,
    ack_wait: float,
    max_ack_pending: int = 10_000,
    max_deliver: int = -1,
) -> None:
    cfg = ConsumerConfig(
        durable_name=durable,
        filter_subject=filter_subject,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=ack_wait,
        max_ack_pending=max_ack_pending,
        max_deliver=max_deliver,
        max_waiting=4096,
    )
    try:
        await js.add_consumer(stream, cfg)
    except nats.js.errors.BadRequestError as exc:
        # 10148: exists with another config (another process made it first): use theirs.
        if exc.err_code not in (10148, 10013):
            raise


Handler = Callable[[Msg], Awaitable[None]]


class PullLoop:
    """Keeps pull requests outstanding on a durable consumer and hands each message to a handler.

    Messages are handled as soon as the server delivers them (no fetch-and-wait batches), with
    at most ``capacity`` in flight. A pull expires every ``expires`` seconds and is renewed, so
    a lost pull (a reconnect) costs at most that long.
    """

    def __init__(
        self,
        nc: NATS,
        stream: str,
        durable: str,
        handler: Handler,
        *,
        capacity: int = 64,
        expires: float = 5.0,
        name: str = "pull",
    ) -> None:
        self._nc = nc
        self._api = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self._handler = handler
        self._capacity = capacity
        self._expires = expires
        self._name = name
        self._free = capacity
        self._room = asyncio.Event()
        self._room.set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._main: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> None:
        self._main = asyncio.create_task(self._run(), name=f"{self._name}-loop")

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def stop(self, drain_timeout: float | None = None) -> None:
        from polos._private.tasks import cancel_and_wait

        self._stopping = True
        if self._main:
            await cancel_and_wait([self._main])
        if self._tasks and drain_timeout:
            await asyncio.wait(self._tasks, timeout=drain_timeout)
        await cancel_and_wait(list(self._tasks))

    async def _handle(self, msg: Msg) -> None:
        try:
            await self._handler(msg)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s: handler failed on %s", self._name, msg.subject)
        finally:
            self._release(1)

    def _release(self, n: int) -> None:
        self._free += n
        self._room.set()

    async def _run(self) -> None:
        queue: asyncio.Queue[Msg] = asyncio.Queue()

        async def cb(msg: Msg) -> None:
            queue.put_nowait(msg)

        inbox = self._nc.new_inbox()
        sub = await self._nc.subscribe(inbox, cb=cb)
        try:
            while not self._stopping:
                # Wait for room, then ask for exactly as many messages as there is room for.
                while self._free <= 0:
                    self._room.clear()
                    await self._room.wait()
                want, self._free = self._free, 0
                req = {"batch": want, "expires": int(self._expires * 1e9)}
                try:
                    await self._nc.publish(self._api, orjson.dumps(req), reply=inbox)
                except Exception:
                    self._release(want)
                    await asyncio.sleep(0.25)
                    continue
                deadline = time.monotonic() + self._expires + 1.0
                while want > 0:
                    try:
                        msg = await asyncio.wait_for(
                            queue.get(), timeout=max(0.01, deadline - time.monotonic())
                        )
                    except TimeoutError:
                        break  # the pull was lost (reconnect) or expired silently
                    status = (msg.headers or {}).get("Status")
                    if status:
                        if status == "100":  # idle heartbeat
                            continue
                        # 404/408/409: this pull is over (no messages, expired, or limits).
                        if status in ("409",):
                            await asyncio.sleep(0.05)
                        break
                    want -= 1
                    t = asyncio.create_task(self._handle(msg))
                    self._tasks.add(t)
                    t.add_done_callback(self._tasks.discard)
                self._release(want)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
