"""The hot path's shortcuts keep the guarantees they shortcut.

- A run's history is read kind by kind (literal subjects) and merged: the same messages, in the
  same order, as the wildcard read; the runs stream refuses any other kind.
- A brand-new run is claimed from the RunRequested its task carries, and a resumed run from
  the history its task carries, fenced on the task's sequence, without a history read; a task
  that is stale, too big to carry, or carries nonsense falls back to reading the history.
- A run woken where it was suspended, by a waker that did not read it, reads only the wake.
- A wake appended by a waker that died before dispatching is dispatched by the orchestrator's
  control hook; one the orchestrator dispatched itself is not dispatched again.
- One orchestrator writes a run's index entry one event at a time: its own concurrent handlers
  never fail each other's compare-and-set.
- ``store.publish`` answers with the same acks and the same errors as ``js.publish``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from typing import Any, ClassVar

import nats
import nats.errors
import nats.js.errors
import orjson
import pytest

import polos._private.store.task
import polos.worker
from polos import WorkflowContext, workflow
from polos import history as ev
from polos._private.store import (
    EXPECTED_LAST_SUBJECT_SEQ,
    EXPECTED_LAST_SUBJECT_SEQ_SUBJECT,
    MSG_ID,
    RUN_KINDS,
    WRONG_LAST_SEQUENCE,
    Ack,
    Names,
    append,
    load_state,
    publish,
    read_history,
    read_run,
    read_subject,
)
from polos._private.store.task import decode_task
from polos.config import Settings
from polos.worker import Worker

RAN: dict[str, int] = {}


async def count(run: str) -> int:
    RAN[run] = RAN.get(run, 0) + 1
    return RAN[run]


@workflow
async def hot_two_steps(ctx: WorkflowContext, tag: str) -> int:
    a: int = await ctx.step.run("a", count, f"{tag}:a")
    b: int = await ctx.step.run("b", count, f"{tag}:b")
    return a + b


class CountingReads:
    """Wraps the real ``load_state`` to count whole-history reads by run (the client's
    ``result()`` reads only control events, which is not what this counts)."""

    def __init__(self) -> None:
        self._real = load_state
        self.runs: list[str] = []

    async def __call__(self, nc: Any, names: Any, run_id: str, **kw: Any) -> ev.RunState:
        if kw.get("kinds", RUN_KINDS) == RUN_KINDS:
            self.runs.append(run_id)
        return await self._real(nc, names, run_id, **kw)


async def _connect(settings: Settings) -> tuple[Any, Any, Names]:
    """A worker's connection (it appends to histories and reads them)."""
    nc = await nats.connect(settings.worker.nats_url)
    js = nc.jetstream()
    names = Names(settings.prefix)
    return nc, js, names


async def test_history_read_by_kind_equals_the_wildcard_read(settings: Settings) -> None:
    nc, js, names = await _connect(settings)
    try:
        runs = [f"r{i}" for i in range(3)]
        last = dict.fromkeys(runs, 0)
        # Interleave the runs' events so each run's messages are spread over the stream.
        for i in range(40):
            for run in runs:
                event: ev.Event = (
                    ev.RunRequested(run_id=run, workflow="w")
                    if i == 0
                    else ev.StepCompleted(key=f"s{i}", kind="run", output=i)
                    if i % 3
                    else ev.RunClaimed(run_id=run, worker_id="w", attempt=i)
                )
                last[run] = await append(
                    js, names, run, event, expected_last_seq=last[run], msg_id=f"{run}/{i}"
                )
        for run in runs:
            wild = await read_subject(nc, names.runs_stream, names.run_filter(run))
            by_kind = await read_run(nc, names, run)
            assert [(m.seq, m.data) for m in by_kind] == [(m.seq, m.data) for m in wild]
            assert len(by_kind) == 40 and by_kind[-1].seq == last[run]
            ctl = await read_run(nc, names, run, kinds=("ctl",))
            assert [m.seq for m in ctl] == [m.seq for m in wild if m.subject.endswith(".ctl")]
            later = await read_history(nc, names, run, start_seq=by_kind[20].seq)
            assert [s for s, _ in later] == [m.seq for m in by_kind[20:]]
        # Nothing outside the known kinds can enter a run's history (the fence counts
        # <p>.run.<id>.*, so a read by kind must not be able to miss anything).
        # The stream stores only those subjects (and no role is granted any other).
        info = await js.stream_info(names.runs_stream)
        assert sorted(info.config.subjects) == sorted(names.runs_subjects)
    finally:
        await nc.close()


