"""Dry replay: would this run's history still replay on new workflow code? (``polos check-deploy``)

A dry execution is a ``RunExecution`` that may read but never write: it walks the recorded steps
exactly as a worker's replay does (the same key, kind and function-name checks), and stops at
the first step the history does not hold, before that step's code runs. A run that reaches that
point is compatible: what comes next is new work, which any code may do. A run whose code asks
for something else where the history holds a step, or returns before reaching a recorded step,
would fail with ``NonDeterminismError`` once a worker with the new code picks it up.

A suspended run also waits at a step that is not recorded yet (its ``suspend``, event wait, timer,
child): when it is woken, that step joins the history under its key, so the new code must reach
exactly that step first.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from polos import history as ev
from polos._private.run.execution import RunExecution
from polos.errors import NonDeterminismError

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS
    from nats.js import JetStreamContext

    from polos._private.model.values import WorkflowDefinition
    from polos._private.store import Names
    from polos.config import Settings

# The step kind a woken wait is recorded as, by what the run waits for (``RunSuspended.kind``).
# A retry back-off re-runs its ``run`` step; a rate wait at an LLM step re-runs that step. A
# run waiting for admission (a slot, a queue's rate) waits before its code, at no step.
_PENDING_KIND: dict[str, str] = {
    "suspend": "suspend",
    "event": "event",
    "sleep": "sleep",
    "child": "child",
    "retry": "run",
    "rate": "llm",
}


class _Frontier(BaseException):
    """The replay reached the end of the history: stop the workflow's code right here.

    A BaseException, as ``Suspend`` is, so that a workflow's ``except Exception`` cannot go on
    past it."""


@dataclass(frozen=True)
class Verdict:
    """What a dry replay of one run found. ``ok`` False: the run would fail on the new code;
    ``step`` is where, ``recorded`` what its history holds there, ``new`` what the code asks."""

    run_id: str
    workflow: str
    status: str
    ok: bool
    reason: str
    step: str | None = None
    recorded: str | None = None
    new: str | None = None
    replayed: int = 0


def _describe(
    step: ev.StepCompleted | ev.StepFailed | None, pending: tuple[str, str] | None = None
) -> str:
    if step is not None:
        return f"{step.kind} {step.key!r}" + (f" ({step.name})" if step.name else "")
    if pending is not None:
        return f"{pending[1]} {pending[0]!r} (waiting there)"
    return "-"


class DryExecution(RunExecution):
    """A ``RunExecution`` that replays and never appends (see the module's docstring)."""

    def __init__(self, *, pending: tuple[str, str] | None = None, **kw: Any) -> None:
        super().__init__(**kw)
        self.pending = pending
        self.kinds: dict[str, str] = {}
        self.found: tuple[str, str, str, str] | None = None  # step, recorded, new, why
        self.frontier: str | None = None

    @property
    def is_replaying(self) -> bool:
        # The step the run waits at belongs to its history once it is woken, so code before it
        # is still replaying (``ctx.patched`` there answers False, as it will on the worker).
        return super().is_replaying or self.pending is not None

    def step_id(self, key: str | None, kind: str) -> str:
        step_id = super().step_id(key, kind)
        self.kinds[step_id] = kind
        return step_id

    def _diverged(self, step: str, recorded: str, new: str, exc: NonDeterminismError) -> None:
        if self.found is None:  # the first divergence is the one a worker would fail on
            self.found = (step, recorded, new, str(exc).removeprefix(f"run {self.run_id}: "))

    def recorded(
        self, step_id: str, kind: str, name: str | None
    ) -> ev.StepCompleted | ev.StepFailed | None:
        try:
            return super().recorded(step_id, kind, name)
        except NonDeterminismError as exc:
            new = f"{kind} {step_id!r}" + (f" ({name})" if name else "")
            self._diverged(step_id, _describe(self.state.steps.get(step_id)), new, exc)
            raise

    def _unreached(self) -> str | None:
        return next((k for k in self._replay_keys if k in self._unconsumed), None)

    async def check_new_step(self, step_id: str) -> None:
        kind = self.kinds.get(step_id, "?")
        new = f"{kind} {step_id!r}"
        try:
            await super().check_new_step(step_id)
        except NonDeterminismError as exc:
            missing = self._unreached() or "?"
            self._diverged(missing, _describe(self.state.steps.get(missing)), new, exc)
            raise
        if self.pending is not None and self.pending != (step_id, kind):
            where, waits = self.pending
            waits_err = NonDeterminismError(
                f"run {self.run_id}: the run waits at {waits} step {where!r} but the code now "
                f"asks for {kind} step {step_id!r} there - the workflow code changed "
                "incompatibly since this run started"
            )
            self._diverged(where, _describe(None, self.pending), new, waits_err)
            raise waits_err
        self.frontier = step_id
        raise _Frontier(step_id)

    def check_all_replayed(self) -> None:
        end = "the end of the workflow"
        try:
            super().check_all_replayed()
        except NonDeterminismError as exc:
            missing = self._unreached() or "?"
            self._diverged(missing, _describe(self.state.steps.get(missing)), end, exc)
            raise
        if self.pending is not None:
            where, waits = self.pending
            end_err = NonDeterminismError(
                f"run {self.run_id}: the workflow returned without reaching {waits} step "
                f"{where!r}, where the run waits - the workflow code changed incompatibly "
                "since this run started"
            )
            self._diverged(where, _describe(None, self.pending), end, end_err)
            raise end_err

    async def record(self, event: ev.Event, msg_id: str) -> int:
        # Every write of an execution goes through here: one means the code went past the
        # history (``ctx.patched`` on new ground records its marker), so replay ends here.
        self.frontier = getattr(event, "key", None) or type(event).__name__
        raise _Frontier(self.frontier)


def pending_step(state: ev.RunState) -> tuple[str, str] | None:
    """The step a suspended run waits at, and the kind it will be recorded as when woken."""
    sus = state.suspended
    if sus is None or state.status != "suspended" or sus.step == "admission":
        return None
    kind = _PENDING_KIND.get(sus.kind)
    return (sus.step, kind) if kind is not None else None


async def dry_replay(
    *,
    js: JetStreamContext,
    nc: NATS,
    names: Names,
    settings: Settings,
    workflow: WorkflowDefinition[Any, Any],
    state: ev.RunState,
    invoke: Callable[[RunExecution], Awaitable[Any]],
    timeout: float = 30.0,
) -> Verdict:
    """Replay ``state`` (a run's folded history) on ``workflow`` without running a step or
    appending anything. ``invoke(execution)`` runs the workflow's code on the execution (the
    caller builds the context and decodes the input, as a worker does)."""
    exe = DryExecution(
        js=js,
        nc=nc,
        names=names,
        settings=settings,
        workflow=workflow,
        state=state,
        worker_id="check-deploy",
        pending=pending_step(state),
    )

    def verdict(ok: bool, reason: str, **found: Any) -> Verdict:
        return Verdict(
            run_id=state.run_id,
            workflow=workflow.name,
            status=state.status,
            ok=ok,
            reason=reason,
            **found,
        )

    async def body() -> None:
        await invoke(exe)
        exe.check_all_replayed()

    try:
        await asyncio.wait_for(body(), timeout)
    except _Frontier:
        pass
    except NonDeterminismError as exc:
        if exe.found is None:
            return verdict(False, str(exc).removeprefix(f"run {state.run_id}: "))
        # The first divergence is the one to report: a later one may only follow from it (code
        # that caught the first went on).
        step, recorded, new, why = exe.found
        return verdict(False, why, step=step, recorded=recorded, new=new)
    except TimeoutError:
        return verdict(
            False,
            f"the replay did not reach the end of its history within {timeout:g}s "
            "(code outside steps that waits on something?)",
            replayed=len(state.step_order) - len(exe._unconsumed),
        )
    except Exception as exc:
        # Not a determinism failure, but the run would fail on the new code all the same.
        return verdict(False, f"{type(exc).__name__}: {exc}")
    if exe.found is not None:
        # The code caught the NonDeterminismError and went on: its history and its code
        # disagree all the same, which is not a safe deploy.
        step, recorded, new, why = exe.found
        return verdict(
            False,
            f"{why} (the code caught the NonDeterminismError)",
            step=step,
            recorded=recorded,
            new=new,
        )
    replayed = len(state.step_order) - len(exe._unconsumed)
    where = f"stops before new step {exe.frontier!r}" if exe.frontier else "returns"
    return verdict(
        True,
        f"replays {replayed} recorded step(s), then {where}",
        replayed=replayed,
    )


__all__ = ["DryExecution", "Verdict", "dry_replay", "pending_step"]
