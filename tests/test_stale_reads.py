"""Reads that must reach a known event (a cluster's replicas answer reads and lag the leader).

A replica behind the leader looks, to its reader, like a stream that does not hold the event
yet: these tests ask a real server for a sequence it does not hold (yet, or any more) and check
that such an answer is read again, never taken as the run's state, and that a control event
whose hook cannot read through it is redelivered and finally dead-lettered, never dropped.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import nats
import orjson
import pytest

from polos import WorkflowContext, workflow
from polos import history as ev
from polos import worker as worker_module
from polos._private.run.wake import first_event_after, wake
from polos._private.store import (
    Names,
    StaleRead,
    append,
    kv_entries,
    leader_last,
    leader_next,
    load_state_through,
    read_subject_through,
)
from polos._private.store import read as store_read
from polos._private.store.namespace import connection
from polos._private.store.task import encode_task, publish_task
from polos._private.store.tokens import event_subject, parse_time
from polos.testing import RoleSettings
from polos_services.orchestrator import orchestrator as orchestrator_module


async def _requested(nc: Any, names: Names, run: str) -> int:
    return await append(
        nc.jetstream(),
        names,
        run,
        ev.RunRequested(run_id=run, workflow="w"),
        expected_last_seq=0,
        msg_id=f"{run}/req",
    )


async def test_a_read_through_a_held_sequence_returns_at_once(settings: RoleSettings) -> None:
    nc = await nats.connect(settings.worker.nats_url)
    names = Names(settings.prefix)
    try:
        first = await _requested(nc, names, "r1")
        state = await load_state_through(nc, names, "r1", first)
        assert state.last_seq == first and state.requested is not None
        assert (await load_state_through(nc, names, "r1", 1)).last_seq == first
    finally:
        await nc.close()


async def test_a_read_through_a_later_sequence_reads_again_until_it_is_there(
    settings: RoleSettings,
) -> None:
    nc = await nats.connect(settings.worker.nats_url)
    names = Names(settings.prefix)
    try:
        first = await _requested(nc, names, "r2")
        # Asked for more than the stream holds, as a reader of a lagging replica would be: the
        # claim appended while it waits is what it returns.
        reading = asyncio.ensure_future(load_state_through(nc, names, "r2", first + 1))
        await asyncio.sleep(0.01)
        assert not reading.done()
        claim = await append(
            nc.jetstream(),
            names,
            "r2",
            ev.RunClaimed(run_id="r2", worker_id="w1", attempt=1),
            expected_last_seq=first,
            msg_id="r2/c/1/w1",
        )
        state = await reading
        assert state.last_seq == claim and state.status == "running"
    finally:
        await nc.close()


async def test_a_read_that_never_reaches_its_sequence_raises_stale_read(
    settings: RoleSettings,
) -> None:
    nc = await nats.connect(settings.worker.nats_url)
    names = Names(settings.prefix)
    try:
        first = await _requested(nc, names, "r3")
        t0 = time.monotonic()
        with pytest.raises(StaleRead) as raised:
            await load_state_through(nc, names, "r3", first + 1000)
        waited = time.monotonic() - t0
        assert raised.value.what == "run r3's history" and raised.value.got == first
        assert str(raised.value) == (
            f"run r3's history: the replica that answered holds it up to seq {first}, "
            f"not yet seq {first + 1000}"
        )
        # It read again over the pauses, and no longer.
        assert waited >= sum(store_read.STALE_RETRIES)
        # A run known to have ended (the index says so) is read until its end shows.
        with pytest.raises(StaleRead):
            await load_state_through(nc, names, "r3", 1, ended=True)
        await append(
            nc.jetstream(),
            names,
            "r3",
            ev.RunCompleted(run_id="r3", output=1),
            expected_last_seq=first,
            msg_id="r3/end",
        )
        assert (await load_state_through(nc, names, "r3", 1, ended=True)).status == "completed"
    finally:
        await nc.close()


async def test_a_control_event_whose_hook_never_reads_through_it_is_dead_lettered(
    env_factory: Any, settings: RoleSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Children's ends delivered, then their histories cut before the hook reads them: the
    hook's read never reaches the event, as when a replica stays behind. The event is nak'd for
    a later delivery, and once it has been delivered ``_STALE_REDELIVERIES`` times it is kept in
    the dead letters with why and acknowledged, not retried for ever."""
    env = await env_factory(with_worker=False)
    orch = env.orchestrator
    # Its own consumer of control events stopped: this test delivers the events itself.
    [ctl_loop] = [loop for loop in orch._loops if loop._name == "orchestrator_ctl"]
    await ctl_loop.stop()
    names = Names(settings.prefix)
    nc = await nats.connect(settings.service.nats_url)
    try:
        js = nc.jetstream()
        ends: dict[str, int] = {}
        for run in ("gone1", "gone2"):
            first = await _requested(nc, names, run)
            ends[run] = await append(
                js,
                names,
                run,
                ev.RunCompleted(run_id=run, output=None),
                expected_last_seq=first,
                msg_id=f"{run}/end",
            )
        # The events as a consumer delivers them, on a probe consumer of the control events.
        sub = await js.pull_subscribe(names.ctl_filter, durable="probe", stream=names.runs_stream)
        delivered = await sub.fetch(4, timeout=2)
        for run in ends:
            await js.purge_stream(names.runs_stream, subject=names.run_subject(run, "ctl"))
        by_seq = {m.metadata.sequence.stream: m for m in delivered}
        before = orch.dead_lettered
        await orch._on_control(by_seq[ends["gone1"]])  # nak'd: read again when redelivered
        assert orch.dead_lettered == before
        monkeypatch.setattr(orchestrator_module, "_STALE_REDELIVERIES", 1)
        await orch._on_control(by_seq[ends["gone2"]])  # delivered as often as it may be
        assert orch.dead_lettered == before + 1
        letters = [
            d
            for d in await env.client.dead_letters()
            if d.get("subject") in {names.run_subject(r, "ctl") for r in ends}
        ]
        assert [d["subject"] for d in letters] == [names.run_subject("gone2", "ctl")]
        assert letters[0]["source"] == "ctl"
        assert "its hook's reads never reached it" in letters[0]["reason"]
        assert f"not yet seq {ends['gone2']}" in letters[0]["reason"]
        assert orjson.loads(letters[0]["data"])["t"] == "RunCompleted"
    finally:
        await nc.close()


