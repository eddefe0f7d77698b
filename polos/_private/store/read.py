"""Reads: a run's history (batch direct gets, kind by kind), single subjects, the last
message per subject (KV listings), and the run's state folded from its history.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import heapq
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from polos import history as ev
from polos._private.store import payloads
from polos._private.store.lag import STALE_RETRIES, StaleRead, reread_until
from polos._private.store.names import RUN_KINDS, Names, kv_stream
from polos._private.store.namespace import connection
from polos._private.store.natspy import WildcardInbox, parse_header_lines

log = logging.getLogger("polos.read")


@dataclass(frozen=True, slots=True)
class StoredMsg:
    seq: int
    subject: str
    data: bytes
    time: str | None
    headers: dict[str, str] | None


class _Batch:
    __slots__ = ("done", "msgs")

    def __init__(self) -> None:
        self.msgs: list[StoredMsg] = []
        self.done: asyncio.Future[dict[str, str]] = asyncio.get_running_loop().create_future()


class _DirectReader:
    """Every batch direct get of a connection, answered on one ``WildcardInbox``.

    Reading a run's history is on the hot path (every task a worker takes starts with it).
    A subscription per read costs a SUB and an UNSUB, and ``next_msg`` costs a task per
    message; here each answer is routed by its inbox token to its batch from the read loop,
    which halves the time of a read.
    """

    def __init__(self, nc: NATS) -> None:
        self._nc = nc
        self._inbox = WildcardInbox(nc, self._on_msg)
        self._prefix = self._inbox.prefix
        self._cut = self._inbox.cut
        self._open: dict[str, _Batch] = {}

    def _on_msg(self, msg: Msg) -> None:
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

    async def get(
        self, stream: str, req: dict[str, Any], timeout: float
    ) -> tuple[_Batch, dict[str, str]]:
        await self._inbox.ready()
        token = self._inbox.token()
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
    conn = connection(nc)
    reader = conn.reader
    if reader is None:
        reader = conn.reader = _DirectReader(nc)
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
    return await _direct_get(nc, f"$JS.API.DIRECT.GET.{stream}.{subject}", b"", subject, timeout)


async def message_at(nc: NATS, stream: str, seq: int, timeout: float = 5.0) -> StoredMsg | None:
    """The message stored at ``seq``, or None (none there)."""
    request = orjson.dumps({"seq": seq})
    return await _direct_get(nc, f"$JS.API.DIRECT.GET.{stream}", request, "", timeout)


async def _direct_get(
    nc: NATS, api: str, request: bytes, subject: str, timeout: float
) -> StoredMsg | None:
    try:
        msg = await nc.request(api, request, timeout=timeout)
    except nats.errors.NoRespondersError:
        return None
    hdrs = msg.headers or {}
    if hdrs.get("Status"):
        return None
    return _answered(hdrs, msg.data, subject)


def _answered(hdrs: dict[str, str], data: bytes, subject: str = "") -> StoredMsg:
    """The stored message a direct get answered with (its headers say where it is stored)."""
    return StoredMsg(
        seq=int(hdrs["Nats-Sequence"]),
        subject=hdrs.get("Nats-Subject", subject),
        data=data,
        time=hdrs.get("Nats-Time-Stamp"),
        headers=hdrs,
    )


# How long a stream's replica count is taken as known (seconds): a stream moved to three
# replicas by hand (``nats stream edit``) is read on its leader within this long.
REPLICAS_TTL = 30.0


async def _replicated(nc: NATS, stream: str, timeout: float) -> bool:
    """Whether ``stream`` has more than one replica (looked up at most every ``REPLICAS_TTL``,
    by one request shared among the reads asking meanwhile); True when it cannot be told, so
    the leader is asked."""
    conn = connection(nc)
    known = conn.replicas.get(stream)
    now = time.monotonic()
    if known is not None and now - known[1] < REPLICAS_TTL:
        return known[0]

    async def lookup() -> bool:
        try:
            msg = await nc.request(f"$JS.API.STREAM.INFO.{stream}", b"", timeout=timeout)
            replicas = int(orjson.loads(msg.data)["config"].get("num_replicas") or 1)
        except Exception as exc:  # no answer, no permission, no such stream: not worth guessing
            log.debug("replicas of %s not known: %r", stream, exc)
            return True
        conn.replicas[stream] = (replicas > 1, now)
        return replicas > 1

    return await conn.replica_lookups.get(stream, lookup)


async def leader_get(
    nc: NATS, stream: str, request: dict[str, Any], timeout: float = 5.0
) -> StoredMsg | None:
    """One stored message as the stream's leader holds it, or None when it holds none.

    ``STREAM.MSG.GET`` is answered by the leader alone, where a direct get is answered by
    whichever replica is nearest and may not hold yet what the leader acknowledged. A read that
    decides on a message being absent (nothing to cancel, no resume pending, no event yet), with
    no delivered sequence to read through, asks the leader. That API costs the server about four
    times a direct get (JSON, base64, its request queue), so a stream with one replica, whose
    only copy is the leader, is read by direct get.
    """
    if not await _replicated(nc, stream, timeout):
        # Not ``_direct_get``: no responder here is a server not ready, not "no message".
        answer = await nc.request(
            f"$JS.API.DIRECT.GET.{stream}", orjson.dumps(request), timeout=timeout
        )
        hdrs = answer.headers or {}
        status = hdrs.get("Status")
        if status == "404":
            return None
        if status:
            raise RuntimeError(f"direct get on {stream}: {status} {hdrs.get('Description', '')}")
        return _answered(hdrs, answer.data)
    msg = await nc.request(
        f"$JS.API.STREAM.MSG.GET.{stream}", orjson.dumps(request), timeout=timeout
    )
    body = orjson.loads(msg.data)
    err = body.get("error")
    if err is not None:
        if err.get("code") == 404:
            return None
        nats.js.errors.APIError.from_error(err)  # raises: a 503 (no leader yet) is transient
    m = body["message"]
    raw = m.get("hdrs")
    return StoredMsg(
        seq=int(m["seq"]),
        subject=m["subject"],
        data=base64.b64decode(m["data"]) if m.get("data") else b"",
        time=m.get("time"),
        headers=parse_header_lines(base64.b64decode(raw)) if raw else None,
    )


async def leader_last(
    nc: NATS, stream: str, subject_filter: str, timeout: float = 5.0
) -> StoredMsg | None:
    """The last message matching ``subject_filter`` (wildcards allowed), as the leader holds it."""
    return await leader_get(nc, stream, {"last_by_subj": subject_filter}, timeout)


async def leader_next(
    nc: NATS, stream: str, subject_filter: str, seq: int, timeout: float = 5.0
) -> StoredMsg | None:
    """The first message matching ``subject_filter`` at or after ``seq``, as the leader holds it."""
    return await leader_get(nc, stream, {"next_by_subj": subject_filter, "seq": seq}, timeout)


async def read_subject_through(
    nc: NATS, stream: str, subject_filter: str, seq: int, *, limit: int | None = None
) -> list[StoredMsg]:
    """``read_subject`` from a read that holds every message of the filter up to ``seq`` (the
    leader's last, from ``leader_last``; 0: nothing to reach), or its first ``limit`` ones;
    ``StaleRead`` when no read did in time."""

    def reaches(msgs: list[StoredMsg]) -> bool:
        if seq <= 0 or (limit is not None and len(msgs) >= limit):
            return True
        return bool(msgs) and msgs[-1].seq >= seq

    msgs, reached = await reread_until(
        lambda: read_subject(nc, stream, subject_filter, limit=limit), reaches
    )
    if not reached:
        raise StaleRead(f"{stream} {subject_filter}", seq, msgs[-1].seq if msgs else 0)
    return msgs


async def last_per_subject(
    nc: NATS, stream: str, subject_filter: str, timeout: float = 5.0
) -> list[StoredMsg]:
    """The last message of every subject matching ``subject_filter`` (KV listings).

    One multi-last direct get while at most 1,024 subjects match; the server refuses more at
    once (413, "Too Many Results", whatever the batch), and then every message matching the
    filter is read by batch direct get and the last of each subject kept: for a KV bucket that
    keeps one revision per key (every Polos bucket) that reads nothing more than the answer.
    """
    try:
        return await _multi_last(nc, stream, subject_filter, timeout)
    except _TooManySubjects:
        pass
    last: dict[str, StoredMsg] = {}
    for m in await read_subject(nc, stream, subject_filter, timeout=timeout):
        last[m.subject] = m  # in stream order: the last one wins
    return sorted(last.values(), key=lambda m: m.seq)


class _TooManySubjects(Exception):
    """The server will not answer a multi-last request for this many subjects."""


async def _multi_last(
    nc: NATS, stream: str, subject_filter: str, timeout: float
) -> list[StoredMsg]:
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
                    if status == "413":
                        raise _TooManySubjects
                    if status not in ("204", "404"):
                        raise RuntimeError(f"direct get on {stream}: {status} {hdrs}")
                    break
                subj = hdrs.get("Nats-Subject", "")
                got += 1
                if subj in seen:
                    continue
                seen.add(subj)
                out.append(_answered(hdrs, msg.data))
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
    parts = await asyncio.gather(
        *(
            read_subject(
                nc,
                names.runs_stream,
                names.run_subject(run_id, kind),
                start_seq=start_seq,
                timeout=timeout,
            )
            for kind in kinds
        )
    )
    if len(parts) == 1:
        return parts[0]
    return list(heapq.merge(*parts, key=lambda m: m.seq))


async def read_history(
    nc: NATS,
    names: Names,
    run_id: str,
    *,
    start_seq: int = 1,
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


async def load_state_through(
    nc: NATS,
    names: Names,
    run_id: str,
    seq: int,
    *,
    kinds: tuple[str, ...] = RUN_KINDS,
    ended: bool = False,
) -> ev.RunState:
    """``load_state``, from a read that holds every event of ``kinds`` up to ``seq`` (``seq=1``:
    any event at all, for a run known to exist) and, with ``ended``, the run's end (known from
    elsewhere, the run index); ``StaleRead`` when no read did in time."""
    state, reached = await reread_until(
        lambda: load_state(nc, names, run_id, kinds=kinds),
        lambda state: state.last_seq >= seq and (state.done or not ended),
    )
    if not reached:
        raise StaleRead(f"run {run_id}'s history", seq, state.last_seq)
    return state


async def load_run(
    nc: NATS, names: Names, run_id: str
) -> tuple[ev.RunState, list[tuple[int, bytes]] | None]:
    """The run's state and its stored event bodies by sequence, or None for the bodies when an
    event's fields live in the Object Store: the bodies are what a task can carry to a worker
    (``Orchestrator.dispatch``), and a stub is no use to it."""
    history, bodies = await _decode_run(nc, names, await read_run(nc, names, run_id))
    return ev.RunState.fold(run_id, history), bodies


async def load_run_unless_long(
    nc: NATS,
    names: Names,
    run_id: str,
    *,
    max_steps: int,
    long: Callable[[ev.RunState], Awaitable[bool]],
) -> tuple[ev.RunState, list[tuple[int, bytes]] | None, bool]:
    """``load_run`` and True; or, for a run of at least ``max_steps`` step events that ``long``
    says is long (given the state of its control events; it has a replay snapshot), that
    state (status, suspension, outcome, the steps woken by them: not its other steps), no
    bodies, and False. The control events and the first ``max_steps`` step events are asked
    for at once: one round trip for a short run; ``long`` is asked only of a run with that
    many steps."""
    # The steps' read in a task of its own, the control events' in this one: both requests go
    # out in this turn, at the cost of one task (``gather`` took two and its own future, 4 % of
    # the orchestrator's CPU on resumes).
    steps_read = asyncio.create_task(
        read_subject(nc, names.runs_stream, names.run_subject(run_id, "step"), limit=max_steps)
    )
    try:
        ctl = await read_subject(nc, names.runs_stream, names.run_subject(run_id, "ctl"))
    except BaseException:
        steps_read.cancel()
        with contextlib.suppress(BaseException):  # its own outcome is moot: this one is raised
            await steps_read
        raise
    steps = await steps_read
    if len(steps) >= max_steps:
        history, _ = await _decode_run(nc, names, ctl)
        state = ev.RunState.fold(run_id, history)
        if await long(state):
            return state, None, False
        steps += await read_subject(
            nc, names.runs_stream, names.run_subject(run_id, "step"), start_seq=steps[-1].seq + 1
        )
    msgs = list(heapq.merge(ctl, steps, key=lambda m: m.seq))
    history, bodies = await _decode_run(nc, names, msgs)
    return ev.RunState.fold(run_id, history), bodies, True


# --------------------------------------------------------------------------- KV buckets

_GONE = ("DEL", "PURGE")  # the KV operations that leave a key without a value


@dataclass(frozen=True, slots=True)
class KVEntry:
    """A live KV entry: its key, its revision (the stream sequence) and its stored bytes."""

    key: str
    revision: int
    value: bytes


def is_live(msg: StoredMsg) -> bool:
    """Whether a KV message holds a value (not a delete or purge marker, not empty)."""
    return bool(msg.data) and (msg.headers or {}).get("KV-Operation") not in _GONE


async def kv_entries(
    nc: NATS, bucket: str, key_filter: str = ">", *, current: bool = False
) -> list[KVEntry]:
    """The live entries of ``bucket`` whose keys match ``key_filter`` (one direct-get request
    per 1,024 keys; deleted and purged keys left out).

    ``current``: a listing that decides a key is absent (no waiter for this event) holds the
    bucket leader's last write to those keys (one more request, to the leader), or is read
    again (``StaleRead``)."""
    head = f"$KV.{bucket}."
    stream = kv_stream(bucket)
    # The leader's last first: the listing read after it holds at least that.
    last = await leader_last(nc, stream, head + key_filter) if current else None
    need = last.seq if last is not None else 0
    msgs, reached = await reread_until(
        lambda: last_per_subject(nc, stream, head + key_filter),
        lambda got: not need or any(m.seq >= need for m in got),
    )
    if not reached:
        got = max((m.seq for m in msgs), default=0)
        raise StaleRead(f"bucket {bucket} keys {key_filter}", need, got)
    return [KVEntry(m.subject[len(head) :], m.seq, m.data) for m in msgs if is_live(m)]


async def kv_entry(nc: NATS, bucket: str, key: str) -> KVEntry | None:
    """The live entry of ``key``, or None."""
    m = await last_for_subject(nc, kv_stream(bucket), f"$KV.{bucket}.{key}")
    return KVEntry(key, m.seq, m.data) if m is not None and is_live(m) else None


async def resolve_payload(nc: NATS, names: Names, msg: StoredMsg) -> StoredMsg:
    """The message with large fields put back, when its event was stored as a stub."""
    if not (msg.headers and msg.headers.get(payloads.HEADER)):
        return msg
    try:
        data = await payloads.resolve(nc.jetstream(), names, msg.data)
    except Exception:
        log.warning("seq %d: large payload not found; using the stub", msg.seq)
        return msg
    return StoredMsg(
        seq=msg.seq, subject=msg.subject, data=data, time=msg.time, headers=msg.headers
    )


__all__ = [
    "STALE_RETRIES",
    "KVEntry",
    "StaleRead",
    "StoredMsg",
    "is_live",
    "kv_entries",
    "kv_entry",
    "last_for_subject",
    "last_per_subject",
    "leader_get",
    "leader_last",
    "leader_next",
    "load_run",
    "load_run_unless_long",
    "load_state",
    "load_state_through",
    "message_at",
    "read_history",
    "read_run",
    "read_subject",
    "read_subject_through",
    "reread_until",
    "resolve_payload",
]
