"""The re-walk of a run restored from a replay snapshot against the re-walk of the same history
folded from the log: the same outputs, the same step ids taken, the same refusals of changed
code, word for word. The snapshot's re-walk goes down the recorded keys while the code asks for
them in order (``RunExecution._streak``) and looks each step up otherwise; the test takes it
through both and the switch between them (the snapshot ends inside the run: steps after it are
folded on top, as a load does)."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest

from polos import history as ev
from polos._private.run.execution import RunExecution
from polos._private.store import snapshots
from polos.config import Settings
from polos.errors import NonDeterminismError
from polos.workflow import WorkflowContext
from tests.workflows.rewalk import Walk, one, rewalked, two

# What rewalked(Walk(steps=5)) records, in order: (step id, function).
RECORDED = [*((f"s{i}", one) for i in range(5)), ("d", one), ("d#2", two), ("g1", one)]
RECORDED += [("g2", two), ("s0#2", one)]
TOTAL = 5 + 1 + 2 + 1 + 1 + 2


def _history() -> list[tuple[int, ev.Event]]:
    history: list[tuple[int, ev.Event]] = [
        (1, ev.RunRequested(run_id="r", workflow="rewalked", input=Walk().model_dump())),
        (2, ev.RunClaimed(run_id="r", worker_id="w", attempt=1)),
    ]
    for key, fn in RECORDED:
        event = ev.StepCompleted(
            key=key, kind="run", name=fn.__qualname__, output=2 if fn is two else 1
        )
        history.append((len(history) + 1, event))
    return history


async def _state(source: str, upto: int) -> ev.RunState:
    """The run's state as a replay gets it: folded from the log, or from a snapshot taken at
    seq ``upto`` and the events after it."""
    history = _history()
    if source == "log":
        return ev.RunState.fold("r", history)
    head = [(seq, e) for seq, e in history if seq <= upto]
    value = await snapshots.encode(snapshots.capture(ev.RunState.fold("r", head), head[-1][1]))
    state = snapshots.restore(snapshots.decode("r", value))
    for seq, e in history[upto:]:
        state.apply(seq, e)
    return state


async def _walk(state: ev.RunState, job: Walk) -> tuple[Any, RunExecution]:
    exe = RunExecution(
        js=None,  # type: ignore[arg-type]
        nc=None,  # type: ignore[arg-type]
        names=None,  # type: ignore[arg-type]
        settings=Settings(),
        workflow=rewalked,
        state=state,
        worker_id="w",
    )
    try:
        out: Any = await rewalked(WorkflowContext(exe), job)
        exe.check_all_replayed()
    except NonDeterminismError as exc:
        out = exc
    return out, exe


# Snapshots ending before, inside and after the loop, and one covering the whole run.
UPTO = [3, 5, 7, 9, 12]


@pytest.mark.parametrize("upto", UPTO)
async def test_a_restored_run_re_walks_as_the_folded_one(upto: int) -> None:
    walked = {}
    for source in ("log", "snapshot"):
        out, exe = await _walk(await _state(source, upto), Walk())
        assert out == TOTAL, (source, out)
        assert exe.appends == 0 and not exe.is_replaying
        # The step ids the next uses of these keys would take: every use was counted.
        walked[source] = [exe.next_step_id(k) for k in ("s0", "s3", "d", "g1", "new")]
    assert walked["snapshot"] == walked["log"] == ["s0#3", "s3#2", "d#3", "g1#2", "new"]


@pytest.mark.parametrize("change", ["name", "skip", "extra"])
@pytest.mark.parametrize("upto", UPTO)
async def test_changed_code_is_refused_alike_from_a_snapshot(change: str, upto: int) -> None:
    got = {}
    for source in ("log", "snapshot"):
        with contextlib.suppress(TypeError, AttributeError):  # "extra" reaches a real append
            out, _ = await _walk(await _state(source, upto), Walk(change=change))
            got[source] = str(out)
    if change == "extra":
        # A new step after the whole history: no refusal, it would run (and append: here,
        # without a connection, it fails to, the same way from both).
        assert got == {}
        return
    assert got["snapshot"] == got["log"], got
    assert "changed incompatibly" in got["log"]


async def test_the_in_order_re_walk_takes_no_step_id_until_the_code_leaves_the_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # From a snapshot of the whole run, s0..s4 and d are asked for in their recorded order by
    # their own keys: none of them takes a step id (a lookup each); the second "d" (recorded as
    # d#2) leaves the order, and from there every step is looked up, as from the log.
    asked: list[str | None] = []
    step_id = RunExecution.step_id

    def counted(self: RunExecution, key: str | None, kind: str) -> str:
        asked.append(key)
        return step_id(self, key, kind)

    monkeypatch.setattr(RunExecution, "step_id", counted)
    for source, lookups in (
        ("log", [k for k, _ in RECORDED]),
        ("snapshot", ["d", "g1", "g2", "s0"]),
    ):
        asked.clear()
        out, exe = await _walk(await _state(source, 12), Walk())
        assert out == TOTAL
        ids = [k.split("#")[0] for k in lookups]
        assert asked == ids, (source, asked)
        # Restored steps stay rows: none was built into an event on the way.
        if source == "snapshot":
            assert all(type(dict.__getitem__(exe.state.steps, k)) is int for k, _ in RECORDED)
