"""Replay snapshots (polos/_private/store/snapshots.py): a long run resumes from a snapshot of
its folded state plus the events after it, the log stays the truth.

Under authentication, each part as its production role: workers (the worker role) write and
read snapshots, the orchestrator (service) resumes and cancels, the client starts and resumes.
Step functions mark a log file each time they really run, so the counters show that no
completed step runs again, across a SIGKILL too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import zlib
from pathlib import Path
from typing import Any

import nats.errors
import orjson
import pytest

from polos import Worker
from polos import history as ev
from polos._private.run.execution import RunExecution
from polos._private.store import (
    FencedOut,
    Names,
    append,
    connect,
    disconnect,
    kv_entry,
    load_state,
    snapshots,
)
from polos.testing import SecuredServer, create_topology
from tests.helpers import counts, kill, marks, spawn, stop, until
from tests.workflows.long import Long, long_run

pytestmark = pytest.mark.slow

WORKER = ["-m", "polos_services.worker", "tests.workflows.long"]


def _squares(n: int) -> int:
    return sum(i * i for i in range(1, n + 1))


async def _snapshot_seq(settings: Any, run_id: str) -> int | None:
    """The sequence the run's stored snapshot covers (read as the worker role), or None."""
    nc = await connect(settings.worker, name="peek")
    try:
        entry = await kv_entry(nc, Names(settings.prefix).snapshots_bucket, run_id)
        if entry is None:
            return None
        return snapshots.decode(run_id, entry.value).seq
    finally:
        await disconnect(nc)


async def _until_async(cond: Any, what: str, timeout: float = 30.0) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        got = await cond()
        if got:
            return got
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def _suspended(env: Any, run_id: str) -> ev.RunState:
    async def look() -> ev.RunState | None:
        state = ev.RunState.fold(run_id, await env.client.history(run_id))
        return state if state.status == "suspended" else None

    got: ev.RunState = await _until_async(look, "the run to suspend")
    return got


async def _suspended_with_snapshot(env: Any, settings: Any, run_id: str) -> ev.RunState:
    """The long run's state once it is suspended and its worker's snapshot of the suspension
    is stored. The test sees the suspension in the log before the worker (in this process)
    has the append's answer and submits the write, so ``Writer.idle()`` alone can return
    before there is anything to wait for."""
    state = await _suspended(env, run_id)

    async def written() -> bool:
        return await _snapshot_seq(settings, run_id) == state.last_seq

    await _until_async(written, f"run {run_id}'s snapshot of its suspension")
    return state


