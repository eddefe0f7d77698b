"""The original Polos's exception names are the classes user code catches: in a workflow
(``StepExecutionError`` around a step, an expired wait, a failed child) and around a run's
result (``WorkflowTimeoutError``, ``RuntimeError`` for a failed run), on a real stack under
auth (a worker as the worker role, the client as the client role)."""

from __future__ import annotations

from typing import Any

import pytest

import polos
from polos import (
    NO_RETRY,
    ChildWorkflowError,
    PolosError,
    StepExecutionError,
    StepFailedError,
    WaitTimeoutError,
    WorkflowContext,
    WorkflowFailedError,
    WorkflowTimeoutError,
    workflow,
)


def test_workflow_timeout_error_is_the_originals() -> None:
    exc = WorkflowTimeoutError(execution_id="r1", timeout_seconds=30)
    assert str(exc) == "Execution timed out after 30 seconds (execution_id: r1)"
    assert exc.execution_id == exc.run_id == "r1" and exc.timeout_seconds == 30
    assert str(WorkflowTimeoutError()) == "Execution timed out after None seconds"
    assert isinstance(exc, TimeoutError) and isinstance(exc, PolosError)
    # One concept, one class: ours that say more are the original's, subclassed.
    for ours in (StepFailedError, WaitTimeoutError, ChildWorkflowError):
        assert issubclass(ours, StepExecutionError)
    assert issubclass(WorkflowFailedError, RuntimeError)
    assert StepExecutionError("why").reason == "why"
    assert {"StepExecutionError", "WorkflowTimeoutError"} <= set(polos.__all__)


def flaky() -> str:
    raise ValueError("card declined")


@workflow(name="err_child")
async def err_child(ctx: WorkflowContext) -> None:
    await ctx.step.run("fail", flaky, retry=NO_RETRY)


@workflow(name="err_catches")
async def err_catches(ctx: WorkflowContext) -> list[str]:
    caught: list[str] = []
    for what, call in (
        ("step", lambda: ctx.step.run("charge", flaky, retry=NO_RETRY)),
        ("wait", lambda: ctx.step.wait_for_event("never", topic="no.one", timeout=0.2)),
        ("child", lambda: ctx.step.invoke_and_wait("child", err_child)),
    ):
        try:
            await call()
        except StepExecutionError as exc:
            caught.append(f"{what}:{type(exc).__name__}:{bool(exc.reason)}")
    return caught


@workflow(name="err_waits")
async def err_waits(ctx: WorkflowContext) -> str:
    await ctx.step.suspend("approval")
    return "done"


async def test_user_code_catches_the_originals_names(env_factory: Any) -> None:
    env = await env_factory([err_catches, err_child, err_waits])
    caught = await (await env.client.start(err_catches)).result(timeout=60)
    assert caught == [
        "step:StepFailedError:True",
        "wait:WaitTimeoutError:True",
        "child:ChildWorkflowError:True",
    ]

    waiting = await env.client.start(err_waits)
    with pytest.raises(WorkflowTimeoutError) as info:
        await waiting.result(timeout=0.5)
    assert info.value.execution_id == waiting.run_id and info.value.timeout_seconds == 0.5
    assert (
        str(info.value) == f"Execution timed out after 0.5 seconds (execution_id: {waiting.run_id})"
    )
    try:
        await waiting.result(timeout=0.2)
    except TimeoutError as exc:  # code written for the builtin keeps working
        assert isinstance(exc, WorkflowTimeoutError)

    failed = await env.client.start(err_child)
    with pytest.raises(RuntimeError) as ran:  # what the original raised for a failed run
        await failed.result(timeout=60)
    assert isinstance(ran.value, WorkflowFailedError) and "card declined" in str(ran.value)
