"""The ``@workflow`` decorator and the workflows defined in this process."""

from __future__ import annotations

import inspect
import re
import typing
import zoneinfo
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

from pydantic import BaseModel

from polos._private.model.values import Queue, WorkflowDefinition
from polos._private.store.tokens import topic_tokens
from polos.middleware.hook import check_hooks

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


# Every option of ``@workflow``: anything else raises, naming these.
OPTIONS = (
    "id",
    "name",
    "description",
    "queue",
    "trigger_on_event",
    "batch_size",
    "batch_timeout_seconds",
    "schedule",
    "timezone",
    "on_start",
    "on_end",
    "state_schema",
)
_SCHEDULE_KEYS = frozenset({"cron", "timezone", "key"})


def _queue_of(wf_name: str, queue: Any) -> Queue | str | None:
    """``queue`` as a name, a ``Queue`` or the original's dict (``{"concurrency_limit": 3}``,
    optionally ``"name"``: the workflow's own name by default)."""
    if queue is None or isinstance(queue, Queue):
        return queue
    if isinstance(queue, str):
        if not _NAME_RE.match(queue):
            raise ValueError(
                f"workflow {wf_name!r}: queue name {queue!r} must be 1-128 letters, digits, "
                "'_' or '-'"
            )
        return queue
    if isinstance(queue, dict):
        unknown = sorted(set(queue) - {"name", "concurrency_limit", "concurrency", "per_key"})
        if unknown:
            raise ValueError(
                f"workflow {wf_name!r}: queue option(s) {', '.join(map(repr, unknown))} are not "
                "supported; a queue dict takes name, concurrency_limit (or concurrency), per_key"
            )
        return Queue(
            str(queue.get("name") or wf_name),
            concurrency=queue.get("concurrency"),
            per_key=queue.get("per_key"),
            concurrency_limit=queue.get("concurrency_limit"),
        )
    raise TypeError(
        f"workflow {wf_name!r}: queue must be a name, a Queue or a dict "
        f"({{'concurrency_limit': n}}), got {type(queue).__name__}"
    )


def _schedule_of(
    wf_name: str, schedule: Any, timezone: str | None
) -> tuple[str | None, str | None, bool, str | None]:
    """(cron, timezone, schedulable, key) from ``schedule``: a cron string, the original's
    dict ``{"cron", "timezone"?, "key"?}``, ``True`` (schedulable through the API only), or
    ``False``/None."""
    if schedule is None or schedule is False:
        if timezone is not None:
            raise ValueError(f"workflow {wf_name!r}: timezone= needs a schedule")
        return None, None, False, None
    if schedule is True:
        if timezone is not None:
            raise ValueError(
                f"workflow {wf_name!r}: schedule=True has no cron of its own; give the time "
                "zone to each schedule you create"
            )
        return None, None, True, None
    key: str | None = None
    if isinstance(schedule, dict):
        unknown = sorted(set(schedule) - _SCHEDULE_KEYS)
        if unknown:
            raise ValueError(
                f"workflow {wf_name!r}: schedule option(s) {', '.join(map(repr, unknown))} are "
                "not supported; a schedule dict takes cron, timezone, key"
            )
        if not isinstance(schedule.get("cron"), str):
            raise ValueError(f"workflow {wf_name!r}: a schedule dict needs 'cron' (a string)")
        if timezone is not None and schedule.get("timezone") not in (None, timezone):
            raise ValueError(f"workflow {wf_name!r}: two time zones (timezone= and the dict's)")
        timezone = schedule.get("timezone") or timezone
        key = schedule.get("key")
        if key is not None and (not isinstance(key, str) or not _NAME_RE.match(key)):
            raise ValueError(
                f"workflow {wf_name!r}: schedule key {key!r} must be 1-128 letters, digits, "
                "'_' or '-'"
            )
        schedule = schedule["cron"]
    if not isinstance(schedule, str):
        raise TypeError(
            f"workflow {wf_name!r}: schedule must be a cron string, a dict "
            f"({{'cron': ..., 'timezone': ...}}) or True, got {type(schedule).__name__}"
        )
    cron_fields = schedule.split()
    if not (schedule.strip().startswith("@") or len(cron_fields) in (5, 6)):
        raise ValueError(
            f"workflow {wf_name!r}: schedule {schedule!r}: expected 5 cron fields "
            "(min hour day month weekday)"
        )
    if timezone is not None:
        try:
            zoneinfo.ZoneInfo(timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"workflow {wf_name!r}: unknown time zone {timezone!r}") from exc
    # No time zone given: none sent (the server's UTC; "@every" takes no time zone at all).
    return schedule, timezone, True, key


