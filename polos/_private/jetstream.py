"""The JetStream layer: names, topology, fenced appends, history reads and task pulling.

Everything that knows a subject's shape or a stream's configuration lives here, so the
subjects (public API) are defined once.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

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
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from polos import events as ev
from polos.config import Settings

log = logging.getLogger("polos.jetstream")

EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
EXPECTED_LAST_SUBJECT_SEQ_SUBJECT = "Nats-Expected-Last-Subject-Sequence-Subject"
MSG_ID = "Nats-Msg-Id"
REPLY_HEADER = "Polos-Reply"  # where the orchestrator answers a command, when the sender asks
WRONG_LAST_SEQUENCE = 10071


@dataclass(frozen=True)
class Names:
    """Every stream, subject and bucket name of one namespace (prefix)."""

    prefix: str

    @property
    def upper(self) -> str:
        return self.prefix.upper().replace("-", "_")

    # streams
    @property
    def cmd_stream(self) -> str:
        return f"{self.upper}_CMD"

    @property
    def runs_stream(self) -> str:
        return f"{self.upper}_RUNS"

    @property
    def tasks_stream(self) -> str:
        return f"{self.upper}_TASKS"

    @property
    def events_stream(self) -> str:
        return f"{self.upper}_EVENTS"

    @property
    def dlq_stream(self) -> str:
        return f"{self.upper}_DLQ"

    # buckets
    @property
    def runs_bucket(self) -> str:
        return f"{self.prefix}_runs"

    @property
    def workers_bucket(self) -> str:
        return f"{self.prefix}_workers"

    @property
    def workflows_bucket(self) -> str:
        return f"{self.prefix}_workflows"

    # subjects
    def start_subject(self, workflow: str) -> str:
        return f"{self.prefix}.cmd.start.{workflow}"

    def cancel_subject(self, run_id: str) -> str:
        return f"{self.prefix}.cmd.cancel.{run_id}"

    def resume_subject(self, run_id: str, key: str) -> str:
        return f"{self.prefix}.cmd.resume.{run_id}.{key}"

    @property
    def cmd_filter(self) -> str:
        return f"{self.prefix}.cmd.>"

    def run_subject(self, run_id: str, kind: str) -> str:
        return f"{self.prefix}.run.{run_id}.{kind}"

    def run_filter(self, run_id: str) -> str:
        """All of one run's history subjects: the fence covers exactly these."""
        return f"{self.prefix}.run.{run_id}.*"

    @property
    def ctl_filter(self) -> str:
        return f"{self.prefix}.run.*.ctl"

    def task_subject(self, workflow: str) -> str:
        return f"{self.prefix}.task.{workflow}"

    def event_subject(self, topic_tokens: str) -> str:
        return f"{self.prefix}.event.{topic_tokens}"

    def dlq_subject(self, source: str) -> str:
        return f"{self.prefix}.dlq.{source}"


def valid_token(value: str) -> bool:
    """True if ``value`` can be one subject token (run ids, workflow names)."""
    return bool(value) and len(value) <= 128 and all(c.isalnum() or c in "_-" for c in value)


class FencedOut(Exception):
    """An append found the run's history moved on: another writer owns the run now."""

    def __init__(self, run_id: str, expected: int) -> None:
        super().__init__(f"run {run_id}: history moved past seq {expected}")
        self.run_id = run_id
        self.expected = expected


async def connect(settings: Settings, name: str) -> NATS:
    # Reconnect forever: a service outliving a nats-server restart is the point.
    return await nats.connect(
        settings.nats_url,
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.25,
        connect_timeout=settings.request_timeout,
        allow_reconnect=True,
    )


# --------------------------------------------------------------------------- topology


async def _ensure_stream(js: JetStreamContext, cfg: StreamConfig) -> None:
    try:
        await js.add_stream(cfg)
    except nats.js.errors.BadRequestError as exc:
        # 10058: exists with a different config. Keep the operator's edits, but widen subjects.
        if exc.err_code != 10058:
            raise
        with contextlib.suppress(nats.js.errors.APIError):
            await js.update_stream(cfg)


