"""Replay snapshots: a cache of a run's folded state that replay starts from.

The log stays the truth. A snapshot says "folding this run's history up to sequence ``seq``
gives this state"; replay takes it, reads only the events after ``seq`` and folds them on top.
Anything wrong with it (missing, another format, another run, corrupt, or not matching the
log at ``seq``) and replay reads the whole history as it always did; a snapshot never decides
anything the log does not.

One key per run (the run id) in the KV bucket ``<p>_snapshots``. The value is ``PSN2`` and two
zlib streams (each with its own checksum). The first holds a header line and the state::

    {"v": 2, "run_id": ..., "seq": S, "event": <sha256 of the event at S>, "crc": <crc32 of
     the state>, "times_crc": <crc32 of the second stream>, "events": <how many events the
     state folded>}\n<state JSON>

whose recorded steps are columns: their keys, a table of heads (completed or failed, kind,
function name) with the runs of consecutive steps sharing one, their outputs (a failed step's
error), and the attempts and meta of the few steps with other than 1 and none. That is what a
replay reads, and few objects to build. The second stream holds the steps' clock times (at,
started_at, duration_ms; a flat list), which no replay decision reads: they are decompressed
and parsed only when a restored step is asked for as an event.

The event digest is checked against the log when the snapshot is used (one direct get of
``seq``): a snapshot of another history of the run, or of another run, does not match. A value
larger than one message goes to the payloads object store (``<run_id>/snapshot-<seq>``, so the
run's retention removes it) and the key holds ``PSR1`` and a reference with its SHA-256.

Who may write here may append to the runs stream too (the service and worker roles): a snapshot
is trusted as far as the writer is, and checked against the log for staleness and corruption.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import logging
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import nats.errors
import nats.js.errors
import orjson

from polos import history as ev
from polos._private.store import payloads
from polos._private.store.names import RUN_KINDS
from polos._private.store.read import kv_entry, message_at, read_history
from polos._private.store.writes import publish

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS
    from nats.js import JetStreamContext

    from polos._private.store.names import Names

log = logging.getLogger("polos.snapshots")

FORMAT = 2
INLINE = b"PSN2"
REFERENCE = b"PSR1"
# Rows are encoded this many at a time, with an event-loop turn between, so a background
# snapshot of a long run never holds the loop for long.
_CHUNK = 1000


class SnapshotInvalid(ValueError):
    """A stored snapshot that cannot be used; the message says why (replay reads the log)."""


def event_digest(event: ev.Event) -> str:
    """What a snapshot records of the event at its sequence, to check it against the log."""
    return hashlib.sha256(ev.encode(event)).hexdigest()


# --------------------------------------------------------------------------- encoding


@dataclass(slots=True)
class Capture:
    """A run's state at one sequence, taken synchronously (cheap: no per-step work) so that it
    can be encoded later while the run goes on. Recorded steps are immutable and only ever
    added (``RunState.apply``), so the first ``n_steps`` keys and their events stay as they
    were at ``seq``."""

    run_id: str
    seq: int
    digest: str
    fields: dict[str, Any]
    order: list[str]
    n_steps: int
    steps: dict[str, ev.StepCompleted | ev.StepFailed]
    events: int


def _event_dict(event: ev.Event | None) -> dict[str, Any] | None:
    if event is None:
        return None
    body: dict[str, Any] = {"t": type(event).__name__}
    body.update(ev.encode_dict(event))
    return body


def capture(state: ev.RunState, last_event: ev.Event) -> Capture:
    """``state`` as of its ``last_seq``, whose event is ``last_event``."""
    fields = {
        "last_seq": state.last_seq,
        "workflow": state.workflow,
        "requested": _event_dict(state.requested),
        "status": state.status,
        "attempt": state.attempt,
        "worker_id": state.worker_id,
        "attempt_failures": dict(state.attempt_failures),
        "suspended": _event_dict(state.suspended),
        "rate_waits": {k: _event_dict(v) for k, v in state.rate_waits.items()},
        "output": state.output,
        "error": state.error,
        "created_at": state.created_at,
        "updated_at": state.updated_at,
        "events": state.events,
        "restarts": state.restarts,
    }
    return Capture(
        run_id=state.run_id,
        seq=state.last_seq,
        digest=event_digest(last_event),
        fields=fields,
        order=state.step_order,
        n_steps=len(state.step_order),
        steps=state.steps,
        events=state.events,
    )


# A step's head: (0 completed or 1 failed, its kind, its function's name). A long run's steps
# share a few heads, so the state stores each once and an index per step.
Head = tuple[int, str, str | None]
_COMPLETED, _FAILED = 0, 1


def _columns(e: ev.StepCompleted | ev.StepFailed) -> tuple[Head, Any, int, Any, tuple[Any, ...]]:
    """A recorded step as the snapshot stores it: head, output (or error), attempts, meta and
    its clock times."""
    if type(e) is ev.StepCompleted:
        return (
            (_COMPLETED, e.kind, e.name),
            e.output,
            e.attempts,
            e.meta,
            (e.at, e.started_at, e.duration_ms),
        )
    assert isinstance(e, ev.StepFailed)
    return (_FAILED, e.kind, e.name), e.error, e.attempts, None, (e.at, None, None)


async def encode(cap: Capture) -> bytes:
    """The stored value of a snapshot (compressed in a thread: zlib lets go of the GIL)."""
    heads: dict[Head, int] = {}
    runs: list[list[int]] = []  # [head, how many consecutive steps have it]
    outs: list[Any] = []
    attempts: list[list[Any]] = []  # [row, attempts] where not 1
    metas: list[list[Any]] = []  # [row, meta] where there is one
    times: list[Any] = []
    steps, order = cap.steps, cap.order
    restored = steps._cols if isinstance(steps, RestoredSteps) else None
    for start in range(0, cap.n_steps, _CHUNK):
        for row, key in enumerate(order[start : min(start + _CHUNK, cap.n_steps)], start):
            # dict.__getitem__: a restored step never asked for is written from its columns.
            e: Any = dict.__getitem__(steps, key)
            if type(e) is int:
                assert restored is not None
                head, out, tries, meta, clock = restored.columns(e)
            else:
                head, out, tries, meta, clock = _columns(e)
            h = heads.setdefault(head, len(heads))
            if runs and runs[-1][0] == h:
                runs[-1][1] += 1
            else:
                runs.append([h, 1])
            outs.append(out)
            if tries != 1:
                attempts.append([row, tries])
            if meta is not None:
                metas.append([row, meta])
            times.extend(clock)
        await asyncio.sleep(0)
    # Few objects to build when it is read: a replay's restore is mostly this parse. Heads
    # come in runs, attempts are 1 and meta absent for most steps.
    body = orjson.dumps(
        {
            **cap.fields,
            "keys": order[: cap.n_steps],
            "heads": list(heads),
            "runs": runs,
            "outputs": outs,
            "attempts": attempts,
            "meta": metas,
        }
    )
    clocks = orjson.dumps(times)

    def pack() -> bytes:
        packed_times = zlib.compress(clocks, 1)
        header = orjson.dumps(
            {
                "v": FORMAT,
                "run_id": cap.run_id,
                "seq": cap.seq,
                "event": cap.digest,
                "crc": zlib.crc32(body),
                # Of the times' stream as stored: checked on every load (cheap, unlike
                # decompressing it), so a corrupt one is found when the snapshot is.
                "times_crc": zlib.crc32(packed_times),
                "events": cap.events,
            }
        )
        return zlib.compress(header + b"\n" + body, 1) + packed_times

    return INLINE + await asyncio.to_thread(pack)


@dataclass(frozen=True, slots=True)
class Decoded:
    run_id: str
    seq: int
    digest: str
    body: bytes
    times: bytes  # the second zlib stream, still compressed: the steps' clock times


def is_of(run_id: str, value: bytes) -> bool:
    """Whether ``value`` looks like a snapshot of ``run_id`` (its header only: cheap)."""
    if value.startswith(REFERENCE):
        return value.find(f'"{run_id}/'.encode()) >= 0
    if not value.startswith(INLINE):
        return False
    try:
        head = zlib.decompressobj().decompress(value[len(INLINE) :], 4096).partition(b"\n")[0]
        header = orjson.loads(head)
    except (zlib.error, orjson.JSONDecodeError):
        return False
    return isinstance(header, dict) and header.get("v") == FORMAT and header.get("run_id") == run_id


async def exists(nc: NATS, names: Names, run_id: str) -> bool:
    """Whether the run has a replay snapshot (not checked against the log): a long run."""
    entry = await kv_entry(nc, names.snapshots_bucket, run_id)
    return entry is not None and is_of(run_id, entry.value)


def decode(run_id: str, value: bytes) -> Decoded:
    """The header and state bytes of an inline snapshot; ``SnapshotInvalid`` saying why not."""
    if not value.startswith(INLINE):
        raise SnapshotInvalid("not a snapshot of this format")
    unpack = zlib.decompressobj()
    try:
        raw = unpack.decompress(value[len(INLINE) :])
    except zlib.error as exc:
        raise SnapshotInvalid(f"corrupt ({exc})") from exc
    if not unpack.eof:
        raise SnapshotInvalid("truncated")
    head, sep, body = raw.partition(b"\n")
    try:
        header = orjson.loads(head)
    except orjson.JSONDecodeError as exc:
        raise SnapshotInvalid("corrupt header") from exc
    if not sep or not isinstance(header, dict) or header.get("v") != FORMAT:
        raise SnapshotInvalid(f"format {header.get('v') if isinstance(header, dict) else '?'}")
    if header.get("run_id") != run_id:
        raise SnapshotInvalid(f"it is run {header.get('run_id')!r}'s")
    seq, digest = header.get("seq"), header.get("event")
    if not (isinstance(seq, int) and seq > 0 and isinstance(digest, str)):
        raise SnapshotInvalid("no sequence or event digest")
    if zlib.crc32(body) != header.get("crc"):
        raise SnapshotInvalid("the state does not match its checksum")
    times = unpack.unused_data
    if zlib.crc32(times) != header.get("times_crc"):
        raise SnapshotInvalid("the step times do not match their checksum")
    return Decoded(run_id, seq, digest, body, times)


_new = object.__new__
_set = object.__setattr__
_MISSING = object()
# What ``RestoredSteps.completed`` answers for a step it holds no unread completed row of.
NOT_RESTORED: Any = object()


class _Columns:
    """A snapshot's steps as stored, by row: what ``RestoredSteps`` builds events from."""

    __slots__ = (
        "_packed",
        "_times",
        "attempts",
        "heads",
        "index",
        "metas",
        "outputs",
        "run_id",
        "run_names",
    )

    def __init__(
        self,
        run_id: str,
        heads: list[Head],
        index: list[int],
        outputs: list[Any],
        attempts: list[int],
        metas: list[Any],
        packed: bytes,
    ) -> None:
        self.run_id = run_id
        self.heads, self.index, self.outputs = heads, index, outputs
        # By head: the function name of a completed run step (None: any name), else False.
        self.run_names: list[str | bool | None] = [
            n if flag == _COMPLETED and kind == "run" else False for flag, kind, n in heads
        ]
        self.attempts, self.metas = attempts, metas
        self._packed = packed
        self._times: list[Any] | None = None

    def times(self, i: int) -> tuple[Any, Any, Any]:
        """Row ``i``'s (at, started_at, duration_ms): the first call decodes them all."""
        if self._times is None:
            self._times = self._decode_times()
        t = self._times
        return t[3 * i], t[3 * i + 1], t[3 * i + 2]

    def _decode_times(self) -> list[Any]:
        n = len(self.index)
        try:
            times = orjson.loads(zlib.decompress(self._packed))
            if (
                type(times) is list
                and len(times) == 3 * n
                and not set(map(type, times)) - {float, int, type(None)}
                and not set(map(type, times[0::3])) - {float, int}  # every step has its "at"
            ):
                return times
            why = "not one (at, started_at, duration_ms) per step"
        except (zlib.error, orjson.JSONDecodeError) as exc:
            why = str(exc)
        # Clock times are what the steps' events say of when; no replay decision reads them:
        # the events restored from this snapshot carry none rather than wrong ones.
        log.warning("run %s: the replay snapshot's step times are unusable (%s)", self.run_id, why)
        return [0.0, None, None] * n

    def columns(self, i: int) -> tuple[Head, Any, int, Any, tuple[Any, ...]]:
        return (
            self.heads[self.index[i]],
            self.outputs[i],
            self.attempts[i],
            self.metas[i],
            self.times(i),
        )

    def event(self, key: str, i: int) -> ev.StepCompleted | ev.StepFailed:
        flag, kind, name = self.heads[self.index[i]]
        at, started_at, duration_ms = self.times(i)
        if flag == _COMPLETED:
            # The frozen dataclass's __init__ without its keyword handling: the fields are
            # those ``_columns`` stored.
            e = _new(ev.StepCompleted)
            _set(e, "key", key)
            _set(e, "kind", kind)
            _set(e, "name", name)
            _set(e, "output", self.outputs[i])
            _set(e, "attempts", self.attempts[i])
            _set(e, "at", at)
            _set(e, "started_at", started_at)
            _set(e, "duration_ms", duration_ms)
            _set(e, "meta", self.metas[i])
            return e
        return ev.StepFailed(
            key=key,
            kind=kind,  # type: ignore[arg-type]
            name=name,
            error=self.outputs[i],
            attempts=self.attempts[i],
            at=at,
        )