def test_an_event_kind_the_runs_stream_does_not_store_is_refused() -> None:
    @dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
    class SomethingNoted(ev.Event):
        KIND: ClassVar[str] = "notes"

    with pytest.raises(ValueError, match="KIND 'notes'"):
        ev.register(SomethingNoted)


async def test_a_new_run_is_claimed_without_a_history_read(
    env_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads = CountingReads()
    monkeypatch.setattr(polos.worker, "load_state", reads)
    env = await env_factory([hot_two_steps])
    tag = uuid.uuid4().hex[:8]
    handle = await env.client.start(hot_two_steps, tag)
    assert await handle.result(timeout=10) == 2
    assert handle.run_id not in reads.runs  # the worker claimed from the task alone
    assert RAN[f"{tag}:a"] == 1 and RAN[f"{tag}:b"] == 1
    types = [type(e).__name__ for _, e in await env.client.history(handle.run_id)]
    assert types == ["RunRequested", "RunClaimed", "StepCompleted", "StepCompleted", "RunCompleted"]


async def test_a_stale_or_bogus_fresh_task_falls_back_to_reading(
    env_factory: Any, settings: Settings
) -> None:
    env = await env_factory([hot_two_steps], with_worker=False)
    names = Names(settings.prefix)
    tag = uuid.uuid4().hex[:8]
    handle = await env.client.start(hot_two_steps, tag)
    # The orchestrator's fresh task is in the queue, unclaimed. Before a worker sees it, the
    # run moves on (another claim is recorded), so a claim fenced on the request must fail.
    state = await load_state(env.client.nc, names, handle.run_id)
    for _ in range(200):
        if state.requested is not None:
            break
        await asyncio.sleep(0.02)
        state = await load_state(env.client.nc, names, handle.run_id)
    # Written as the services would (a client may write neither histories nor tasks).
    await append(
        env.orchestrator.js,
        names,
        handle.run_id,
        ev.RunClaimed(run_id=handle.run_id, worker_id="gone", attempt=1),
        expected_last_seq=state.last_seq,
        msg_id=f"{handle.run_id}/c/1/gone",
    )
    # And a task for the same run carrying nonsense where the request should be.
    await env.orchestrator.js.publish(
        names.task_subject("hot_two_steps"),
        orjson.dumps(
            {
                "run_id": handle.run_id,
                "workflow": "hot_two_steps",
                "seq": 1,
                "history": [[1, {"t": "NoSuchEvent"}]],
            }
        ),
    )
    async with Worker([hot_two_steps], settings=settings.worker):
        assert await handle.result(timeout=10) == 2
    assert RAN[f"{tag}:a"] == 1 and RAN[f"{tag}:b"] == 1
    claims = [e for _, e in await env.client.history(handle.run_id) if isinstance(e, ev.RunClaimed)]
    assert [c.attempt for c in claims] == [1, 2]  # read the history, claimed as attempt 2
    assert _carried("x", [[3, [1]]], 3) is None
    wrong_run = _body(ev.RunRequested(run_id="y", workflow="w"))
    assert _carried("x", [[3, wrong_run]], 3) is None
    assert _carried("y", [[3, wrong_run]], 3) is not None


def _carried(run_id: str, history: Any, seq: Any) -> ev.RunState | None:
    """The state a task carrying ``history`` up to ``seq`` gives its worker."""
    task = decode_task(
        orjson.dumps({"run_id": run_id, "workflow": "w", "seq": seq, "history": history})
    )
    return task.carried_state()


def _body(event: ev.Event) -> dict[str, Any]:
    body: dict[str, Any] = orjson.loads(ev.encode(event))
    return body


def test_a_carried_history_is_used_only_when_it_is_whole_and_in_order() -> None:
    req = _body(ev.RunRequested(run_id="r", workflow="w"))
    claimed = _body(ev.RunClaimed(run_id="r", worker_id="w1", attempt=1))
    woken = _body(ev.RunWoken(run_id="r", step="k", reason="resumed", kind="suspend"))

    def carried(history: Any, seq: Any) -> ev.RunState | None:
        return _carried("r", history, seq)

    state = carried([[1, req], [2, claimed], [5, woken]], 5)
    assert state is not None and state.last_seq == 5 and state.attempt == 1
    assert carried([[1, req], [2, claimed], [5, woken]], 4) is None  # does not end at seq
    assert carried([[1, req], [5, woken], [2, claimed]], 2) is None  # out of order
    assert carried([[2, claimed], [5, woken]], 5) is None  # does not start with the request
    assert carried([[1, req], [5, {"t": "NoSuchEvent"}]], 5) is None
    assert carried([[1, req], [5]], 5) is None
    assert carried([], 5) is None
    assert carried([[1, req]], True) is None
    other = _body(ev.RunClaimed(run_id="other", worker_id="w1", attempt=1))
    assert carried([[1, req], [2, other]], 2) is None  # another run's event


async def test_publish_acks_and_errors_match_nats_py(settings: Settings) -> None:
    nc, js, names = await _connect(settings)
    try:
        subject = names.run_subject("pub", "ctl")
        body = ev.encode(ev.RunRequested(run_id="pub", workflow="w"))
        ack = await publish(nc, subject, body, headers={MSG_ID: "pub/1"})
        again = await publish(nc, subject, body, headers={MSG_ID: "pub/1"})
        assert again.seq == ack.seq and again.duplicate and not ack.duplicate
        fence = {
            EXPECTED_LAST_SUBJECT_SEQ: "0",
            EXPECTED_LAST_SUBJECT_SEQ_SUBJECT: names.run_filter("pub"),
        }
        with pytest.raises(nats.js.errors.APIError) as ours:
            await publish(nc, subject, body, headers=fence)
        with pytest.raises(nats.js.errors.APIError) as theirs:
            await js.publish(subject, body, headers=fence)
        assert type(ours.value) is type(theirs.value)
        assert ours.value.err_code == theirs.value.err_code == WRONG_LAST_SEQUENCE
        with pytest.raises(nats.js.errors.NoStreamResponseError):
            # A subject the worker may publish on that no stream holds: live deltas.
            await publish(nc, names.delta_subject(uuid.uuid4().hex, "s"), b"x", timeout=1)
        # Many at once on one connection: each answer reaches its own caller.
        acks = await asyncio.gather(
            *(publish(nc, names.run_subject(f"pub{i}", "step"), b"{}") for i in range(50))
        )
        assert len({a.seq for a in acks}) == 50
    finally:
        await nc.close()


async def thirty_steps(ctx: WorkflowContext, tag: str) -> int:
    total = 0
    for i in range(30):
        one: int = await ctx.step.run(f"s{i}", count, f"{tag}:s{i}")
        total += one
    return total


@workflow
async def hot_suspends(ctx: WorkflowContext, tag: str) -> int:
    total = await thirty_steps(ctx, tag)
    extra = await ctx.step.suspend("more")
    last: int = await ctx.step.run("last", count, f"{tag}:last")
    return total + int(extra.data["n"]) + last


async def _until_suspended(env: Any, run_id: str) -> None:
    for _ in range(500):
        state = await load_state(env.client.nc, Names(env.settings.prefix), run_id)
        if state.status == "suspended":
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"run {run_id} did not suspend")


