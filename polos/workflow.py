"""Inside a workflow: the ``@workflow`` decorator, ``WorkflowContext`` and its durable steps.

A workflow is a plain ``async def (ctx, input) -> output``. Everything with a side effect or a
non-deterministic value goes through ``ctx.step``, which records the outcome in the run's
history the first time and returns the recorded outcome on every replay.
"""

from __future__ import annotations

import dataclasses
import inspect
import random as _random
import re
import time
import typing
import uuid as _uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, overload

if TYPE_CHECKING:
    from collections.abc import Iterable
    from datetime import timedelta

    from polos._private.execution import RunExecution
    from polos._private.waiting import ChildHandle, ReceivedEvent, Resumed

P = ParamSpec("P")
T = TypeVar("T")
I = TypeVar("I")  # noqa: E741 - the conventional name for an input type
O = TypeVar("O")  # noqa: E741

_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How a step is retried: ``max_attempts`` in all, waiting ``initial_interval`` seconds and
    multiplying by ``backoff`` (capped at ``max_interval``) between attempts.

    ``retry_on`` lists the exception types that retry; ``non_retryable`` wins over it.
    """

    max_attempts: int = 3
    initial_interval: float = 1.0
    backoff: float = 2.0
    max_interval: float = 60.0
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    non_retryable: tuple[type[BaseException], ...] = ()

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        return float(min(self.max_interval, self.initial_interval * self.backoff ** (attempt - 1)))

    def retries(self, exc: BaseException, attempt: int) -> bool:
        if attempt >= self.max_attempts or isinstance(exc, self.non_retryable):
            return False
        return isinstance(exc, self.retry_on)


DEFAULT_STEP_RETRY = RetryPolicy()
NO_RETRY = RetryPolicy(max_attempts=1)


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """What a running step knows about itself; read it with ``polos.current_step()``."""

    run_id: str
    key: str
    attempt: int

    @property
    def idempotency_key(self) -> str:
        """Stable across retries, replays and workers: pass it to Stripe and friends."""
        return f"{self.run_id}:{self.key}"


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

    async def agent_invoke_and_wait(self, key: str, run: Any, *, inline: bool = False) -> Any:
        """Run ``agent.with_input(...)`` durably under ``key`` as a child run (``inline=True``:
        in this run's own history); returns an ``AgentResult`` whose ``.result`` is typed by
        the agent's ``output_type``. See polos/agent.py and docs/agents.md."""
        from polos.agent import invoke_agent

        return await invoke_agent(self._x, key, run, inline=inline)

    def idempotency_key(self, key: str) -> str:
        return f"{self._x.run_id}:{key}"

    # Waiting without compute (polos/_private/waiting.py, docs/waiting.md): each of these
    # suspends the run (no worker, no slot held) until what it waits for is in the history.

    async def suspend(
        self, key: str, data: Any = None, timeout: float | timedelta | None = None
    ) -> Resumed:
        """Pause until ``client.resume(run_id, key, data)``; returns the resume (``.data``).

        ``data`` is shown to whoever resumes (``polos runs --waiting``). After ``timeout``
        seconds without a resume, ``WaitTimeoutError`` is raised here.
        """
        from polos._private import waiting

        return await waiting.suspend(self._x, key, data, timeout)

    async def wait_for_event(
        self, key: str, topic: str, timeout: float | timedelta | None = None
    ) -> ReceivedEvent:
        """The first event on ``topic`` published after the run started (after the previous
        wait on the same topic, in a loop) - waiting for it if none has come yet."""
        from polos._private import waiting

        return await waiting.wait_for_event(self._x, key, topic, timeout)

    async def sleep(self, key: str, duration: float | timedelta) -> None:
        """A durable sleep: the scheduler wakes the run; no worker waits."""
        from polos._private import waiting

        await waiting.sleep(self._x, key, duration)

    async def sleep_until(self, key: str, when: datetime) -> None:
        from polos._private import waiting

        await waiting.sleep_until(self._x, key, when)

    async def invoke(self, key: str, workflow: Any, input: Any = None) -> ChildHandle:
        """Start a child run (exactly once for this step) without waiting for it."""
        from polos._private import waiting

        return await waiting.invoke(self._x, key, workflow, input)

    async def invoke_and_wait(self, key: str, workflow: Any, input: Any = None) -> Any:
        """Run a child workflow and return its output; the parent waits without a worker.
        A failed or cancelled child raises ``ChildWorkflowError``."""
        from polos._private import waiting

        return await waiting.invoke_and_wait(self._x, key, workflow, input)

    async def batch_invoke_and_wait(self, key: str, items: Iterable[tuple[Any, Any]]) -> list[Any]:
        """Fan out ``(workflow, input)`` pairs as child runs, fan in their outputs (in order)."""
        from polos._private import waiting

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
        from polos._private.waiting import approval_url

        base = self._x.settings.ui_url
        return approval_url(base, self._x.run_id, self._x.next_step_id(key)) if base else None

    async def patched(self, patch_id: str) -> bool:
        """Roll out a code change safely: ``if await ctx.patched("v2"): new() else: old()``.

        True for runs that reach this point with the new code (recorded, so it stays True on
        replay); False for runs whose history was written by the old code past this point.
        Once no run of the old code is left, drop the old branch (keep the ``patched`` call
        for as long as runs that recorded it may replay).
        """
        return await self._x.patched(patch_id)


@dataclasses.dataclass(eq=False)
class WorkflowDefinition(Generic[I, O]):
    """A registered workflow. Calling it runs the function directly (no durability)."""

    fn: Callable[..., Awaitable[O]]
    name: str
    input_type: Any
    output_type: Any
    takes_input: bool
    queue: str | None = None
    trigger_on_event: str | None = None
    schedule: str | None = None
    timezone: str | None = None
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    async def __call__(self, ctx: WorkflowContext, input: Any = None) -> O:
        if self.takes_input:
            return await self.fn(ctx, input)
        return await self.fn(ctx)

    @property
    def task_queue(self) -> str:
        return self.queue or self.name


_REGISTRY: dict[str, WorkflowDefinition[Any, Any]] = {}


def registered_workflows() -> dict[str, WorkflowDefinition[Any, Any]]:
    """Every workflow defined in this process so far, by name."""
    return dict(_REGISTRY)


def _define(
    fn: Callable[..., Awaitable[Any]],
    name: str | None,
    queue: Any,
    trigger_on_event: str | None,
    schedule: str | None,
    timezone: str | None,
    options: dict[str, Any],
) -> WorkflowDefinition[Any, Any]:
    if not inspect.iscoroutinefunction(fn):
        raise TypeError(f"@workflow needs an async def, got {fn!r}")
    wf_name = name or fn.__name__
    if not _NAME_RE.match(wf_name):
        raise ValueError(
            f"workflow name {wf_name!r} must be 1-128 letters, digits, '_' or '-' "
            "(it is a NATS subject token)"
        )
    params = list(inspect.signature(fn).parameters.values())
    if not params or len(params) > 2:
        raise TypeError(f"workflow {wf_name!r} must take (ctx) or (ctx, input)")
    try:
        hints = typing.get_type_hints(fn)
    except Exception:
        hints = dict(getattr(fn, "__annotations__", {}))
    takes_input = len(params) == 2
    input_type = hints.get(params[1].name) if takes_input else None
    output_type = hints.get("return")
    if output_type is type(None):
        output_type = None
    queue_name = getattr(queue, "name", queue)
    if queue is not None:
        options.setdefault("queue_def", queue)
    definition: WorkflowDefinition[Any, Any] = WorkflowDefinition(
        fn=fn,
        name=wf_name,
        input_type=input_type,
        output_type=output_type,
        takes_input=takes_input,
        queue=queue_name,
        trigger_on_event=trigger_on_event,
        schedule=schedule,
        timezone=timezone,
        options=options,
    )
    _REGISTRY[wf_name] = definition
    return definition


@overload
def workflow(fn: Callable[..., Awaitable[O]], /) -> WorkflowDefinition[Any, O]: ...


@overload
def workflow(
    *,
    name: str | None = None,
    queue: Any = None,
    trigger_on_event: str | None = None,
    schedule: str | None = None,
    timezone: str | None = None,
    **options: Any,
) -> Callable[[Callable[..., Awaitable[O]]], WorkflowDefinition[Any, O]]: ...


def workflow(
    fn: Callable[..., Awaitable[Any]] | None = None,
    /,
    *,
    name: str | None = None,
    queue: Any = None,
    trigger_on_event: str | None = None,
    schedule: str | None = None,
    timezone: str | None = None,
    **options: Any,
) -> Any:
    """Declare a durable workflow: ``@workflow`` bare, or ``@workflow(name=..., queue=...)``."""
    if fn is not None:
        return _define(fn, None, None, None, None, None, {})

    def wrap(f: Callable[..., Awaitable[Any]]) -> WorkflowDefinition[Any, Any]:
        return _define(f, name, queue, trigger_on_event, schedule, timezone, dict(options))

    return wrap


__all__ = [
    "NO_RETRY",
    "RetryPolicy",
    "Step",
    "StepInfo",
    "WorkflowContext",
    "WorkflowDefinition",
    "registered_workflows",
    "workflow",
]
