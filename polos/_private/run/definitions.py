"""The ``@workflow`` decorator and the workflows defined in this process."""

from __future__ import annotations

import inspect
import re
import typing
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

from polos._private.model.values import Queue, WorkflowDefinition

O = TypeVar("O")  # noqa: E741

_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


_REGISTRY: dict[str, WorkflowDefinition[Any, Any]] = {}


def registered_workflows() -> dict[str, WorkflowDefinition[Any, Any]]:
    """Every workflow defined in this process so far, by name."""
    return dict(_REGISTRY)


def _type_hints(fn: Callable[..., Any]) -> dict[str, Any]:
    """The function's annotations, evaluated one by one: an annotation that cannot be evaluated
    here (a ``ctx: WorkflowContext`` imported only for type checking) stays a string and does not
    keep the input's and the output's from being resolved."""
    try:
        return typing.get_type_hints(fn)
    except Exception:
        pass
    out: dict[str, Any] = {}
    namespace = getattr(fn, "__globals__", {})
    for name, value in dict(getattr(fn, "__annotations__", {})).items():
        if isinstance(value, str):
            try:
                value = eval(value, namespace)  # what get_type_hints does, per name
            except Exception:
                pass
        out[name] = value
    return out


def _define(
    fn: Callable[..., Awaitable[Any]],
    name: str | None,
    queue: str | Queue | None,
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
    hints = _type_hints(fn)
    takes_input = len(params) == 2
    input_type = hints.get(params[1].name) if takes_input else None
    output_type = hints.get("return")
    if output_type is type(None):
        output_type = None
    queue_name = queue.name if isinstance(queue, Queue) else queue
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
    queue: str | Queue | None = None,
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
    queue: str | Queue | None = None,
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


__all__ = ["registered_workflows", "workflow"]
