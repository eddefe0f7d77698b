"""``on_start`` / ``on_end`` hooks and ``state_schema`` + ``ctx.state`` + ``initial_state``
across a SIGKILLed worker process, under authentication (the worker as the worker role):
counters prove each hook ran once, each completed step once, and the state was restored from
the run's history, not recomputed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from polos import (
    HookContext,
    HookResult,
    WorkflowContext,
    WorkflowFailedError,
    WorkflowState,
    hook,
    workflow,
)
from polos import history as ev
from polos._private.store import MSG_ID
from tests.helpers import counts, kill, marks, spawn, stop, until
from tests.test_cli import apolos
from tests.test_waiting import until_status

pytestmark = pytest.mark.slow

WORKER = ["-m", "polos_services.worker", "tests.workflows.parity"]


async def _start(env: Any, workflow: str, run_id: str, body: dict[str, Any]) -> Any:
    # What the original's invoke(initial_state=...) sends: a start command with initial_state.
    await env.client.js.publish(
        f"{env.prefix}.cmd.start.{workflow}",
        orjson.dumps({"run_id": run_id, **body}),
        headers={MSG_ID: f"start/{run_id}", "Polos-Client": "test"},
    )
    return env.client.get_handle(run_id)


async def test_hooks_and_state_survive_a_sigkilled_worker(
    env_factory: Any, subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    log = tmp_path / "marks.log"
    subprocess_env["POLOS_TEST_LOG"] = str(log)
    env = await env_factory([], with_worker=False)
    w1 = spawn(WORKER, subprocess_env.as_role("worker"), tmp_path / "w1.out")
    w2 = None
    try:
        handle = await _start(
            env,
            "p_stateful",
            "stateful-1",
            {"input": {"steps": 5, "seconds": 0.3, "tag": "t"}, "initial_state": {"count": 10}},
        )
        await until(lambda: "start 3" in marks(log), 30, "step 3 to start")
        kill(w1)  # mid-step 3, after on_start and two steps
        w2 = spawn(WORKER, subprocess_env.as_role("worker"), tmp_path / "w2.out")
        out = await handle.result(timeout=40)
    finally:
        stop(w1)
        if w2:
            stop(w2)
    assert out == {
        "tag": "seen:t",  # on_start's modified payload, merged into the input
        "count": 15,  # from initial_state 10, five steps
        "items": [1, 2, 3, 4, 5],
        "first_pid": w1.pid,  # restored from the history on the second worker
        "retry_count": 1,
        "audited": True,  # on_end's modified output
    }
    lines = marks(log)
    assert lines.count("hook on_start") == 1, lines  # recorded: not re-run on replay
    assert lines.count("hook on_end") == 1, lines
    started, done = counts(log)
    for i in map(str, range(1, 6)):
        assert done[i] == 1 and 1 <= started[i] <= (2 if i == "3" else 1), lines
    history = [e for _, e in await env.client.history(handle.run_id)]
    snaps = [e for e in history if isinstance(e, ev.StepCompleted) and e.kind == "state"]
    # Recorded where it changed: not at the hook (still the initial state), then at each step.
    assert [s.key for s in snaps] == [f"state@s{i}" for i in range(1, 6)]
    assert [s.output["count"] for s in snaps] == [11, 12, 13, 14, 15]
    assert snaps[-1].output["count"] == 15 and snaps[-1].output["first_pid"] == w1.pid
    hooks = [e.key for e in history if isinstance(e, ev.StepCompleted) and e.kind == "run"]
    assert hooks[0] == "on_start.audit_start.0" and hooks[-1] == "on_end.audit_end.0"
    # The snapshots are in the run's timeline as `polos show` prints it.
    show = await apolos("show", handle.run_id, "--json", env=subprocess_env)
    assert show.returncode == 0, show.stderr
    assert "state@s5" in show.stdout and '"first_pid"' in show.stdout.replace(" ", "")


class Strict(WorkflowState):
    limit: int


@hook
def refuse(ctx: WorkflowContext, hc: HookContext) -> HookResult:
    return HookResult.fail("blocked by policy")


@workflow(id="p_strict", state_schema=Strict)
async def p_strict(ctx: WorkflowContext) -> int:
    return ctx.state.limit


@workflow(id="p_refused", on_start=[refuse])
async def p_refused(ctx: WorkflowContext) -> str:
    return "never"


@workflow(id="p_stateless")
async def p_stateless(ctx: WorkflowContext) -> Any:
    return ctx.state


async def test_bad_initial_state_a_failing_hook_and_no_schema_fail_clearly(
    env_factory: Any,
) -> None:
    env = await env_factory([p_strict, p_refused, p_stateless])
    ok = await _start(env, "p_strict", "strict-ok", {"initial_state": {"limit": 3}})
    assert await ok.result(timeout=20) == 3
    bad = await _start(env, "p_strict", "strict-bad", {"initial_state": {"limit": "many"}})
    with pytest.raises(WorkflowFailedError, match="limit"):
        await bad.result(timeout=20)
    with pytest.raises(WorkflowFailedError, match="blocked by policy"):
        await (await env.client.start(p_refused)).result(timeout=20)
    with pytest.raises(WorkflowFailedError, match="has no state"):
        await (await env.client.start(p_stateless)).result(timeout=20)


class Ticket(WorkflowState):
    opened_by: int | None = None
    approvals: int = 0


TOKENS = iter(range(1000, 2000))


@workflow(id="p_ticket", state_schema=Ticket)
async def p_ticket(ctx: WorkflowContext) -> dict[str, Any]:
    if ctx.state.opened_by is None:
        ctx.state.opened_by = next(TOKENS)  # differs on every execution: restored, not redone
    for i in range(2):
        answer = await ctx.step.suspend(f"approve-{i}")
        ctx.state.approvals += int(bool(answer.data))
    return ctx.state.model_dump()


async def test_state_across_suspends_is_the_recorded_one(env_factory: Any) -> None:
    env = await env_factory([p_ticket])
    handle = await env.client.start(p_ticket)
    await until_status(env, handle.run_id, "suspended")
    # The second resume may come before the run suspends there: it is kept until it does.
    for i in range(2):
        await env.client.resume(handle.run_id, f"approve-{i}", True)
    out = await handle.result(timeout=20)
    keys = [
        e.key
        for _, e in await env.client.history(handle.run_id)
        if isinstance(e, ev.StepCompleted) and e.kind == "state"
    ]
    assert keys == ["state@approve-0", "state@approve-1", "state@end"]
    assert out == {"opened_by": 1000, "approvals": 2}  # three executions, one opening


@workflow(id="p_budget", state_schema=Strict)
async def p_budget(ctx: WorkflowContext, spend: int) -> int:
    ctx.state.limit -= spend
    return ctx.state.limit


@workflow(id="p_spender")
async def p_spender(ctx: WorkflowContext) -> list[int]:
    left = await ctx.step.invoke_and_wait("spend", p_budget, 3, initial_state=Strict(limit=10))
    started = await ctx.step.invoke("spend-more", "p_budget", 4, initial_state={"limit": 5})
    return [left, started.id == started.run_id]  # type: ignore[list-item]


async def test_a_child_starts_from_the_initial_state_it_is_given(env_factory: Any) -> None:
    env = await env_factory([p_spender, p_budget])
    handle = await env.client.start(p_spender)
    assert await handle.result(timeout=20) == [7, True]
    from polos._private.run.waits import child_run_id

    assert (
        await env.client.get_handle(child_run_id(handle.run_id, "spend-more", 0)).result(timeout=20)
        == 1
    )