@pytest.fixture
def marks_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where the step functions of ``long_run`` mark each execution, for the workers of this
    process (``POLOS_TEST_LOG``)."""
    log = tmp_path / "marks.log"
    monkeypatch.setenv("POLOS_TEST_LOG", str(log))
    return log


def _assert_each_step_once(log: Path, steps: int) -> None:
    started, done = counts(log)
    for i in range(1, steps + 1):
        assert started[str(i)] == done[str(i)] == 1, f"step {i}: {marks(log)}"


async def test_a_long_run_resumes_from_its_snapshot_on_a_worker_without_its_state(
    env_factory: Any, settings: Any, marks_log: Path
) -> None:
    env = await env_factory([], with_worker=False)
    # state_cache=0: the worker keeps nothing of a run it suspended, so the resume replays.
    async with Worker([long_run], settings=settings.worker, state_cache=0) as worker:
        # More steps than a resume reads before it takes a run for a long one (16), and more
        # history than a task carries (32 KB): the worker has to find the history itself.
        handle = await env.client.start(long_run, Long(steps=200))
        state = await _suspended_with_snapshot(env, settings, handle.run_id)
        assert worker.snapshots is not None
        # Written when the run suspended: it covers the whole run up to the RunSuspended.
        assert await _snapshot_seq(settings, handle.run_id) == state.last_seq
        await env.client.resume(handle.run_id, "approve", {"add": 1000})
        assert await handle.result(timeout=30) == _squares(200) + 1000
        assert worker.history_reads["snapshot"] == 1, worker.history_reads
        assert worker.history_reads["full"] == 0, worker.history_reads
        assert worker.snapshots_ignored == []
        await worker.snapshots.idle()
        # Removed when the run ended.
        assert await _snapshot_seq(settings, handle.run_id) is None
    _assert_each_step_once(marks_log, 200)
    assert counts(marks_log)[1]["0"] == 1  # the step after the resume ran once


async def test_sigkill_after_a_snapshot_no_completed_step_runs_again(
    env_factory: Any,
    settings: Any,
    subprocess_env: Any,
    tmp_path: Path,
    marks_log: Path,
) -> None:
    subprocess_env["POLOS_TEST_LOG"] = str(marks_log)  # the takeover worker is this process's
    env = await env_factory([], with_worker=False)
    w1 = spawn(WORKER, subprocess_env.as_role("worker"), tmp_path / "w1.out")
    try:
        handle = await env.client.start(long_run, Long(steps=80, step_seconds=0.02, suspend=False))
        # Snapshots every 50 events (fast_settings): kill once one is written and the run
        # has gone on past it.
        first = await _until_async(
            lambda: _snapshot_seq(settings, handle.run_id), "a snapshot of the running run"
        )
        await until(lambda: "done 50" in marks(marks_log), 30, "step 50 to finish")
        kill(w1)
    finally:
        stop(w1)
    recorded = {
        e.key for _, e in await env.client.history(handle.run_id) if isinstance(e, ev.StepCompleted)
    }
    assert 50 <= len(recorded) < 80
    async with Worker([long_run], settings=settings.worker, state_cache=0) as w2:
        assert await handle.result(timeout=30) == _squares(80)
        # The takeover replayed from a snapshot (the one above or a later one), not the log.
        assert w2.history_reads["snapshot"] == 1, w2.history_reads
        assert w2.history_reads["full"] == 0, w2.history_reads
        assert w2.snapshots_ignored == []
        assert w2.snapshots is not None
        await w2.snapshots.idle()
    assert first > 0
    started, done = counts(marks_log)
    for i in range(1, 81):
        key = f"s{i}"
        if key in recorded:  # completed before the kill: never again
            assert started[str(i)] == done[str(i)] == 1, f"step {i} ran again: {marks(marks_log)}"
        else:  # in flight at the kill (at most one step) or after: done once
            assert done[str(i)] == 1 and started[str(i)] <= 2, f"step {i}: {marks(marks_log)}"
    assert sum(1 for i in range(1, 81) if started[str(i)] == 2) <= 1
    assert await _snapshot_seq(settings, handle.run_id) is None


async def _tamper(kind: str, settings: Any, run_id: str, other: str) -> None:
    """Replace the run's snapshot, as the worker role (who may write snapshots)."""
    names = Names(settings.prefix)
    nc = await connect(settings.worker, name="tamper")
    js = nc.jetstream()
    subject = f"$KV.{names.snapshots_bucket}.{run_id}"
    try:
        entry = await kv_entry(nc, names.snapshots_bucket, run_id)
        assert entry is not None
        if kind == "corrupt":  # bytes flipped in the middle of the compressed state
            value = bytearray(entry.value)
            for i in range(len(value) // 2, len(value) // 2 + 16):
                value[i] ^= 0x5A
            await js.publish(subject, bytes(value))
        elif kind == "foreign":  # another run's valid snapshot under this run's key
            theirs = await kv_entry(nc, names.snapshots_bucket, other)
            assert theirs is not None
            await js.publish(subject, theirs.value)
        elif kind == "forged":
            # Well formed, this run's id and sequence, but other outputs (a replay from it
            # would return another total) and not the event the log holds at that sequence.
            state = await load_state(nc, names, run_id)
            s1 = state.steps["s1"]
            assert isinstance(s1, ev.StepCompleted)
            state.steps["s1"] = dataclasses.replace(s1, output=1_000_000)
            fake = ev.RunSuspended(run_id=run_id, step="approve", kind="suspend")
            await snapshots.write(nc, js, names, snapshots.capture(state, fake))
        else:
            raise AssertionError(kind)
    finally:
        await disconnect(nc)


@pytest.mark.parametrize("kind", ["corrupt", "foreign", "forged"])
async def test_a_corrupt_foreign_or_forged_snapshot_is_ignored_and_the_log_replayed(
    kind: str,
    env_factory: Any,
    settings: Any,
    marks_log: Path,
) -> None:
    env = await env_factory([], with_worker=False)
    async with Worker([long_run], settings=settings.worker, state_cache=0) as worker:
        assert worker.snapshots is not None
        other = await env.client.start(long_run, Long(steps=150))
        handle = await env.client.start(long_run, Long(steps=200))
        await _suspended_with_snapshot(env, settings, other.run_id)
        await _suspended_with_snapshot(env, settings, handle.run_id)
        await _tamper(kind, settings, handle.run_id, other.run_id)
        await env.client.resume(handle.run_id, "approve", {"add": 7})
        assert await handle.result(timeout=30) == _squares(200) + 7
        assert worker.history_reads["full"] == 1, worker.history_reads
        assert worker.history_reads["snapshot"] == 0, worker.history_reads
        assert len(worker.snapshots_ignored) == 1, worker.snapshots_ignored
        print(f"\n{kind}: ignored because {worker.snapshots_ignored[0]}")
        await env.client.cancel(other.run_id)
        await worker.snapshots.idle()
    started, done = counts(marks_log)
    # Steps of the tampered run ran once (the other run's s1..s150 once as well): 2 and 1.
    for i in range(1, 201):
        assert started[str(i)] == done[str(i)] == (2 if i <= 150 else 1), f"step {i}"
    # The run that ended, and the cancelled one (removed by the orchestrator): no snapshot.
    assert await _snapshot_seq(settings, handle.run_id) is None

    async def gone() -> bool:
        return await _snapshot_seq(settings, other.run_id) is None

    await _until_async(gone, "the cancelled run's snapshot to be removed")


async def _denied(nc: Any, subject: str) -> bool:
    try:
        await nc.jetstream(timeout=0.5).publish(subject, b"x")
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError, TimeoutError):
        return True
    return False