async def ensure_topology(js: JetStreamContext, names: Names, settings: Settings) -> None:
    """Create every stream and bucket of the namespace. Idempotent; safe from any process."""
    r = settings.replicas
    dup = settings.duplicate_window
    await asyncio.gather(
        _ensure_stream(
            js,
            StreamConfig(
                name=names.cmd_stream,
                subjects=[names.cmd_filter],
                storage=StorageType.FILE,
                retention=RetentionPolicy.LIMITS,
                # Commands are kept for the longest wait we promise (a resume may come weeks
                # after the suspend): they are the replayable input of the orchestrator.
                max_age=90 * 24 * 3600,
                duplicate_window=dup,
                num_replicas=r,
                allow_direct=True,
            ),
        ),
        _ensure_stream(
            js,
            StreamConfig(
                name=names.runs_stream,
                subjects=[f"{names.prefix}.run.>"],
                storage=StorageType.FILE,
                retention=RetentionPolicy.LIMITS,
                duplicate_window=dup,
                num_replicas=r,
                allow_direct=True,  # batch direct get reads a run's history in one request
            ),
        ),
        _ensure_stream(
            js,
            StreamConfig(
                name=names.tasks_stream,
                subjects=[f"{names.prefix}.task.>"],
                storage=StorageType.FILE,
                retention=RetentionPolicy.WORK_QUEUE,
                duplicate_window=dup,
                num_replicas=r,
            ),
        ),
        _ensure_stream(
            js,
            StreamConfig(
                name=names.events_stream,
                subjects=[f"{names.prefix}.event.>"],
                storage=StorageType.FILE,
                retention=RetentionPolicy.LIMITS,
                max_age=90 * 24 * 3600,
                duplicate_window=dup,
                num_replicas=r,
                allow_direct=True,
            ),
        ),
        _ensure_stream(
            js,
            StreamConfig(
                name=names.dlq_stream,
                subjects=[f"{names.prefix}.dlq.>"],
                storage=StorageType.FILE,
                retention=RetentionPolicy.LIMITS,
                max_age=30 * 24 * 3600,
                discard=DiscardPolicy.OLD,
                num_replicas=r,
                allow_direct=True,
            ),
        ),
    )
    from nats.js.api import KeyValueConfig

    for bucket in (names.runs_bucket, names.workers_bucket, names.workflows_bucket):
        try:
            await js.key_value(bucket)
        except nats.js.errors.BucketNotFoundError:
            ttl = settings.worker_ttl if bucket == names.workers_bucket else None
            with contextlib.suppress(nats.js.errors.BadRequestError):
                await js.create_key_value(
                    KeyValueConfig(bucket=bucket, history=1, ttl=ttl, replicas=r, direct=True)
                )


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

    The fence covers all of the run's subjects. The message id makes a retried append (a lost
    ack) return the original sequence instead of writing twice.
    """
    headers = {
        EXPECTED_LAST_SUBJECT_SEQ: str(expected_last_seq),
        EXPECTED_LAST_SUBJECT_SEQ_SUBJECT: names.run_filter(run_id),
        MSG_ID: msg_id,
    }
    subject = names.run_subject(run_id, event.KIND)
    payload = ev.encode(event)
    for attempt in range(8):
        try:
            ack = await js.publish(subject, payload, timeout=timeout, headers=headers)
            return int(ack.seq)
        except nats.js.errors.APIError as exc:
            if exc.err_code == WRONG_LAST_SEQUENCE:
                raise FencedOut(run_id, expected_last_seq) from exc
            raise
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError,
                nats.js.errors.NoStreamResponseError, nats.errors.ConnectionReconnectingError):
            # The server may have stored it and lost the ack; the msg id makes the retry safe.
            await asyncio.sleep(min(0.05 * 2**attempt, 2.0))
    raise TimeoutError(f"append to run {run_id} timed out")


# --------------------------------------------------------------------------- reads


@dataclass(frozen=True, slots=True)
class StoredMsg:
    seq: int
    subject: str
    data: bytes
    time: str | None
    headers: dict[str, str] | None


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
    out: list[StoredMsg] = []
    seq = start_seq
    while True:
        batch = 1000 if limit is None else min(1000, limit - len(out))
        if batch <= 0:
            return out
        req: dict[str, Any] = {"next_by_subj": subject_filter, "batch": batch}
        if start_time is not None and seq == start_seq:
            req["start_time"] = start_time
        else:
            req["seq"] = seq
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        try:
            await nc.publish(f"$JS.API.DIRECT.GET.{stream}", orjson.dumps(req), reply=inbox)
            more = False
            while True:
                msg = await sub.next_msg(timeout)
                hdrs = msg.headers or {}
                status = hdrs.get("Status")
                if status:
                    if status == "204":  # end of batch
                        more = int(hdrs.get("Nats-Num-Pending", "0") or 0) > 0
                    elif status != "404":
                        raise RuntimeError(f"direct get on {stream}: {status} {hdrs}")
                    break
                s = int(hdrs["Nats-Sequence"])
                out.append(
                    StoredMsg(
                        seq=s,
                        subject=hdrs.get("Nats-Subject", ""),
                        data=msg.data,
                        time=hdrs.get("Nats-Time-Stamp"),
                        headers=hdrs,
                    )
                )
                seq = s + 1
        finally:
            await sub.unsubscribe()
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


async def read_history(
    nc: NATS, names: Names, run_id: str, *, start_seq: int = 1
) -> list[tuple[int, ev.Event]]:
    """The run's events in stream order (one batch direct get for up to 1,000 events)."""
    msgs = await read_subject(nc, names.runs_stream, names.run_filter(run_id), start_seq=start_seq)
    return [(m.seq, ev.decode(m.data)) for m in msgs]


async def load_state(nc: NATS, names: Names, run_id: str) -> ev.RunState:
    return ev.RunState.fold(run_id, await read_history(nc, names, run_id))


# --------------------------------------------------------------------------- dead letters


async def dead_letter(
    js: JetStreamContext,
    names: Names,
    *,
    source: str,
    reason: str,
    subject: str,
    data: bytes,
    headers: dict[str, str] | None = None,
    details: Any = None,
) -> None:
    """Keep a message we cannot process, with why, instead of dropping it."""
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
        self._stopping = True
        if self._main:
            self._main.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._main
        if self._tasks and drain_timeout:
            await asyncio.wait(self._tasks, timeout=drain_timeout)
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

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
