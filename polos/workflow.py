"""Inside a workflow: the ``@workflow`` decorator, ``WorkflowContext`` and its durable steps.

``WorkflowContext`` and ``Step`` are the workflow's point of view over the run runtime
(``polos._private.run``); the decorator and the value types are defined below the runtime and
re-exported here.

A workflow is a plain ``async def (ctx, input) -> output``. Everything with a side effect or a
non-deterministic value goes through ``ctx.step``, which records the outcome in the run's
history the first time and returns the recorded outcome on every replay.
"""

from __future__ import annotations

import random as _random
import time
import typing
import uuid as _uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from polos._private.agents.loop import invoke_agent
from polos._private.model.values import (
    DEFAULT_STEP_RETRY,
    NO_RETRY,
    BatchEventPayload,
    BatchStepResult,
    BatchWorkflowInput,
    EventItem,
    EventPayload,
    RetryPolicy,
    SchedulePayload,
    StepInfo,
    WorkflowDefinition,
    WorkflowState,
)
from polos._private.run import waits as waiting
from polos._private.run.definitions import (
    get_all_workflows,
    get_workflow,
    registered_workflows,
    workflow,
)

if TYPE_CHECKING:
    from collections.abc import Iterable
    from datetime import timedelta

    from polos._private.agents.loop import AgentResult, AgentRun
    from polos._private.run.execution import RunExecution
    from polos._private.run.waits import ChildHandle, ReceivedEvent, Resumed

P = ParamSpec("P")
T = TypeVar("T")


class Step:
    """The durable operations of a run. Reached as ``ctx.step``."""

    def __init__(self, execution: RunExecution) -> None:
        self._x = execution

    async def run(
        self,
        key: str,
        fn: Callable[..., Awaitable[T]] | Callable[..., T],
        *args: Any,
        retry: RetryPolicy | None = None,
        **kwargs: Any,
    ) -> T:
        """Run ``fn(*args, **kwargs)`` once for this run and record its result under ``key``.

        Sync functions run in a thread so heartbeats go on. On replay the recorded result is
        returned, typed again by ``fn``'s return annotation. The step's idempotency key is
        ``f"{run_id}:{key}"`` (see ``idempotency_key``). A failure after the last attempt raises
        ``StepFailedError``, live and on replay alike.
        """
        return typing.cast(T, await self._x.run_step(key, fn, args, kwargs, retry))

    async def now(self, key: str | None = None) -> datetime:
        """The current time, recorded: the same value on every replay."""
        value = await self._x.record_value(key, "now", lambda: time.time())
        return datetime.fromtimestamp(float(value), tz=UTC)

    async def uuid(self, key: str | None = None) -> str:
        """A random UUID4, recorded."""
        return str(await self._x.record_value(key, "uuid", lambda: str(_uuid.uuid4())))

    async def random(self, key: str | None = None) -> float:
        """A random float in [0, 1), recorded."""
        return float(await self._x.record_value(key, "random", _random.random))

    async def agent_invoke_and_wait(
        self, key: str, run: AgentRun, *, inline: bool = False
    ) -> AgentResult[Any]:
        """Run ``agent.with_input(...)`` durably under ``key`` as a child run (``inline=True``:
        in this run's own history); returns an ``AgentResult`` whose ``.result`` is typed by
        the agent's ``output_type``. See docs/agents.md."""
        return await invoke_agent(self._x, key, run, inline=inline)

    def idempotency_key(self, key: str) -> str:
        return f"{self._x.run_id}:{key}"

    # Waiting without compute (polos/_private/run/waits.py, docs/waiting.md): each of these
    # suspends the run (no worker, no slot held) until what it waits for is in the history.

    async def suspend(
        self, key: str, data: Any = None, timeout: float | timedelta | None = None
    ) -> Resumed:
        """Pause until ``client.resume(run_id, key, data)``; returns the resume (``.data``).

        ``data`` is shown to whoever resumes (``polos runs --waiting``). After ``timeout``
        seconds without a resume, ``WaitTimeoutError`` is raised here.
        """
        return await waiting.suspend(self._x, key, data, timeout)

    async def wait_for_event(
        self, key: str, topic: str, timeout: float | timedelta | None = None
    ) -> ReceivedEvent:
        """The first event on ``topic`` published after the run started (after the previous
        wait on the same topic, in a loop) - waiting for it if none has come yet."""
        return await waiting.wait_for_event(self._x, key, topic, timeout)

    async def sleep(self, key: str, duration: float | timedelta) -> None:
        """A durable sleep: the scheduler wakes the run; no worker waits."""
        await waiting.sleep(self._x, key, duration)

    async def sleep_until(self, key: str, when: datetime) -> None:
        await waiting.sleep_until(self._x, key, when)

    async def invoke(
        self, key: str, workflow: WorkflowDefinition[Any, Any] | str, input: Any = None
    ) -> ChildHandle:
        """Start a child run (exactly once for this step) without waiting for it."""
        return await waiting.invoke(self._x, key, workflow, input)

    async def invoke_and_wait(
        self, key: str, workflow: WorkflowDefinition[Any, Any] | str, input: Any = None
    ) -> Any:
        """Run a child workflow and return its output; the parent waits without a worker.
        A failed or cancelled child raises ``ChildWorkflowError``."""
        return await waiting.invoke_and_wait(self._x, key, workflow, input)

    async def batch_invoke_and_wait(
        self, key: str, items: Iterable[tuple[WorkflowDefinition[Any, Any] | str, Any]]
    ) -> list[Any]:
        """Fan out ``(workflow, input)`` pairs as child runs, fan in their outputs (in order)."""
        return await waiting.batch_invoke_and_wait(self._x, key, items)