async def test_a_resumed_run_is_claimed_from_its_task_by_a_worker_that_never_saw_it(
    env_factory: Any, settings: Settings
) -> None:
    env = await env_factory([hot_suspends])
    tag = uuid.uuid4().hex[:8]
    handle = await env.client.start(hot_suspends, tag)
    await _until_suspended(env, handle.run_id)
    await env.worker.stop()  # the worker that ran the first 30 steps is gone
    async with Worker([hot_suspends], settings=settings.worker) as other:
        await env.client.resume(handle.run_id, "more", {"n": 100})
        assert await handle.result(timeout=10) == 30 + 100 + 1
        # The orchestrator read the run to answer the resume and sent that history, with the
        # wake, in the task: the new worker replayed 30 steps without reading the log.
        assert other.history_reads == {"full": 0, "delta": 0, "none": 1, "snapshot": 0}
    assert all(RAN[f"{tag}:s{i}"] == 1 for i in range(30)) and RAN[f"{tag}:last"] == 1
    types = [type(e).__name__ for _, e in await env.client.history(handle.run_id)]
    assert types.count("RunClaimed") == 2 and types[-1] == "RunCompleted"


@workflow
async def hot_big_then_suspends(ctx: WorkflowContext, tag: str) -> int:
    big: str = await ctx.step.run("big", lambda: "x" * 40_000)
    await ctx.step.suspend("more")
    last: int = await ctx.step.run("last", count, f"{tag}:last")
    return len(big) + last