def _define(
    fn: Callable[..., Awaitable[Any]], options: dict[str, Any]
) -> WorkflowDefinition[Any, Any]:
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise TypeError(
            f"@workflow got unknown option(s) {', '.join(map(repr, unknown))}; "
            f"it accepts {', '.join(OPTIONS)}"
        )
    if not inspect.iscoroutinefunction(fn):
        raise TypeError(f"@workflow needs an async def, got {fn!r}")
    wf_id, name = options.get("id"), options.get("name")
    if wf_id is not None and name is not None and wf_id != name:
        raise ValueError(f"@workflow: id={wf_id!r} and name={name!r} are the same thing; give one")
    wf_name = wf_id or name or fn.__name__
    if not isinstance(wf_name, str) or not _NAME_RE.match(wf_name):
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
    description = options.get("description")
    if description is not None and not isinstance(description, str):
        raise TypeError(f"workflow {wf_name!r}: description must be a string")
    queue = _queue_of(wf_name, options.get("queue"))
    cron, timezone, schedulable, schedule_key = _schedule_of(
        wf_name, options.get("schedule"), options.get("timezone")
    )
    trigger = options.get("trigger_on_event")
    if trigger is not None:
        if not isinstance(trigger, str):
            raise TypeError(f"workflow {wf_name!r}: trigger_on_event must be a topic (a string)")
        topic_tokens(trigger)  # a bad topic fails here
    if schedulable and queue is not None:
        raise ValueError(f"workflow {wf_name!r}: scheduled workflows cannot specify a queue")
    if schedulable and trigger is not None:
        raise ValueError(
            f"workflow {wf_name!r}: a workflow is scheduled or triggered by events, not both"
        )
    batch_size = options.get("batch_size", 1)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(
            f"workflow {wf_name!r}: batch_size must be a positive int, got {batch_size!r}"
        )
    batch_timeout = options.get("batch_timeout_seconds")
    if batch_timeout is not None and (
        not isinstance(batch_timeout, int | float)
        or isinstance(batch_timeout, bool)
        or batch_timeout <= 0
    ):
        raise ValueError(
            f"workflow {wf_name!r}: batch_timeout_seconds must be a positive number, got "
            f"{batch_timeout!r}"
        )
    if trigger is None and (batch_size != 1 or batch_timeout is not None):
        raise ValueError(
            f"workflow {wf_name!r}: batch_size and batch_timeout_seconds need trigger_on_event"
        )
    state_schema = options.get("state_schema")
    if state_schema is not None and not (
        isinstance(state_schema, type) and issubclass(state_schema, BaseModel)
    ):
        raise TypeError(
            f"workflow {wf_name!r}: state_schema must be a pydantic model class (a WorkflowState), "
            f"got {state_schema!r}"
        )
    on_start = check_hooks(options.get("on_start"), where=f"workflow {wf_name!r} on_start")
    on_end = check_hooks(options.get("on_end"), where=f"workflow {wf_name!r} on_end")
    extra: dict[str, Any] = {}
    if queue is not None:
        extra["queue_def"] = queue
    definition: WorkflowDefinition[Any, Any] = WorkflowDefinition(
        fn=fn,
        name=wf_name,
        input_type=input_type,
        output_type=output_type,
        takes_input=takes_input,
        queue=queue.name if isinstance(queue, Queue) else queue,
        trigger_on_event=trigger,
        schedule=cron,
        timezone=timezone,
        options=extra,
        description=description,
        schedulable=schedulable,
        schedule_key=schedule_key,
        batch_size=batch_size,
        batch_timeout_seconds=float(batch_timeout) if batch_timeout is not None else None,
        on_start=on_start,
        on_end=on_end,
        state_schema=state_schema,
    )
    _REGISTRY[wf_name] = definition
    return definition