class RestoredSteps(dict[str, Any]):
    """``RunState.steps`` restored from a snapshot: each step stays its row number until it is
    asked for, then becomes its event. Building 10,000 events up front cost more than
    everything else a snapshot saves; a replay asks for each step once, and replay's common
    case (``ctx.step.run``) reads the row itself (``completed``)."""

    __slots__ = ("_cols",)

    def __init__(self, cols: _Columns, keys: list[str]) -> None:
        super().__init__(zip(keys, range(len(keys)), strict=True))
        self._cols = cols

    def completed(self, key: str, name: str) -> Any:
        """The output of the completed ``run`` step ``key`` of function ``name`` when it is
        still a row; ``NOT_RESTORED`` for anything else (no such step, another kind or name,
        a failure, or asked for before: ``get`` answers those)."""
        i = dict.get(self, key)
        return self.completed_at(i, name) if type(i) is int else NOT_RESTORED

    def completed_at(self, row: int, name: str) -> Any:
        """``completed`` of the step stored at ``row`` (its place in the run's step order),
        asked for before or not (a row's columns never change)."""
        cols = self._cols
        if row >= len(cols.index):
            return NOT_RESTORED  # a step recorded after the snapshot
        n = cols.run_names[cols.index[row]]
        if n is not None and n != name:
            return NOT_RESTORED  # another kind or a failure (False), or another function
        return cols.outputs[row]

    def _event_of(self, key: str, value: Any) -> ev.StepCompleted | ev.StepFailed:
        """The stored ``value`` of ``key`` as its event: a row number becomes one, once."""
        if type(value) is int:
            value = self._cols.event(key, value)
            dict.__setitem__(self, key, value)
        return value  # type: ignore[no-any-return]

    def __getitem__(self, key: str) -> ev.StepCompleted | ev.StepFailed:
        return self._event_of(key, dict.__getitem__(self, key))

    def get(self, key: str, default: Any = None) -> Any:
        value = dict.get(self, key, _MISSING)
        return default if value is _MISSING else self._event_of(key, value)

    def values(self) -> list[ev.StepCompleted | ev.StepFailed]:  # type: ignore[override]
        return [self[k] for k in self]

    def items(self) -> list[tuple[str, ev.StepCompleted | ev.StepFailed]]:  # type: ignore[override]
        return [(k, self[k]) for k in self]

    def copy(self) -> dict[str, ev.StepCompleted | ev.StepFailed]:
        return dict(self.items())

    def __eq__(self, other: object) -> bool:
        return dict(self.items()) == other

    __hash__ = None


