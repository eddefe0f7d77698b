"""The event model: immutable, encoded losslessly, folded in order or not at all."""

from __future__ import annotations

import dataclasses

import pytest

from polos import history as ev


def test_events_are_immutable_and_round_trip() -> None:
    e = ev.StepCompleted(key="charge", kind="run", name="charge_stripe", output={"id": "p1"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        e.key = "other"  # type: ignore[misc]
    back = ev.decode(ev.encode(e))
    assert back == e and type(back) is ev.StepCompleted


def test_fold_builds_state_and_refuses_out_of_order_events() -> None:
    history: list[tuple[int, ev.Event]] = [
        (3, ev.RunRequested(run_id="r", workflow="wf", input=1)),
        (7, ev.RunClaimed(run_id="r", worker_id="w", attempt=1)),
        (9, ev.StepCompleted(key="a", kind="run", output=2)),
        (12, ev.RunCompleted(run_id="r", output=3)),
    ]
    state = ev.RunState.fold("r", history)
    assert (state.status, state.last_seq, state.attempt, state.output) == ("completed", 12, 1, 3)
    assert state.step_order == ["a"] and state.done
    with pytest.raises(ev.SequenceError):
        state.apply(11, ev.RunFailed(run_id="r", error={}))


@pytest.mark.parametrize("data", [b"", b"{", b"[]", b'{"t": "Nope"}', b'{"t": "RunClaimed"}'])
def test_garbage_is_not_an_event(data: bytes) -> None:
    with pytest.raises(ev.EventDecodeError):
        ev.decode(data)


def test_every_event_is_past_tense_and_registered() -> None:
    names = [
        n
        for n in ev.__all__
        if isinstance(getattr(ev, n), type)
        and issubclass(getattr(ev, n), ev.Event)
        and getattr(ev, n) is not ev.Event
    ]
    for name in names:
        assert name.endswith(("ed", "Failed", "Woken")), name
        assert ev.decode(ev.encode(_sample(getattr(ev, name)))).__class__.__name__ == name


def _sample(cls: type[ev.Event]) -> ev.Event:
    kwargs: dict[str, object] = {}
    for f in dataclasses.fields(cls):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            kwargs[f.name] = (
                {}
                if "error" in f.name
                else (1 if f.name in ("attempt",) else 0.5 if f.name == "retry_in" else "x")
            )
    return cls(**kwargs)
