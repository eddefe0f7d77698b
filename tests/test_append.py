"""Fenced appends: exactly one write per fact, even when an ack is lost."""

from __future__ import annotations

from typing import Any

import nats
import nats.errors
import pytest

from polos import history as ev
from polos._private import jetstream as jsl
from polos.config import Settings


class LosesFirstAck:
    """Wraps the real publish: the first publish is stored by the server but its ack is lost,
    the fault the message id and the fence together must absorb."""

    def __init__(self) -> None:
        self._real = jsl.publish
        self.publishes = 0

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.publishes += 1
        ack = await self._real(*args, **kwargs)
        if self.publishes == 1:
            raise nats.errors.TimeoutError
        return ack


async def _requested(settings: Settings, run: str) -> tuple[Any, Any, jsl.Names, int]:
    """A worker's connection, and a run whose history is its RunRequested (at the returned
    sequence)."""
    nc = await nats.connect(settings.worker.nats_url)
    js = nc.jetstream()
    names = jsl.Names(settings.prefix)
    first = await jsl.append(js, names, run, ev.RunRequested(run_id=run, workflow="w"),
                             expected_last_seq=0, msg_id=f"{run}/req")
    return nc, js, names, first


async def test_a_retried_append_whose_ack_was_lost_is_written_once(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = "lost-ack"
    nc, js, names, first = await _requested(settings, run)
    flaky = LosesFirstAck()
    step = ev.StepCompleted(key="charge", kind="run", output={"id": 1})
    with monkeypatch.context() as patch:
        patch.setattr(jsl, "publish", flaky)
        seq = await jsl.append(js, names, run, step, expected_last_seq=first,
                               msg_id=f"{run}/s/charge")
    assert flaky.publishes == 2
    history = await jsl.read_history(nc, names, run)
    assert [s for s, _ in history] == [first, seq]  # stored once, and the retry knows where
    # Another writer's append of the same fact (other bytes) is still fenced out.
    with pytest.raises(jsl.FencedOut):
        await jsl.append(js, names, run, ev.StepCompleted(key="charge", kind="run", output=2),
                         expected_last_seq=first, msg_id=f"{run}/s/charge")
    await nc.close()


async def test_a_duplicate_ack_for_another_writers_record_is_fenced_out(settings: Settings) -> None:
    # A clustered stream's leader answers a known message id before it checks the fence, so
    # an execution working from stale state (a task redelivered after its run moved on) gets
    # "duplicate" for every record an earlier execution wrote. A single server checks the
    # fence first; a fence that happens to match shows the same answer here.
    run = "dup-ack"
    nc, js, names, first = await _requested(settings, run)
    charged = await jsl.append(js, names, run, ev.StepCompleted(key="charge", kind="run", output=1),
                               expected_last_seq=first, msg_id=f"{run}/s/charge")
    raw = await jsl.publish(nc, names.run_subject(run, "step"),
                            ev.encode(ev.StepCompleted(key="charge", kind="run", output=2)),
                            headers={jsl.MSG_ID: f"{run}/s/charge",
                                     jsl.EXPECTED_LAST_SUBJECT_SEQ: str(charged),
                                     jsl.EXPECTED_LAST_SUBJECT_SEQ_SUBJECT: names.run_filter(run)})
    assert raw.duplicate and raw.seq == charged  # what the server answers
    with pytest.raises(jsl.FencedOut):
        await jsl.append(js, names, run, ev.StepCompleted(key="charge", kind="run", output=2),
                         expected_last_seq=charged, msg_id=f"{run}/s/charge")
    assert [s for s, _ in await jsl.read_history(nc, names, run)] == [first, charged]
    await nc.close()