def _event(body: Any, cls: type[ev.Event]) -> Any:
    if body is None:
        return None
    event = ev.decode_body(body)
    if not isinstance(event, cls):
        raise SnapshotInvalid(f"{type(event).__name__} where a {cls.__name__} belongs")
    return event


def restore(decoded: Decoded) -> ev.RunState:
    """The ``RunState`` a snapshot holds; ``SnapshotInvalid`` if it is not one."""
    # Decoding a long run's steps allocates many objects at once, none of them garbage: the
    # cyclic collector would walk them (and the whole heap) again and again for nothing.
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _restore(decoded)
    except (KeyError, TypeError, ValueError, IndexError, ev.EventDecodeError) as exc:
        if isinstance(exc, SnapshotInvalid):
            raise
        raise SnapshotInvalid(f"malformed state ({type(exc).__name__}: {exc})") from exc
    finally:
        if enabled:
            gc.enable()


def _expand(runs: Any, heads: int, n: int) -> list[int]:
    """Each step's head, from runs of [head, count]."""
    if type(runs) is not list:
        raise SnapshotInvalid("malformed step heads")
    index: list[int] = []
    for run in runs:
        if not (
            type(run) is list
            and len(run) == 2
            and type(run[0]) is int
            and 0 <= run[0] < heads
            and type(run[1]) is int
            and run[1] > 0
        ):
            raise SnapshotInvalid("a malformed run of step heads")
        index += [run[0]] * run[1]
    if len(index) != n:
        raise SnapshotInvalid("not one head per step")
    return index


