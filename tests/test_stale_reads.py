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

from polos import history as ev
from polos._private.store import (
    Names,
    StaleRead,
    append,
    load_state_through,
)
from polos._private.store import read as store_read
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
        assert raised.value.run_id == "r3" and raised.value.got == first
        assert str(raised.value) == (
            f"run r3: the replica that answered holds its history up to seq {first}, "
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