async def test_the_client_role_can_neither_write_nor_read_snapshots(
    nats_server: SecuredServer,
) -> None:
    # A namespace of its own, outside the fixtures' violation check: the refusals are the
    # point here.
    s = nats_server.namespace()
    await create_topology(s)
    names = Names(s.prefix)
    subject = f"$KV.{names.snapshots_bucket}.r1"
    client = await connect(s, name="client")
    worker = await connect(s.worker, name="worker")
    try:
        assert not await _denied(worker, subject)
        assert await kv_entry(worker, names.snapshots_bucket, "r1") is not None
        assert await _denied(client, subject)
        with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
            await kv_entry(client, names.snapshots_bucket, "r1")
    finally:
        await disconnect(client)
        await disconnect(worker)
        nats_server.release(s.prefix)


async def test_a_snapshot_restores_exactly_the_fold_it_was_taken_of() -> None:
    # Every kind of thing a fold keeps: steps completed and failed, a failed attempt, a step
    # woken with an outcome, a rate wait, a claim after a lost worker, the suspension.
    history: list[tuple[int, ev.Event]] = [
        (1, ev.RunRequested(run_id="r", workflow="w", input={"a": [1, 2]}, initial_state={"n": 1})),
        (2, ev.RunClaimed(run_id="r", worker_id="w1", attempt=1)),
        (3, ev.StepCompleted(key="s1", kind="run", name="f", output={"x": 1.5}, duration_ms=0.1)),
        (4, ev.StepAttemptFailed(key="s2", kind="run", name="g", attempt=1, error={}, retry_in=1)),
        (5, ev.StepFailed(key="s2", kind="run", name="g", error={"type": "E"}, attempts=2)),
        (6, ev.RunSuspended(run_id="r", step="llm#1", kind="rate", data={"t": 3}, wake_at=9.0)),
        (7, ev.RunWoken(run_id="r", step="llm#1", reason="timer")),
        (8, ev.RunClaimed(run_id="r", worker_id="w2", attempt=2)),
        (9, ev.RunClaimed(run_id="r", worker_id="w3", attempt=3)),
        (10, ev.StepCompleted(key="llm#1", kind="llm", output="hi", meta={"model": "m"})),
        (11, ev.RunSuspended(run_id="r", step="ok", kind="suspend")),
        (12, ev.RunWoken(run_id="r", step="ok", reason="resumed", kind="suspend", output={"d": 1})),
        (13, ev.RunClaimed(run_id="r", worker_id="w3", attempt=4)),
        (14, ev.RunSuspended(run_id="r", step="later", kind="event", topic="t", cursor=3)),
    ]
    state = ev.RunState.fold("r", history)
    value = await snapshots.encode(snapshots.capture(state, history[-1][1]))
    decoded = snapshots.decode("r", value)
    assert decoded.seq == 14 and decoded.digest == snapshots.event_digest(history[-1][1])
    restored = snapshots.restore(decoded)
    # Re-encoded without asking for any step: the same bytes (rows pass through as stored).
    assert await snapshots.encode(snapshots.capture(restored, history[-1][1])) == value
    for f in dataclasses.fields(ev.RunState):
        if f.name != "steps":
            assert getattr(restored, f.name) == getattr(state, f.name), f.name
    assert restored.steps == state.steps
    assert list(restored.steps) == list(state.steps) == restored.step_order
    assert isinstance(restored.steps["s2"], ev.StepFailed)
    # And the fold goes on on top of it as on the folded state.
    more = (15, ev.RunWoken(run_id="r", step="later", reason="event", kind="event", output=2))
    restored.apply(*more)
    state.apply(*more)
    assert restored.steps == state.steps and restored.status == state.status == "queued"