# --------------------------------------------------------------------------- the leader's view
#
# A read that decides on a message being absent, with no delivered sequence to read through (no
# resume pending, no child request, no waiter, no event yet), asks the stream's leader for its
# last message and reads through that. On one server the leader is the only replica; what these
# tests pin is what each read returns and that a read behind a known message is never taken.


@pytest.mark.parametrize("replicated", [False, True], ids=["one-replica", "replicated"])
async def test_the_leader_answers_last_next_and_none(
    settings: RoleSettings, replicated: bool
) -> None:
    """A stream with one replica is read by direct get (its one copy is the leader); one with
    more by ``STREAM.MSG.GET``, here asked of this server as if it had replicas: same answers."""
    nc = await nats.connect(settings.service.nats_url)
    names = Names(settings.prefix)
    try:
        assert await store_read._replicated(nc, names.runs_stream, 5.0) is False
        if replicated:
            connection(nc).replicas[names.runs_stream] = (True, time.monotonic())
        run = "l1r" if replicated else "l1"
        first = await _requested(nc, names, run)
        claim = await append(
            nc.jetstream(),
            names,
            run,
            ev.RunClaimed(run_id=run, worker_id="w1", attempt=1),
            expected_last_seq=first,
            msg_id=f"{run}/c/1/w1",
        )
        ctl = names.run_subject(run, "ctl")
        last = await leader_last(nc, names.runs_stream, ctl)
        assert last is not None and last.seq == claim and last.subject == ctl
        assert isinstance(ev.decode(last.data), ev.RunClaimed)
        assert last.headers is not None and last.headers["Nats-Msg-Id"] == f"{run}/c/1/w1"
        assert last.time is not None and last.time.endswith("Z")
        # A wildcard filter, and the first message from a sequence on.
        wild = await leader_last(nc, names.runs_stream, names.run_filter(run))
        assert wild is not None and wild.seq == claim
        nxt = await leader_next(nc, names.runs_stream, ctl, first + 1)
        assert nxt is not None and nxt.seq == claim
        assert await leader_next(nc, names.runs_stream, ctl, claim + 1) is None
        assert await leader_last(nc, names.runs_stream, names.run_subject("l0", "ctl")) is None
    finally:
        await nc.close()