@overload
def workflow(fn: Callable[..., Awaitable[O]], /) -> WorkflowDefinition[Any, O]: ...


@overload
def workflow(
    *,
    id: str | None = None,
    name: str | None = None,
    description: str | None = None,
    queue: str | Queue | dict[str, Any] | None = None,
    trigger_on_event: str | None = None,
    batch_size: int = 1,
    batch_timeout_seconds: float | None = None,
    schedule: bool | str | dict[str, Any] | None = None,
    timezone: str | None = None,
    on_start: Callable[..., Any] | list[Callable[..., Any]] | None = None,
    on_end: Callable[..., Any] | list[Callable[..., Any]] | None = None,
    state_schema: type[BaseModel] | None = None,
) -> Callable[[Callable[..., Awaitable[O]]], WorkflowDefinition[Any, O]]: ...


def workflow(
    fn: Callable[..., Awaitable[Any]] | None = None,
    /,
    *,
    id: str | None = None,
    name: str | None = None,
    description: str | None = None,
    queue: str | Queue | dict[str, Any] | None = None,
    trigger_on_event: str | None = None,
    batch_size: int = 1,
    batch_timeout_seconds: float | None = None,
    schedule: bool | str | dict[str, Any] | None = None,
    timezone: str | None = None,
    on_start: Callable[..., Any] | list[Callable[..., Any]] | None = None,
    on_end: Callable[..., Any] | list[Callable[..., Any]] | None = None,
    state_schema: type[BaseModel] | None = None,
    **unknown: Any,
) -> Any:
    """Declare a durable workflow: ``@workflow`` bare, or ``@workflow(id=..., queue=...)``.

    ``id`` is the registered name (``name`` is the same option under our earlier name). The
    options are checked here: an unknown one, a wrong type or a conflict raises at decoration
    time. See docs/workflows.md.
    """
    # ``**unknown`` only to say which options exist: ``@workflow(bogus=1)`` fails at that line.
    if unknown:
        raise TypeError(
            f"@workflow got unknown option(s) {', '.join(map(repr, sorted(unknown)))}; "
            f"it accepts {', '.join(OPTIONS)}"
        )
    options: dict[str, Any] = {
        "id": id,
        "name": name,
        "description": description,
        "queue": queue,
        "trigger_on_event": trigger_on_event,
        "batch_size": batch_size,
        "batch_timeout_seconds": batch_timeout_seconds,
        "schedule": schedule,
        "timezone": timezone,
        "on_start": on_start,
        "on_end": on_end,
        "state_schema": state_schema,
    }
    if fn is not None:
        return _define(fn, options)

    def wrap(f: Callable[..., Awaitable[Any]]) -> WorkflowDefinition[Any, Any]:
        return _define(f, options)

    return wrap


def get_workflow(workflow_id: str) -> WorkflowDefinition[Any, Any] | None:
    """The workflow registered as ``workflow_id`` in this process, or None."""
    return _REGISTRY.get(workflow_id)


def get_all_workflows() -> dict[str, WorkflowDefinition[Any, Any]]:
    """Every workflow defined in this process so far, by id (a copy)."""
    return dict(_REGISTRY)


__all__ = ["OPTIONS", "get_all_workflows", "get_workflow", "registered_workflows", "workflow"]