def _sparse(pairs: Any, default: Any, n: int, what: str, of: type | None = None) -> list[Any]:
    """A column of ``n`` values, ``default`` but for the [row, value] pairs (values of type
    ``of``, when given)."""
    column = [default] * n
    if type(pairs) is not list:
        raise SnapshotInvalid(f"malformed step {what}")
    for pair in pairs:
        if not (
            type(pair) is list
            and len(pair) == 2
            and type(pair[0]) is int
            and (of is None or type(pair[1]) is of)
        ):
            raise SnapshotInvalid(f"malformed step {what}")
        if not 0 <= pair[0] < n:
            raise SnapshotInvalid(f"step {what} of no step")
        column[pair[0]] = pair[1]
    return column


def _of_types(values: Any, types: set[type], n: int) -> bool:
    # set(map(type, ...)): per step, in C.
    return type(values) is list and len(values) == n and not set(map(type, values)) - types


def _steps(decoded: Decoded, f: dict[str, Any]) -> tuple[list[str], RestoredSteps]:
    """The columns of the state's steps, checked (here, so that a row never fails later where
    it is used)."""
    keys = f["keys"]
    if type(keys) is not list:
        raise SnapshotInvalid("malformed steps")
    n = len(keys)
    heads = f["heads"]
    if type(heads) is not list or not all(
        type(h) is list
        and len(h) == 3
        and h[0] in (_COMPLETED, _FAILED)
        and type(h[1]) is str
        and (h[2] is None or type(h[2]) is str)
        for h in heads
    ):
        raise SnapshotInvalid("a malformed step head")
    index = _expand(f["runs"], len(heads), n)
    outputs = f["outputs"]
    if not (_of_types(keys, {str}, n) and type(outputs) is list and len(outputs) == n):
        raise SnapshotInvalid("a malformed step")
    attempts = _sparse(f["attempts"], 1, n, "attempts", int)
    metas = _sparse(f["meta"], None, n, "meta")
    failed = {i for i, h in enumerate(heads) if h[0] == _FAILED}
    if failed and any(type(outputs[row]) is not dict for row, h in enumerate(index) if h in failed):
        raise SnapshotInvalid("a failed step without its error")
    cols = _Columns(
        decoded.run_id,
        [(h[0], h[1], h[2]) for h in heads],
        index,
        outputs,
        attempts,
        metas,
        decoded.times,
    )
    steps = RestoredSteps(cols, keys)
    if len(steps) != n:
        raise SnapshotInvalid("a step is recorded twice")
    return keys, steps