async def test_reads_waiting_on_a_streams_replica_count_share_one_lookup(
    settings: RoleSettings,
) -> None:
    """The replica count is looked up every ``REPLICAS_TTL``: the leader reads in flight when
    it expires share one ``STREAM.INFO`` (the server's costliest read) instead of one each."""
    nc = await nats.connect(settings.worker.nats_url)
    names = Names(settings.prefix)
    try:
        first = await _requested(nc, names, "l2")
        ctl = names.run_subject("l2", "ctl")
        conn = connection(nc)
        before = conn.replica_lookups.fetches
        got = await asyncio.gather(*(leader_last(nc, names.runs_stream, ctl) for _ in range(100)))
        assert {m.seq for m in got if m is not None} == {first} and None not in got
        assert conn.replica_lookups.fetches == before + 1
        conn.replicas.pop(names.runs_stream)  # expired
        await asyncio.gather(*(leader_last(nc, names.runs_stream, ctl) for _ in range(100)))
        assert conn.replica_lookups.fetches == before + 2 and not len(conn.replica_lookups)
    finally:
        await nc.close()


async def test_a_read_through_the_leaders_last_is_read_again_until_it_holds_it(
    settings: RoleSettings,
) -> None:
    nc = await nats.connect(settings.service.nats_url)
    names = Names(settings.prefix)
    try:
        first = await _requested(nc, names, "l2")
        ctl = names.run_subject("l2", "ctl")
        got = await read_subject_through(nc, names.runs_stream, ctl, first)
        assert [m.seq for m in got] == [first]
        assert (
            await read_subject_through(nc, names.runs_stream, names.run_subject("l9", "ctl"), 0)
            == []
        )
        # Its first `limit` messages are all a limited read needs, wherever the leader is.
        assert len(await read_subject_through(nc, names.runs_stream, ctl, first + 50, limit=1)) == 1
        with pytest.raises(StaleRead) as raised:
            await read_subject_through(nc, names.runs_stream, ctl, first + 50)
        assert str(raised.value) == (
            f"{names.runs_stream} {ctl}: the replica that answered holds it up to seq {first}, "
            f"not yet seq {first + 50}"
        )
    finally:
        await nc.close()


async def test_a_wait_for_an_event_reads_through_the_event_it_knows_of(
    settings: RoleSettings,
) -> None:
    nc = await nats.connect(settings.service.nats_url)
    names = Names(settings.prefix)
    try:
        ack = await nc.jetstream().publish(
            event_subject(names, "orders.paid"), orjson.dumps({"order": 7})
        )
        stored = await leader_last(nc, names.events_stream, event_subject(names, "orders.paid"))
        assert stored is not None and stored.seq == ack.seq
        at = parse_time(stored.time)
        found = await first_event_after(nc, names, "orders.paid", 0, None, through=(ack.seq, at))
        assert found is not None and found["seq"] == ack.seq and found["data"] == {"order": 7}
        # The known event is the cursor, or older than the wait: nothing to wait for, at once.
        t0 = time.monotonic()
        assert (
            await first_event_after(nc, names, "orders.paid", ack.seq, None, through=(ack.seq, at))
            is None
        )
        assert (
            await first_event_after(nc, names, "orders.paid", 0, at + 60, through=(ack.seq, at))
            is None
        )
        assert time.monotonic() - t0 < sum(store_read.STALE_RETRIES)
        # An event known stored that the read does not reach: read again, then StaleRead.
        with pytest.raises(StaleRead) as raised:
            await first_event_after(
                nc, names, "orders.paid", ack.seq, None, through=(ack.seq + 5, at)
            )
        assert str(raised.value) == (
            f"events on 'orders.paid': the replica that answered holds it up to seq {ack.seq}, "
            f"not yet seq {ack.seq + 5}"
        )
    finally:
        await nc.close()