async def test_a_history_too_big_to_carry_is_read(env_factory: Any, settings: Settings) -> None:
    env = await env_factory([hot_big_then_suspends])
    tag = uuid.uuid4().hex[:8]
    handle = await env.client.start(hot_big_then_suspends, tag)
    await _until_suspended(env, handle.run_id)
    await env.worker.stop()
    async with Worker([hot_big_then_suspends], settings=settings.worker) as other:
        await env.client.resume(handle.run_id, "more")
        assert await handle.result(timeout=10) == 40_001
        assert other.history_reads == {"full": 1, "delta": 0, "none": 0, "snapshot": 0}


@workflow
async def hot_waits_for_event(ctx: WorkflowContext, tag: str) -> int:
    total = await thirty_steps(ctx, tag)
    got = await ctx.step.wait_for_event("ev", f"hot.{tag}")
    last: int = await ctx.step.run("last", count, f"{tag}:last")
    return total + int(got.data["n"]) + last


async def test_a_run_woken_on_the_worker_that_suspended_it_reads_only_the_wake(
    env_factory: Any,
) -> None:
    env = await env_factory([hot_suspends, hot_waits_for_event])
    tag = uuid.uuid4().hex[:8]
    handle = await env.client.start(hot_waits_for_event, tag)
    await _until_suspended(env, handle.run_id)
    await env.client.publish_event(f"hot.{tag}", {"n": 100})
    assert await handle.result(timeout=10) == 30 + 100 + 1
    # Claimed twice: first from the task (a new run), then after the event's wake (whose
    # waker did not read the run) from the state the worker kept, reading only the events
    # after it. Every step ran once.
    assert env.worker.history_reads == {"full": 0, "delta": 1, "none": 1, "snapshot": 0}
    assert all(RAN[f"{tag}:s{i}"] == 1 for i in range(30)) and RAN[f"{tag}:last"] == 1
    # A resume's task carries the history, which the worker takes over what it kept.
    tag2 = uuid.uuid4().hex[:8]
    handle = await env.client.start(hot_suspends, tag2)
    await _until_suspended(env, handle.run_id)
    await env.client.resume(handle.run_id, "more", {"n": 100})
    assert await handle.result(timeout=10) == 30 + 100 + 1
    assert env.worker.history_reads == {"full": 0, "delta": 1, "none": 3, "snapshot": 0}


