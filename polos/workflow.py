"""Inside a workflow: the ``@workflow`` decorator, ``WorkflowContext`` and its durable steps.

``WorkflowContext`` and ``Step`` are the workflow's point of view over the run runtime
(``polos._private.run``); the decorator and the value types are defined below the runtime and
re-exported here.

A workflow is a plain ``async def (ctx, input) -> output``. Everything with a side effect or a
non-deterministic value goes through ``ctx.step``, which records the outcome in the run's
history the first time and returns the recorded outcome on every replay.
"""

from __future__ import annotations

import contextlib
import random as _random
import time
import typing
import uuid as _uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from opentelemetry import trace as otel_trace

from polos._private.agents.loop import (
    AgentRequest,
    AgentResult,
    AgentRun,
    agent_workflow,
    get_agent,
    invoke_agent,
)
from polos._private.agents.tools import set_context_factory
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
from polos._private.run.execution import NEW_STEP
from polos._private.run.publish import publish_step, resume_step, workflow_topic
from polos._private.run.waits import ChildHandle, ReceivedEvent, Resumed
from polos.converter import from_json, to_json
from polos.errors import StepExecutionError

if TYPE_CHECKING:
    from polos._private.run.execution import RunExecution

P = ParamSpec("P")
T = TypeVar("T")


_NOT_SUPPORTED = "is not supported here"


def _retry_of(
    key: str,
    retry: RetryPolicy | None,
    max_retries: int | None,
    base_delay: float | None,
    max_delay: float | None,
) -> RetryPolicy | None:
    """The original SDK's ``max_retries`` / ``base_delay`` / ``max_delay`` as a policy: tried
    ``max_retries + 1`` times, waiting ``min(base_delay * 2**n, max_delay)`` in between."""
    if max_retries is None and base_delay is None and max_delay is None:
        return retry
    if retry is not None:
        raise TypeError(
            f"ctx.step.run({key!r}): give retry=RetryPolicy(...) or max_retries/base_delay/"
            "max_delay, not both"
        )
    retries = 2 if max_retries is None else max_retries
    if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
        raise ValueError(f"ctx.step.run({key!r}): max_retries must be an int >= 0, got {retries!r}")
    return RetryPolicy(
        max_attempts=retries + 1,
        initial_interval=1.0 if base_delay is None else float(base_delay),
        backoff=2.0,
        max_interval=10.0 if max_delay is None else float(max_delay),
    )


def _child_options(
    what: str,
    *,
    initial_state: Any = None,
    queue: str | None = None,
    concurrency_key: str | None = None,
    run_timeout_seconds: int | None = None,
) -> dict[str, Any]:
    if run_timeout_seconds is not None:
        raise ValueError(
            f"{what}: run_timeout_seconds {_NOT_SUPPORTED} (a run has no time limit; cancel it "
            "with client.cancel, or bound its waits with timeout=)"
        )
    for name, value in (("queue", queue), ("concurrency_key", concurrency_key)):
        if value is not None and not isinstance(value, str):
            raise TypeError(f"{what}: {name} must be a string, got {type(value).__name__}")
    state = None
    if initial_state is not None:
        state = to_json(initial_state, what=f"the initial_state of {what}")
        if not isinstance(state, dict):
            raise TypeError(f"{what}: initial_state must be a dict or a pydantic model")
    return {"queue": queue, "concurrency_key": concurrency_key, "initial_state": state}


def _batch_items(
    what: str, workflows: Iterable[Any]
) -> tuple[list[tuple[WorkflowDefinition[Any, Any] | str, Any]], list[dict[str, Any] | None], bool]:
    """``BatchWorkflowInput``s (the original's) or ``(workflow, input)`` pairs (ours): the pairs,
    each child's options, and whether the original's form was used."""
    items: list[tuple[WorkflowDefinition[Any, Any] | str, Any]] = []
    options: list[dict[str, Any] | None] = []
    originals = 0
    for item in workflows:
        if isinstance(item, BatchWorkflowInput):
            originals += 1
            items.append((item.id, item.payload))
            options.append(
                _child_options(
                    what,
                    initial_state=item.initial_state,
                    run_timeout_seconds=item.run_timeout_seconds,
                )
            )
        elif isinstance(item, tuple) and len(item) == 2:
            items.append(item)
            options.append(None)
        else:
            raise TypeError(
                f"{what}: each child is a BatchWorkflowInput(id=..., payload=...) or a "
                f"(workflow, input) pair, got {item!r}"
            )
    if originals and originals != len(items):
        raise TypeError(f"{what}: give BatchWorkflowInput items or pairs, not both")
    return items, options, bool(originals)