def _restore(decoded: Decoded) -> ev.RunState:
    f = orjson.loads(decoded.body)
    keys, steps = _steps(decoded, f)
    state = ev.RunState(
        run_id=decoded.run_id,
        last_seq=int(f["last_seq"]),
        workflow=f["workflow"],
        requested=_event(f["requested"], ev.RunRequested),
        status=f["status"],
        attempt=int(f["attempt"]),
        worker_id=f["worker_id"],
        steps=steps,
        step_order=keys,
        attempt_failures=dict(f["attempt_failures"]),
        suspended=_event(f["suspended"], ev.RunSuspended),
        rate_waits={k: _event(v, ev.RunSuspended) for k, v in f["rate_waits"].items()},
        output=f["output"],
        error=f["error"],
        created_at=f["created_at"],
        updated_at=f["updated_at"],
        events=int(f["events"]),
        restarts=int(f["restarts"]),
    )
    if state.last_seq != decoded.seq or state.status not in ev.RUN_STATUSES:
        raise SnapshotInvalid("the state does not end at its sequence")
    return state


# --------------------------------------------------------------------------- the store


def _subject(names: Names, run_id: str) -> str:
    return f"$KV.{names.snapshots_bucket}.{run_id}"


async def write(nc: NATS, js: JetStreamContext, names: Names, cap: Capture) -> int:
    """Store the snapshot of ``cap`` (replacing the run's last one); returns its size."""
    value = await encode(cap)
    if len(value) > payloads.inline_limit(nc):
        name = f"{cap.run_id}/snapshot-{cap.seq}"
        obs = await payloads.store(js, names)
        await obs.put(name, value)
        value = REFERENCE + orjson.dumps(
            {"object": name, "sha256": hashlib.sha256(value).hexdigest(), "seq": cap.seq}
        )
    await publish(nc, _subject(names, cap.run_id), value, timeout=30.0)
    return len(value)