async def test_a_wake_whose_waker_died_before_dispatching_is_dispatched_by_the_hook(
    env_factory: Any,
) -> None:
    from polos._private.run.wake import wake

    env = await env_factory([hot_suspends])
    names = Names(env.settings.prefix)
    tag = uuid.uuid4().hex[:8]
    handle = await env.client.start(hot_suspends, tag)
    await _until_suspended(env, handle.run_id)
    state = await load_state(env.client.nc, names, handle.run_id)
    # A waker in another process appends the wake and dies before it dispatches the task.
    woke = await wake(
        env.orchestrator.js,
        names,
        handle.run_id,
        "more",
        expected_seq=state.last_seq,
        reason="resumed",
        cause="test",
        kind="suspend",
        output={"data": {"n": 7}, "seq": 0},
        workflow="hot_suspends",
    )
    assert woke is not None
    # The orchestrator's control hook sees a RunWoken it did not dispatch and dispatches it.
    assert await handle.result(timeout=10) == 30 + 7 + 1
    assert env.orchestrator.dispatched(handle.run_id, woke.seq)  # by the hook, not the waker
    # A resume the orchestrator applied itself is remembered, so the hook does not repeat it.
    tag2 = uuid.uuid4().hex[:8]
    handle = await env.client.start(hot_suspends, tag2)
    await _until_suspended(env, handle.run_id)
    await env.client.resume(handle.run_id, "more", {"n": 1})
    assert await handle.result(timeout=10) == 30 + 1 + 1
    woken = [s for s, e in await env.client.history(handle.run_id) if isinstance(e, ev.RunWoken)]
    assert len(woken) == 1 and env.orchestrator.dispatched(handle.run_id, woken[0])


async def test_one_orchestrator_writes_a_runs_index_entry_one_event_at_a_time(
    env_factory: Any,
) -> None:
    env = await env_factory([])
    orch = env.orchestrator
    run_id = uuid.uuid4().hex
    events: list[tuple[int, ev.Event]] = [(1, ev.RunRequested(run_id=run_id, workflow="w"))]
    events += [
        (2 + i, ev.RunClaimed(run_id=run_id, worker_id=f"w{i}", attempt=i + 1)) for i in range(20)
    ]
    # All at once, as the control consumer hands them out: without the per-run lock most of
    # these would fail their compare-and-set against each other and read before writing again.
    await asyncio.gather(*(orch.index.update(run_id, seq, e) for seq, e in reversed(events)))
    assert orch.index_conflicts == 0
    assert orch.index._locks == {}  # the last handler of a run removes its lock
    entry = await orch.index.read(run_id)
    assert entry is not None
    # The request, folded last here, still gives the entry its workflow; the status is the
    # latest event's.
    assert (entry["seq"], entry["status"], entry["workflow"]) == (21, "running", "w")
    assert entry["worker_id"] == "w19"


async def test_a_task_publish_during_a_leader_election_is_retried(
    env_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The run exists as soon as RunRequested is stored, and nothing but this publish would put
    # its task out: giving up on it (or the command) would leave the run queued for ever.
    real = publish
    refused: list[str] = []

    async def no_leader_at_first(nc: Any, subject: str, payload: bytes, **kw: Any) -> Ack:
        if ".task." in subject and len(refused) < 6:
            refused.append(subject)
            raise nats.js.errors.NoStreamResponseError
        return await real(nc, subject, payload, **kw)

    monkeypatch.setattr(polos._private.store.task, "publish", no_leader_at_first)
    env = await env_factory([hot_two_steps])
    tag = uuid.uuid4().hex[:8]
    handle = await env.client.start(hot_two_steps, tag)
    assert await handle.result(timeout=10) == 2
    assert len(refused) == 6 and env.orchestrator.dead_lettered == 0
