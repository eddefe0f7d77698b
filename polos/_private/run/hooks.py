"""Running hooks as durable steps: one implementation for workflow, agent and tool hooks."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from polos.errors import StepExecutionError
from polos.middleware.hook import HookAction, HookContext, HookFunction, HookResult

if TYPE_CHECKING:
    from polos._private.run.execution import RunExecution


def _hook_name(fn: HookFunction, index: int) -> str:
    name = getattr(fn, "__name__", "")
    return name if name and name != "<lambda>" else f"hook_{index}"


async def run_hooks(
    execution: RunExecution,
    ctx: Any,
    phase: str,
    hooks: Sequence[HookFunction],
    context: HookContext,
) -> HookResult:
    """Run ``hooks`` in order, each as the durable step ``<phase>.<name>.<index>``, and return
    what they decided together: the payload modifications merged in order, the last output
    modification, or the first failure.

    A FAIL stops the chain and raises ``StepExecutionError`` with the hook's message (the
    original SDK meant to and never did). A hook that returns something else than a
    ``HookResult`` (``None`` counts as continue) fails the run naming the hook.
    """
    payload: dict[str, Any] | None = None
    output: Any = None
    have_output = False
    for index, fn in enumerate(hooks):
        name = _hook_name(fn, index)
        seen = context.model_copy(deep=True)
        if payload is not None and isinstance(seen.current_payload, dict):
            seen.current_payload = {**seen.current_payload, **payload}
        if have_output:
            seen.current_output = output

        async def call(
            fn: HookFunction = fn, seen: HookContext = seen, name: str = name
        ) -> HookResult:
            result = fn(ctx, seen)
            if inspect.isawaitable(result):
                result = await result
            if result is None:
                return HookResult()
            if not isinstance(result, HookResult):
                return HookResult.fail(
                    f"hook {name!r} returned {type(result).__name__}; a hook returns a "
                    "HookResult (or None to continue)"
                )
            return result

        call.__qualname__ = f"hook:{getattr(fn, '__qualname__', name)}"
        result = await execution.run_step(f"{phase}.{name}.{index}", call, (), {}, None)
        if result.action == HookAction.FAIL:
            raise StepExecutionError(result.error_message or f"hook {name!r} failed the run")
        if result.modified_payload is not None:
            payload = {**(payload or {}), **copy.deepcopy(result.modified_payload)}
        if result.modified_output is not None:
            output = result.modified_output
            have_output = True
    return HookResult(modified_payload=payload, modified_output=output if have_output else None)
