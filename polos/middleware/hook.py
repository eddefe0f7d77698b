"""Hooks: user functions that run at fixed points of a workflow, an agent or a tool.

A hook is ``(ctx, hook_context: HookContext) -> HookResult`` (sync or async), marked with
``@hook``. It may observe (``HookContext``) and change what happens next (``HookResult``):
continue, continue with a modified payload or output, or fail the run. Every hook runs as a
durable step, so on replay its recorded result is used and the hook is not called again.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict

__all__ = ["HookAction", "HookContext", "HookResult", "hook"]


class HookAction(StrEnum):
    """What the run does after a hook: go on, or stop with the hook's error message."""

    CONTINUE = "continue"
    FAIL = "fail"


class HookContext(BaseModel):
    """What a hook sees. ``current_payload`` is the input of the thing hooked (the workflow's
    payload, an agent step's ``{"step": n, "messages": [...]}``, a tool's arguments);
    ``current_output`` its result, for the hooks that run after it."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    workflow_id: str
    session_id: str | None = None
    user_id: str | None = None
    # The agent's configuration and its steps so far; unset for workflow hooks.
    agent_config: Any | None = None
    steps: list[Any] = []
    current_tool: str | None = None
    current_payload: Any | None = None
    current_output: Any | None = None

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HookContext:
        return cls.model_validate(data)


class HookResult(BaseModel):
    """A hook's answer. ``modified_payload`` (a dict) is merged into the payload of what is
    hooked, ``modified_output`` replaces its output; ``fail(message)`` stops the run."""

    model_config = ConfigDict(use_enum_values=True)

    action: HookAction = HookAction.CONTINUE
    modified_payload: dict[str, Any] | None = None
    modified_output: Any | None = None
    error_message: str | None = None

    @classmethod
    def continue_with(cls, **modifications: Any) -> HookResult:
        """Go on, with ``modified_payload=...`` and/or ``modified_output=...``."""
        unknown = set(modifications) - {"modified_payload", "modified_output"}
        if unknown:
            raise TypeError(
                f"HookResult.continue_with() got {', '.join(sorted(unknown))}; "
                "it accepts modified_payload and modified_output"
            )
        return cls(action=HookAction.CONTINUE, **modifications)

    @classmethod
    def fail(cls, message: str) -> HookResult:
        """Stop: the run fails with ``message`` (``StepExecutionError``)."""
        return cls(action=HookAction.FAIL, error_message=message)


HookFunction = Callable[..., Any]


def hook(func: HookFunction | None = None) -> Any:
    """Mark ``func(ctx, hook_context)`` as a hook: ``@hook`` or ``@hook()``. The signature is
    checked here, so a hook with the wrong parameters fails at import, not mid-run."""

    def mark(fn: HookFunction) -> HookFunction:
        if not callable(fn):
            raise TypeError(f"@hook needs a function, got {fn!r}")
        params = [
            p
            for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        if len(params) != 2:
            raise TypeError(
                f"hook {getattr(fn, '__qualname__', fn)!r} takes {len(params)} positional "
                "parameters; a hook takes exactly two: (ctx, hook_context)"
            )
        fn.__polos_hook__ = True  # type: ignore[attr-defined]
        return fn

    return mark if func is None else mark(func)


def check_hooks(hooks: Any, *, where: str) -> list[HookFunction]:
    """The hooks option as a list (one callable or a list of them), each checked as ``@hook``
    would; anything else raises naming ``where``."""
    if hooks is None:
        return []
    items = list(hooks) if isinstance(hooks, list | tuple) else [hooks]
    for item in items:
        if not callable(item):
            raise TypeError(f"{where}: a hook must be a function (ctx, hook_context), got {item!r}")
        hook(item)
    return items
