"""One execution of a workflow function with what surrounds it: its ``ctx.state`` (a
``state_schema``), its ``on_start`` hooks before, its ``on_end`` hooks after.

The hooks run through ``run_hooks``: each is a durable step (``on_start.<name>.<index>``), so
a replay (after a wait, on another worker after a crash) finds its recorded result and does not
call it again. ``on_start``'s ``modified_payload`` is merged into the input (validated again
as the function's input type); ``on_end``'s ``modified_output`` replaces the output.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pydantic

from polos._private.run.hooks import run_hooks
from polos.converter import from_json, to_json
from polos.errors import InputValidationError
from polos.middleware.hook import HookContext

if TYPE_CHECKING:
    from polos._private.model.values import WorkflowDefinition
    from polos._private.run.execution import RunExecution


def _hook_context(x: RunExecution, wf: WorkflowDefinition[Any, Any], **values: Any) -> HookContext:
    req = x.state.requested
    return HookContext(
        workflow_id=wf.name,
        session_id=req.session_id if req else None,
        user_id=req.user_id if req else None,
        **values,
    )


def init_state(x: RunExecution, wf: WorkflowDefinition[Any, Any]) -> None:
    """``ctx.state`` from the run's ``initial_state``; one that does not fit the schema fails
    the run with the fields that are wrong (``InputValidationError``)."""
    if wf.state_schema is None:
        return
    try:
        x.init_state()
    except pydantic.ValidationError as exc:
        from polos.converter import validation_errors

        raise InputValidationError(f"{wf.name} (initial_state)", validation_errors(exc)) from exc


async def run_workflow(
    x: RunExecution, wf: WorkflowDefinition[Any, Any], ctx: Any, value: Any
) -> Any:
    """The workflow's output: hooks, then the function, then hooks."""
    init_state(x, wf)
    if wf.on_start:
        shown = to_json(value, what=f"the input of workflow {wf.name!r}")
        started = await run_hooks(
            x, ctx, "on_start", wf.on_start, _hook_context(x, wf, current_payload=shown)
        )
        if started.modified_payload is not None:
            merged = (
                {**shown, **started.modified_payload}
                if isinstance(shown, dict)
                else started.modified_payload
            )
            value = from_json(merged, wf.input_type)
    output = await wf(ctx, value)
    if wf.on_end:
        ended = await run_hooks(
            x,
            ctx,
            "on_end",
            wf.on_end,
            _hook_context(
                x,
                wf,
                current_payload=to_json(value, what=f"the input of workflow {wf.name!r}"),
                current_output=to_json(output, what=f"the output of workflow {wf.name!r}"),
            ),
        )
        if ended.modified_output is not None:
            output = from_json(ended.modified_output, wf.output_type)
    return output


__all__ = ["init_state", "run_workflow"]