async def _value(nc: NATS, js: JetStreamContext, names: Names, run_id: str) -> bytes | None:
    entry = await kv_entry(nc, names.snapshots_bucket, run_id)
    if entry is None:
        return None
    value = entry.value
    if value.startswith(REFERENCE):
        try:
            ref = orjson.loads(value[len(REFERENCE) :])
            name, digest = ref["object"], ref["sha256"]
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            raise SnapshotInvalid("corrupt reference") from exc
        if not isinstance(name, str) or not name.startswith(f"{run_id}/"):
            raise SnapshotInvalid(f"it refers to object {name!r}, not one of the run's")
        obs = await payloads.store(js, names)
        try:
            got = await obs.get(name)
        except (nats.js.errors.ObjectNotFoundError, nats.js.errors.NotFoundError) as exc:
            raise SnapshotInvalid(f"its object {name!r} is missing") from exc
        value = got.data or b""
        if hashlib.sha256(value).hexdigest() != digest:
            raise SnapshotInvalid(f"its object {name!r} does not match its digest")
    return value


async def _event_at(nc: NATS, names: Names, run_id: str, seq: int) -> ev.Event | None:
    """The run's event stored at ``seq``, or None (not there, or another run's)."""
    msg = await message_at(nc, names.runs_stream, seq)
    if msg is None or msg.subject not in {names.run_subject(run_id, k) for k in RUN_KINDS}:
        return None
    data = msg.data
    if (msg.headers or {}).get(payloads.HEADER):
        data = await payloads.resolve(nc.jetstream(), names, data)
    return ev.decode(data)


@dataclass(slots=True)
class Loaded:
    """A run's state from its snapshot and the events after it."""

    state: ev.RunState
    snapshot_seq: int
    state_events: int  # the events the snapshot itself covered


async def load(
    nc: NATS, js: JetStreamContext, names: Names, run_id: str
) -> tuple[Loaded | None, str]:
    """The run's state from its snapshot plus the events after it, or None and why not
    (``"none"``: the run has no snapshot; otherwise what is wrong with it). The caller reads
    the whole history when it gets None."""
    try:
        value = await _value(nc, js, names, run_id)
        if value is None:
            return None, "none"
        decoded = decode(run_id, value)
        # The check against the log and the events after the snapshot, while the state is
        # rebuilt.
        at = asyncio.ensure_future(_event_at(nc, names, run_id, decoded.seq))
        tail = asyncio.ensure_future(read_history(nc, names, run_id, start_seq=decoded.seq + 1))
        await asyncio.sleep(0)  # let them send their requests first
        try:
            state = restore(decoded)
            event = await at
            after = await tail
        finally:
            for fut in (at, tail):
                if not fut.done():
                    fut.cancel()
        if event is None or event_digest(event) != decoded.digest:
            raise SnapshotInvalid(f"the log does not hold its event at seq {decoded.seq}")
        covered = state.events
        for seq, e in after:
            state.apply(seq, e)
    except (SnapshotInvalid, ev.SequenceError, ev.EventDecodeError) as exc:
        return None, str(exc)
    return Loaded(state, decoded.seq, covered), "ok"