@pytest.mark.parametrize(
    "change",
    ["format", "run", "crc", "truncated", "heads", "runs", "attempts", "failed"],
)
def test_a_snapshot_that_is_not_one_says_why(change: str) -> None:
    state = ev.RunState.fold(
        "r",
        [
            (1, ev.RunRequested(run_id="r", workflow="w")),
            (2, ev.StepCompleted(key="s1", kind="run", output=1)),
        ],
    )
    last = ev.StepCompleted(key="s1", kind="run", output=1)
    value = asyncio.run(snapshots.encode(snapshots.capture(state, last)))
    unpack = zlib.decompressobj()
    head, _, body = unpack.decompress(value[4:]).partition(b"\n")
    times = unpack.unused_data  # the steps' clock times: a stream of their own
    header = orjson.loads(head)
    if change == "format":
        header["v"] = 1
    elif change == "run":
        header["run_id"] = "other"
    elif change == "crc":
        body = body.replace(b'"s1"', b'"s2"')
    elif change in ("heads", "runs", "attempts", "failed"):
        fields = orjson.loads(body)
        if change == "heads":
            fields["heads"] = [[0, "run"]]
        elif change == "runs":
            fields["runs"] = [[0, 2]]  # two steps' heads for one step
        elif change == "attempts":
            fields["attempts"] = [[0, "twice"]]
        else:  # a failed step's head over a step whose "error" is not one
            fields["heads"] = [[1, "run", None]]
        body = orjson.dumps(fields)
        header["crc"] = zlib.crc32(body)
    raw = orjson.dumps(header) + b"\n" + body
    bad = value[:4] + zlib.compress(raw) + times
    if change == "truncated":
        bad = value[: len(value) // 2]
    with pytest.raises(snapshots.SnapshotInvalid) as why:
        snapshots.restore(snapshots.decode("r", bad))
    assert str(why.value)


def test_unusable_step_times_leave_the_replay_as_it_is_and_say_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The steps' clock times are a stream of their own, read only when a restored step is asked
    # for as an event: what replay decides never depends on them, so a snapshot whose times are
    # broken restores the same outputs, and its events say they have no times (with a warning).
    history: list[tuple[int, ev.Event]] = [
        (1, ev.RunRequested(run_id="r", workflow="w")),
        (2, ev.StepCompleted(key="s1", kind="run", name="f", output=1, duration_ms=0.5)),
        (3, ev.StepCompleted(key="s2", kind="run", name="f", output=2, attempts=3)),
    ]
    state = ev.RunState.fold("r", history)
    value = asyncio.run(snapshots.encode(snapshots.capture(state, history[-1][1])))
    good = snapshots.restore(snapshots.decode("r", value))
    assert good.steps == state.steps
    # Well formed, its checksum right (a writer's bug, not corruption): not one time per step.
    unpack = zlib.decompressobj()
    head, _, body = unpack.decompress(value[4:]).partition(b"\n")
    times = zlib.compress(b"[1, 2]")
    header = {**orjson.loads(head), "times_crc": zlib.crc32(times)}
    broken = value[:4] + zlib.compress(orjson.dumps(header) + b"\n" + body) + times
    restored = snapshots.restore(snapshots.decode("r", broken))
    assert restored.steps.completed("s2", "f") == 2
    with caplog.at_level(logging.WARNING, logger="polos.snapshots"):
        s2 = restored.steps["s2"]
    assert isinstance(s2, ev.StepCompleted)
    assert (s2.output, s2.attempts, s2.at, s2.duration_ms) == (2, 3, 0.0, None)
    assert "step times are unusable" in caplog.text


class _Raced(Worker):
    """A worker before whose first claim of a run another writer claims it: the moment a
    second delivery of the task to another worker would land (injected right after the load,
    where the race happens)."""

    raced = 0

    async def _load(self, run_id: str) -> tuple[ev.RunState, snapshots.Loaded | None]:
        state, snap = await super()._load(run_id)
        if snap is not None and not self.raced:
            self.raced += 1
            assert self._js is not None
            attempt = state.attempt + 1
            await append(
                self._js,
                self.names,
                run_id,
                ev.RunClaimed(run_id=run_id, worker_id="other", attempt=attempt),
                expected_last_seq=state.last_seq,
                msg_id=f"{run_id}/c/{attempt}/other",
            )
        return state, snap


async def test_a_claim_refused_during_the_re_walk_runs_nothing_and_is_claimed_again(
    env_factory: Any, settings: Any, marks_log: Path
) -> None:
    # A long run from its snapshot starts its re-walk while its claim travels. Here the claim is
    # refused (another claim landed first): the execution writes nothing and runs no step, and
    # the worker claims the run again from the log as it is (the other claim in it).
    env = await env_factory([], with_worker=False)
    async with _Raced([long_run], settings=settings.worker, state_cache=0) as worker:
        handle = await env.client.start(long_run, Long(steps=200))
        await _suspended_with_snapshot(env, settings, handle.run_id)
        await env.client.resume(handle.run_id, "approve", {"add": 5})
        assert await handle.result(timeout=30) == _squares(200) + 5
        assert worker.raced == 1 and worker.claims_refused == 1
        assert worker.history_reads["snapshot"] == 2, worker.history_reads
    _assert_each_step_once(marks_log, 200)
    started, done = counts(marks_log)
    assert started["0"] == done["0"] == 1  # the step after the resume ran once
    history = await env.client.history(handle.run_id)
    claims = [e for _, e in history if isinstance(e, ev.RunClaimed)]
    # Ours (refused) is not in the log; the other's is, and ours after it.
    assert [c.worker_id for c in claims[-2:]] == ["other", worker.id]
    assert claims[-1].attempt == claims[-2].attempt + 1


async def test_no_step_runs_and_nothing_is_written_before_a_claim_in_flight_lands(
    env_factory: Any, settings: Any
) -> None:
    # The execution-level rule the overlap rests on, against a real server: with a claim in
    # flight, a new step waits for it, and a refused claim stops the step (its function never
    # runs) and every write after it.
    env = await env_factory([], with_worker=False)
    names = Names(settings.prefix)
    nc = await connect(settings.worker, name="claimer")
    js = nc.jetstream()
    ran: list[int] = []

    async def step() -> int:
        ran.append(1)
        return 1

    try:
        run_id = "claimrace1"
        req = ev.RunRequested(run_id=run_id, workflow=long_run.name, input=Long().model_dump())
        seq = await append(js, names, run_id, req, expected_last_seq=0, msg_id=f"{run_id}/r")
        state = ev.RunState.fold(run_id, [(seq, req)])
        # Another writer moves the history on: our claim, fenced on ``seq``, is refused.
        other = ev.RunClaimed(run_id=run_id, worker_id="other", attempt=1)
        await append(js, names, run_id, other, expected_last_seq=seq, msg_id=f"{run_id}/c/1/o")
        exe = RunExecution(
            js=js, nc=nc, names=names, settings=settings.worker, workflow=long_run,
            state=state, worker_id="me",
        )  # fmt: skip
        exe.begin_claim(ev.RunClaimed(run_id=run_id, worker_id="me", attempt=1), f"{run_id}/c/1/me")
        assert exe.attempt == 1
        with pytest.raises(FencedOut):
            await exe.run_step("s1", step, (), {}, None)
        assert ran == [] and exe.claim_refused and exe.appends == 0
        with pytest.raises(FencedOut):
            await exe.record(ev.RunCompleted(run_id=run_id, output=0), msg_id=f"{run_id}/end")
        history = await env.client.history(run_id)
        assert [type(e).__name__ for _, e in history] == ["RunRequested", "RunClaimed"]
    finally:
        await disconnect(nc)


async def test_a_long_runs_suspension_says_it_has_a_snapshot_and_a_missing_one_costs_a_read(
    env_factory: Any, settings: Any, marks_log: Path
) -> None:
    # The RunSuspended of a long run says its worker writes a replay snapshot, so a resume takes
    # the run from its control events without asking the bucket; a short run's does not. When
    # the word is there but the snapshot is not (removed here; or not written yet), the worker
    # reads the log: slower, never another replay.
    env = await env_factory([], with_worker=False)
    async with Worker([long_run], settings=settings.worker, state_cache=0) as worker:
        short = await env.client.start(long_run, Long(steps=3))
        handle = await env.client.start(long_run, Long(steps=200))
        state = await _suspended(env, short.run_id)
        assert state.suspended is not None and state.suspended.snapshot is False
        state = await _suspended_with_snapshot(env, settings, handle.run_id)
        assert state.suspended is not None and state.suspended.snapshot is True
        nc = await connect(settings.worker, name="remover")
        try:
            await snapshots.delete(nc, nc.jetstream(), Names(settings.prefix), handle.run_id)
        finally:
            await disconnect(nc)
        await env.client.resume(handle.run_id, "approve", {"add": 3})
        assert await handle.result(timeout=30) == _squares(200) + 3
        assert worker.history_reads["full"] == 1 and worker.history_reads["snapshot"] == 0
        await env.client.resume(short.run_id, "approve", {"add": 1})
        assert await short.result(timeout=30) == _squares(3) + 1
    started, done = counts(marks_log)
    for i in range(1, 201):
        assert started[str(i)] == done[str(i)] == (2 if i <= 3 else 1), f"step {i}"


async def test_a_capture_submitted_as_the_last_write_ends_is_written(
    env_factory: Any, settings: Any
) -> None:
    # A run's drain ends when it finds nothing more to write; it leaves ``Writer._tasks`` a loop
    # turn later (its done callback). A capture submitted in between (a long run suspending
    # right after a periodic snapshot) was kept waiting for a drain that had ended: the
    # suspension's snapshot was never written. Here the writer is put in exactly that state.
    await env_factory([], with_worker=False)
    names = Names(settings.prefix)
    nc = await connect(settings.worker, name="writer")
    try:
        writer = snapshots.Writer(nc, nc.jetstream(), names, every=1)
        history: list[tuple[int, ev.Event]] = [
            (1, ev.RunRequested(run_id="w1", workflow="w")),
            (2, ev.StepCompleted(key="s1", kind="run", output=1)),
        ]
        state = ev.RunState.fold("w1", history)
        ended = asyncio.ensure_future(asyncio.sleep(0))
        await ended
        writer._tasks["w1"] = ended  # a finished drain its callback has not removed yet
        writer.submit(snapshots.capture(state, history[-1][1]))
        await asyncio.wait_for(writer.idle(), 10)  # without a drain of its own: never written
        assert writer.written == 1
        assert await _snapshot_seq(settings, "w1") == 2
    finally:
        await disconnect(nc)