class WorkflowContext:
    """What a workflow function receives first: the run's identity and ``step``."""

    def __init__(self, execution: RunExecution) -> None:
        self._x = execution
        self.step = Step(execution)

    @property
    def run_id(self) -> str:
        return self._x.run_id

    @property
    def workflow(self) -> str:
        return self._x.workflow.name

    @property
    def attempt(self) -> int:
        """How many times a worker has claimed this run (1 on the first execution)."""
        return self._x.attempt

    @property
    def parent_run_id(self) -> str | None:
        return self._x.parent_run_id

    @property
    def is_replaying(self) -> bool:
        """True while the code is re-walking recorded history (e.g. to skip logging)."""
        return self._x.is_replaying

    def approval_url(self, key: str) -> str | None:
        """The web UI's page where a human answers the next ``ctx.step.suspend(key)`` of this
        run, to put in an email or a chat message before suspending; the suspend's data
        carries it too, as ``_approval_url``. None when the worker does not know the UI's URL
        (``POLOS_UI_URL``; workers started beside ``polos up`` do). See docs/ui.md."""
        base = self._x.settings.ui_url
        return (
            waiting.approval_url(base, self._x.run_id, self._x.next_step_id(key)) if base else None
        )

    async def patched(self, patch_id: str) -> bool:
        """Roll out a code change safely: ``if await ctx.patched("v2"): new() else: old()``.

        True for runs that reach this point with the new code (recorded, so it stays True on
        replay); False for runs whose history was written by the old code past this point.
        Once no run of the old code is left, drop the old branch (keep the ``patched`` call
        for as long as runs that recorded it may replay).
        """
        return await self._x.patched(patch_id)


__all__ = [
    "DEFAULT_STEP_RETRY",
    "NO_RETRY",
    "BatchEventPayload",
    "BatchStepResult",
    "BatchWorkflowInput",
    "EventItem",
    "EventPayload",
    "RetryPolicy",
    "SchedulePayload",
    "Step",
    "StepInfo",
    "WorkflowContext",
    "WorkflowDefinition",
    "WorkflowState",
    "get_all_workflows",
    "get_workflow",
    "registered_workflows",
    "workflow",
]
