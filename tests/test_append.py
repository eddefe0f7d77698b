"""Fenced appends: exactly one write per fact, even when an ack is lost."""

from __future__ import annotations

from typing import Any

import nats
import nats.errors
import pytest

from polos import history as ev
from polos._private.store import (
    EXPECTED_LAST_SUBJECT_SEQ,
    EXPECTED_LAST_SUBJECT_SEQ_SUBJECT,
    MSG_ID,
    FencedOut,
    Names,
    append,
    publish,
    read_history,
)
from polos._private.store import appends as store_append
from polos.config import Settings


class LosesFirstAck:
    """Wraps the real publish: the first publish is stored by the server but its ack is lost,
    the fault the message id and the fence together must absorb."""

    def __init__(self) -> None:
        self._real = publish
        self.publishes = 0

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.publishes += 1
        ack = await self._real(*args, **kwargs)
        if self.publishes == 1:
            raise nats.errors.TimeoutError
        return ack


async def _requested(settings: Settings, run: str) -> tuple[Any, Any, Names, int]:
    """A worker's connection, and a run whose history is its RunRequested (at the returned
    sequence)."""
    nc = await nats.connect(settings.worker.nats_url)
    js = nc.jetstream()
    names = Names(settings.prefix)
    first = await append(
        js,
        names,
        run,
        ev.RunRequested(run_id=run, workflow="w"),
        expected_last_seq=0,
        msg_id=f"{run}/req",
    )
    return nc, js, names, first


async def test_a_retried_append_whose_ack_was_lost_is_written_once(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = "lost-ack"
    nc, js, names, first = await _requested(settings, run)
    flaky = LosesFirstAck()
    step = ev.StepCompleted(key="charge", kind="run", output={"id": 1})
    with monkeypatch.context() as patch:
        patch.setattr(store_append, "publish", flaky)
        seq = await append(js, names, run, step, expected_last_seq=first, msg_id=f"{run}/s/charge")
    assert flaky.publishes == 2
    history = await read_history(nc, names, run)
    assert [s for s, _ in history] == [first, seq]  # stored once, and the retry knows where
    # Another writer's append of the same fact (other bytes) is still fenced out.
    with pytest.raises(FencedOut):
        await append(
            js,
            names,
            run,
            ev.StepCompleted(key="charge", kind="run", output=2),
            expected_last_seq=first,
            msg_id=f"{run}/s/charge",
        )
    await nc.close()


async def test_a_duplicate_ack_for_another_writers_record_is_fenced_out(settings: Settings) -> None:
    # A clustered stream's leader answers a known message id before it checks the fence, so
    # an execution working from stale state (a task redelivered after its run moved on) gets
    # "duplicate" for every record an earlier execution wrote. A single server checks the
    # fence first; a fence that happens to match shows the same answer here.
    run = "dup-ack"
    nc, js, names, first = await _requested(settings, run)
    charged = await append(
        js,
        names,
        run,
        ev.StepCompleted(key="charge", kind="run", output=1),
        expected_last_seq=first,
        msg_id=f"{run}/s/charge",
    )
    raw = await publish(
        nc,
        names.run_subject(run, "step"),
        ev.encode(ev.StepCompleted(key="charge", kind="run", output=2)),
        headers={
            MSG_ID: f"{run}/s/charge",
            EXPECTED_LAST_SUBJECT_SEQ: str(charged),
            EXPECTED_LAST_SUBJECT_SEQ_SUBJECT: names.run_filter(run),
        },
    )
    assert raw.duplicate and raw.seq == charged  # what the server answers
    with pytest.raises(FencedOut):
        await append(
            js,
            names,
            run,
            ev.StepCompleted(key="charge", kind="run", output=2),
            expected_last_seq=charged,
            msg_id=f"{run}/s/charge",
        )
    assert [s for s, _ in await read_history(nc, names, run)] == [first, charged]
    await nc.close()