async def delete(nc: NATS, js: JetStreamContext, names: Names, run_id: str) -> None:
    """Remove the run's snapshot (and its object, if it had one)."""
    entry = await kv_entry(nc, names.snapshots_bucket, run_id)
    if entry is None:
        return
    if entry.value.startswith(REFERENCE):
        with contextlib.suppress(Exception):
            name = orjson.loads(entry.value[len(REFERENCE) :])["object"]
            if isinstance(name, str) and name.startswith(f"{run_id}/"):
                await (await payloads.store(js, names)).delete(name)
    await purge(nc, names, run_id)


async def purge(nc: NATS, names: Names, run_id: str) -> None:
    """Remove the run's snapshot key (its object, if any, goes with the run's objects)."""
    await publish(
        nc,
        _subject(names, run_id),
        b"",
        headers={"KV-Operation": "PURGE", "Nats-Rollup": "sub"},
        timeout=30.0,
    )


class Writer:
    """A process's background snapshot writes, none on the step path (a step stays one awaited
    append): at most one write in flight per run, the newest capture waiting behind it;
    failures only logged (it is a cache)."""

    def __init__(self, nc: NATS, js: JetStreamContext, names: Names, every: int) -> None:
        self.nc, self.js, self.names, self.every = nc, js, names, every
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._next: dict[str, Capture] = {}
        self.written = 0
        self.failed = 0

    def due(self, events: int, covered: int) -> bool:
        """Whether a run with ``events`` events, whose snapshot covers ``covered``, needs one."""
        return self.every > 0 and events - covered >= self.every

    def submit(self, cap: Capture) -> None:
        """Write ``cap`` in the background (after the run's write in flight, if any)."""
        self._next[cap.run_id] = cap
        running = self._tasks.get(cap.run_id)
        # A drain that found nothing more to write is done a loop turn before its callback
        # takes it out of ``_tasks``: a capture submitted then needs a drain of its own.
        if running is None or running.done():
            self._start(cap.run_id, self._drain(cap.run_id))

    def _start(self, key: str, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=f"snapshot-{key}")
        self._tasks[key] = task
        task.add_done_callback(lambda t: self._drop(key, t))

    def _drop(self, key: str, task: asyncio.Task[None]) -> None:
        if self._tasks.get(key) is task:
            del self._tasks[key]

    async def _drain(self, run_id: str) -> None:
        while (cap := self._next.pop(run_id, None)) is not None:
            try:
                await write(self.nc, self.js, self.names, cap)
                self.written += 1
            except Exception as exc:
                self.failed += 1
                log.warning("run %s: snapshot at seq %d not written: %s", run_id, cap.seq, exc)

    def forget(self, run_id: str) -> None:
        """The run ended: remove its snapshot, after the write in flight (if any)."""
        self._next.pop(run_id, None)
        running = self._tasks.get(run_id)

        async def remove() -> None:
            if running is not None:
                with contextlib.suppress(BaseException):
                    await running
            try:
                await delete(self.nc, self.js, self.names, run_id)
            except Exception as exc:
                log.warning("run %s: snapshot not removed: %s", run_id, exc)

        self._start(f"-{run_id}", remove())

    async def idle(self) -> None:
        """Until every write and removal in flight has finished."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks.values()), return_exceptions=True)

    async def close(self, timeout: float = 1.0) -> None:
        """Let writes in flight finish for ``timeout`` seconds, then cancel the rest."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.idle(), timeout)
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._next.clear()


__all__ = [
    "NOT_RESTORED",
    "Capture",
    "Loaded",
    "RestoredSteps",
    "SnapshotInvalid",
    "Writer",
    "capture",
    "decode",
    "delete",
    "encode",
    "event_digest",
    "exists",
    "is_of",
    "load",
    "purge",
    "restore",
    "write",
]