async def test_a_current_listing_of_waiters_holds_the_buckets_last_write(
    settings: RoleSettings,
) -> None:
    nc = await nats.connect(settings.service.nats_url)
    names = Names(settings.prefix)
    try:
        kv = await nc.jetstream().key_value(names.waits_bucket)
        await kv.put("t1.r1", b'{"run_id": "r1"}')
        rev = await kv.put("t1.r2", b'{"run_id": "r2"}')
        await kv.delete("t1.r1")
        listed = await kv_entries(nc, names.waits_bucket, "t1.*", current=True)
        assert [(e.key, e.revision) for e in listed] == [("t1.r2", rev)]
        # The bucket's last write to those keys is a delete: the listing reaches it, empty.
        await kv.delete("t1.r2")
        t0 = time.monotonic()
        assert await kv_entries(nc, names.waits_bucket, "t1.*", current=True) == []
        assert await kv_entries(nc, names.waits_bucket, "t9.*", current=True) == []
        assert time.monotonic() - t0 < sum(store_read.STALE_RETRIES)
    finally:
        await nc.close()


# --------------------------------------------------------------------------- a worker's read
#
# A task is put out once the event it is for (its cause: a request, a wake, an admission) is
# stored, and says which. A worker whose read of the run does not hold that event read a
# replica behind the leader; it must not take a woken run for a suspended one and drop the
# task. Here the task names a cause the stream does not hold yet, as that replica would look.

AFTER: dict[str, int] = {}


@workflow(name="sr_wait")
async def sr_wait(ctx: WorkflowContext) -> int:
    got = await ctx.step.suspend("go")

    def count() -> int:
        AFTER[ctx.run_id] = AFTER.get(ctx.run_id, 0) + 1
        return int(got.data["n"])

    return await ctx.step.run("after", count)


async def _suspended(env: Any, run_id: str) -> int:
    names = env.client.names
    for _ in range(500):
        state = await load_state_through(env.client.nc, names, run_id, 1)
        if state.status == "suspended":
            return state.last_seq
        await asyncio.sleep(0.01)
    raise AssertionError(f"run {run_id} never suspended")


async def _put_task(env: Any, run_id: str, cause: int) -> None:
    names = env.client.names
    await publish_task(
        env.orchestrator.nc,
        names,
        run_id,
        "sr_wait",
        cause,
        encode_task(run_id, "sr_wait", cause=cause),
        timeout=5.0,
    )


async def test_a_task_whose_cause_the_read_lacks_waits_for_it(env_factory: Any) -> None:
    """The task for a wake not yet readable: handed back, not dropped; once the wake is there,
    the run goes on, its next step run once."""
    env = await env_factory([sr_wait])
    h = await env.client.start(sr_wait, run_id="srw1")
    sus = await _suspended(env, "srw1")
    # Put out first, under the message id the wake's own dispatch will have: that one is then
    # the stream's duplicate, and only this task can run the run.
    await _put_task(env, "srw1", sus + 1)
    await asyncio.sleep(0.4)  # past the worker's re-reads: the task was handed back
    assert (await env.client.get("srw1")).status == "suspended"
    woke = await wake(
        env.orchestrator.js,
        env.client.names,
        "srw1",
        "go",
        expected_seq=sus,
        reason="resumed",
        cause="test",
        kind="suspend",
        output={"data": {"n": 5}, "seq": 0, "at": time.time()},
        workflow="sr_wait",
    )
    assert woke is not None and woke.seq == sus + 1
    assert await h.result(timeout=20) == 5
    assert AFTER["srw1"] == 1


async def test_a_task_whose_cause_never_comes_is_dead_lettered(
    env_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker_module, "STALE_TASK_DELIVERIES", 2)
    env = await env_factory([sr_wait])
    await env.client.start(sr_wait, run_id="srw2")
    sus = await _suspended(env, "srw2")
    await _put_task(env, "srw2", sus + 1000)
    letters: list[dict[str, Any]] = []
    for _ in range(300):
        letters = [d for d in await env.client.dead_letters() if d.get("source") == "task"]
        if letters:
            break
        await asyncio.sleep(0.05)
    assert len(letters) == 1
    assert letters[0]["reason"] == (
        "its run's history never reached the task's cause: run srw2's history: the replica "
        f"that answered holds it up to seq {sus}, not yet seq {sus + 1000}"
    )
    assert orjson.loads(letters[0]["data"])["cause"] == sus + 1000
    # Kept aside, not taken for the run's state: the run still waits for its resume.
    assert (await env.client.get("srw2")).status == "suspended"