def _agent_request(what: str, key: str, run: Any, x: RunExecution) -> AgentRequest:
    if not isinstance(run, AgentRun):
        raise TypeError(f"{what}: needs agent.with_input(...), got {type(run).__name__}")
    get_agent(run.agent.name)  # defined here, under one name
    return AgentRequest(
        agent=run.agent.name, input=run.input, session=run.session or x.run_id, key=key
    )


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
        max_retries: int | None = None,
        base_delay: float | None = None,
        max_delay: float | None = None,
        **kwargs: Any,
    ) -> T:
        """Run ``fn(*args, **kwargs)`` once for this run and record its result under ``key``.

        Sync functions run in a thread so heartbeats go on. On replay the recorded result is
        returned, typed again by ``fn``'s return annotation. The step's idempotency key is
        ``f"{run_id}:{key}"`` (see ``idempotency_key``). A failure after the last attempt raises
        ``StepFailedError`` (a ``StepExecutionError``), live and on replay alike.

        Retries: ``retry=RetryPolicy(...)``, or the original SDK's ``max_retries`` (tries
        ``max_retries + 1`` times), ``base_delay`` and ``max_delay`` (seconds, doubling); these
        names are the step's, never passed to ``fn``.
        """
        policy = (
            retry
            if max_retries is None and base_delay is None and max_delay is None
            else _retry_of(key, retry, max_retries, base_delay, max_delay)
        )
        # A replayed step returns from here without another coroutine: the re-walk of a long
        # run is a loop of these calls.
        step_id, name, out = self._x.replay_run(key, fn)
        if out is NEW_STEP:
            out = await self._x.run_new(step_id, name, fn, args, kwargs, policy)
        return typing.cast(T, out)

    async def now(self, key: str | None = None) -> int:
        """The current time in epoch milliseconds, recorded: the same value on every replay."""
        value = await self._x.record_value(key, "now", lambda: time.time())
        return int(float(value) * 1000)

    async def uuid(self, key: str | None = None) -> str:
        """A random UUID4, recorded."""
        return str(await self._x.record_value(key, "uuid", lambda: str(_uuid.uuid4())))

    async def random(self, key: str | None = None) -> float:
        """A random float in [0, 1), recorded."""
        return float(await self._x.record_value(key, "random", _random.random))

    @contextlib.contextmanager
    def trace(self, name: str, attributes: dict[str, Any] | None = None) -> Iterator[Any]:
        """A span around a block (``with ctx.step.trace("parse"):``), a child of the current
        OpenTelemetry span, ERROR with the exception if the block raises. Not a step: nothing
        is recorded, and it opens again on replay."""
        tracer = otel_trace.get_tracer("polos")
        attrs = {"polos.run_id": self._x.run_id, "polos.workflow": self._x.workflow.name}
        attrs.update(attributes or {})
        with tracer.start_as_current_span(name, attributes=attrs) as span:
            yield span

    async def agent_invoke_and_wait(
        self, key: str, run: AgentRun, *, inline: bool = False
    ) -> AgentResult[Any]:
        """Run ``agent.with_input(...)`` durably under ``key`` as a child run (``inline=True``:
        in this run's own history); returns an ``AgentResult`` whose ``.result`` is typed by
        the agent's ``output_type``. See docs/agents.md."""
        return await invoke_agent(self._x, key, run, inline=inline, ctx=WorkflowContext(self._x))

    async def agent_invoke(self, key: str, run: AgentRun) -> ChildHandle:
        """Start ``agent.with_input(...)`` as a child run without waiting (fire and forget);
        ``client.get_handle(handle.id)`` follows it."""
        req = _agent_request(f"agent_invoke({key!r})", key, run, self._x)
        return await waiting.invoke(self._x, key, agent_workflow, req)

    async def batch_agent_invoke(self, key: str, runs: Iterable[AgentRun]) -> list[ChildHandle]:
        """Start several agents as child runs without waiting; their handles, in order."""
        reqs = [
            _agent_request(f"batch_agent_invoke({key!r})", f"{key}/{i}", r, self._x)
            for i, r in enumerate(runs)
        ]
        return await waiting.batch_invoke(self._x, key, [(agent_workflow, r) for r in reqs])

    async def batch_agent_invoke_and_wait(
        self, key: str, runs: Iterable[AgentRun]
    ) -> list[BatchStepResult]:
        """Run several agents as child runs and wait for all: one ``BatchStepResult`` each,
        in order, whose ``.result`` is the ``AgentResult`` (a failed agent is a result with
        ``success=False`` and ``error``, not an exception)."""
        runs = list(runs)
        reqs = [
            _agent_request(f"batch_agent_invoke_and_wait({key!r})", f"{key}/{i}", r, self._x)
            for i, r in enumerate(runs)
        ]
        results: list[BatchStepResult] = await waiting.batch_invoke_and_wait(
            self._x, key, [(agent_workflow, r) for r in reqs], as_results=True
        )
        for item, run in zip(results, runs, strict=True):
            if item.success and item.result is not None:
                item.workflow_id = run.agent.name
                result = AgentResult.from_json(item.result)
                if run.agent.output_type is not None and result.result is not None:
                    result.result = from_json(result.result, run.agent.output_type)
                item.result = result
        return results

    def idempotency_key(self, key: str) -> str:
        return f"{self._x.run_id}:{key}"

    # Events from a step: published once for this run, recorded like any step.

    async def publish_event(
        self, key: str, topic: str, data: Any = None, event_type: str | None = None
    ) -> None:
        """Publish an event on ``topic`` exactly once for this run (a durable step): it wakes
        ``wait_for_event`` waiters and starts ``trigger_on_event`` workflows."""
        await publish_step(self._x, key, topic, data, event_type)

    async def publish_workflow_event(
        self, key: str, data: Any = None, event_type: str | None = None
    ) -> None:
        """``publish_event`` on this run tree's own topic,
        ``workflow/<root workflow>/<root run id>``."""
        await publish_step(self._x, key, workflow_topic(self._x), data, event_type)

    # Waiting without compute (polos/_private/run/waits.py, docs/waiting.md): each of these
    # suspends the run (no worker, no slot held) until what it waits for is in the history.

    async def suspend(
        self, key: str, data: Any = None, timeout: float | timedelta | None = None
    ) -> Resumed:
        """Pause until ``client.resume(run_id, key, data)``; returns the resume: ``.data``, or
        as the original SDK's resume event, ``resumed["data"]`` / ``resumed.get("data")``.

        ``data`` is shown to whoever resumes (``polos runs --waiting``). After ``timeout``
        seconds without a resume, ``WaitTimeoutError`` is raised here.
        """
        return await waiting.suspend(self._x, key, data, timeout)

    async def resume(
        self,
        key: str,
        suspend_step_key: str,
        suspend_execution_id: str,
        suspend_workflow_id: str | None = None,
        data: Any = None,
    ) -> None:
        """Resume another run's ``suspend(suspend_step_key)`` exactly once for this run (a
        durable step). ``suspend_workflow_id`` is accepted for the original SDK's signature;
        the run id alone names the run here."""
        await resume_step(self._x, key, suspend_execution_id, suspend_step_key, data)

    async def wait_for_event(
        self, key: str, topic: str, timeout: float | timedelta | None = None
    ) -> ReceivedEvent:
        """The first event on ``topic`` published after the run started (after the previous
        wait on the same topic, in a loop) - waiting for it if none has come yet. Also read
        as the original SDK's ``EventPayload`` (``.event_type``, ``.sequence_id``...)."""
        return await waiting.wait_for_event(self._x, key, topic, timeout)

    async def sleep(self, key: str, duration: float | timedelta) -> None:
        """A durable sleep: the scheduler wakes the run; no worker waits."""
        await waiting.sleep(self._x, key, duration)

    async def sleep_until(self, key: str, when: datetime) -> None:
        await waiting.sleep_until(self._x, key, when)

    async def wait_for(
        self,
        key: str,
        seconds: float | None = None,
        minutes: float | None = None,
        hours: float | None = None,
        days: float | None = None,
        weeks: float | None = None,
    ) -> None:
        """The original SDK's durable sleep: the units add up; a total <= 0 raises
        ``StepExecutionError``. Returns None, first run and replay alike."""
        total = timedelta(
            seconds=seconds or 0,
            minutes=minutes or 0,
            hours=hours or 0,
            days=days or 0,
            weeks=weeks or 0,
        )
        if total.total_seconds() <= 0:
            raise StepExecutionError(f"Wait duration must be positive (step {key!r})")
        await waiting.sleep(self._x, key, total)

    async def wait_until(self, key: str, timestamp: datetime) -> None:
        """Sleep until ``timestamp`` (a naive datetime is UTC); a time already past when the
        code first gets here raises ``StepExecutionError``."""
        if not isinstance(timestamp, datetime):
            raise TypeError(f"wait_until({key!r}, ...) needs a datetime, got {timestamp!r}")
        if timestamp.tzinfo is None:
            timestamp = timestamp.replace(tzinfo=UTC)
        await waiting.sleep_until(self._x, key, timestamp, past_ok=False)

    async def invoke(
        self,
        key: str,
        workflow: WorkflowDefinition[Any, Any] | str,
        input: Any = None,
        initial_state: Any = None,
        queue: str | None = None,
        concurrency_key: str | None = None,
        run_timeout_seconds: int | None = None,
    ) -> ChildHandle:
        """Start a child run (exactly once for this step) without waiting for it; the handle's
        ``.id`` is its run id. The child inherits this run's session and user."""
        opts = _child_options(
            f"invoke({key!r})",
            initial_state=initial_state,
            queue=queue,
            concurrency_key=concurrency_key,
            run_timeout_seconds=run_timeout_seconds,
        )
        return await waiting.invoke(self._x, key, workflow, input, opts)

    async def invoke_and_wait(
        self,
        key: str,
        workflow: WorkflowDefinition[Any, Any] | str,
        input: Any = None,
        initial_state: Any = None,
        queue: str | None = None,
        concurrency_key: str | None = None,
        run_timeout_seconds: int | None = None,
    ) -> Any:
        """Run a child workflow and return its output; the parent waits without a worker.
        A failed or cancelled child raises ``ChildWorkflowError``."""
        opts = _child_options(
            f"invoke_and_wait({key!r})",
            initial_state=initial_state,
            queue=queue,
            concurrency_key=concurrency_key,
            run_timeout_seconds=run_timeout_seconds,
        )
        return await waiting.invoke_and_wait(self._x, key, workflow, input, opts)

    async def batch_invoke(
        self,
        key: str,
        workflows: Iterable[BatchWorkflowInput | tuple[WorkflowDefinition[Any, Any] | str, Any]],
    ) -> list[ChildHandle]:
        """Start several child runs without waiting; their handles, in order."""
        items, options, _ = _batch_items(f"batch_invoke({key!r})", workflows)
        return await waiting.batch_invoke(self._x, key, items, options)

    async def batch_invoke_and_wait(
        self,
        key: str,
        workflows: Iterable[BatchWorkflowInput | tuple[WorkflowDefinition[Any, Any] | str, Any]],
    ) -> list[Any]:
        """Fan out child runs, fan in their outcomes (in order).

        With ``BatchWorkflowInput`` items (the original SDK's form): a ``BatchStepResult``
        each (``.success``, ``.result``, ``.error``); a failed child is a result, not an
        exception. With ``(workflow, input)`` pairs: the outputs themselves, and a failed
        child raises ``ChildWorkflowError``.
        """
        items, options, original = _batch_items(f"batch_invoke_and_wait({key!r})", workflows)
        return await waiting.batch_invoke_and_wait(
            self._x, key, items, options, as_results=original
        )


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
    def state(self) -> Any:
        """The workflow's state, an instance of its ``state_schema`` (mutate it freely): it
        starts from the run's ``initial_state`` (or the schema's defaults), is recorded in the
        run's history at each step boundary where it changed (``state@<step>``, in ``polos
        show``), and is restored from there on replay, on this worker or another."""
        if self._x.workflow.state_schema is None:
            raise AttributeError(
                f"workflow {self._x.workflow.name!r} has no state: declare "
                "@workflow(state_schema=MyState) to use ctx.state"
            )
        return self._x.user_state

    @state.setter
    def state(self, value: Any) -> None:
        schema = self._x.workflow.state_schema
        if schema is None or not isinstance(value, schema):
            raise TypeError(
                f"ctx.state of workflow {self._x.workflow.name!r} must be a "
                f"{getattr(schema, '__name__', 'state_schema')} instance"
            )
        self._x.user_state = value

    # The original SDK's names for the run's identity (one concept: ``execution_id`` is
    # ``run_id``, ``workflow_id`` is ``workflow``, ``parent_execution_id`` is
    # ``parent_run_id``).

    @property
    def execution_id(self) -> str:
        return self._x.run_id

    @property
    def workflow_id(self) -> str:
        return self._x.workflow.name

    @property
    def parent_execution_id(self) -> str | None:
        return self._x.parent_run_id

    @property
    def root_execution_id(self) -> str:
        """The run at the top of this call tree (this run's id for a root run)."""
        req = self._x.state.requested
        return (req.root_run_id if req else None) or self._x.run_id

    @property
    def root_workflow_id(self) -> str:
        req = self._x.state.requested
        return (req.root_workflow if req else None) or self._x.workflow.name

    @property
    def session_id(self) -> str | None:
        """The session the run was started for (its children inherit it)."""
        req = self._x.state.requested
        return req.session_id if req else None

    @property
    def user_id(self) -> str | None:
        req = self._x.state.requested
        return req.user_id if req else None

    @property
    def retry_count(self) -> int:
        """How many times the run was taken up again after its worker was lost (0 on the
        first execution; a wake after a wait is not a retry)."""
        return self._x.state.restarts

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


# Workflow-style tools, ``(ctx: WorkflowContext, input)``, get this context in their calls.
set_context_factory(WorkflowContext)

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
