"""The original Polos's client side, under authentication, each part as the role that uses it:
``Polos`` (client and worker in one object), ``Workflow.run`` / ``.invoke``, the
``PolosClient`` methods and ``ExecutionHandle``, the original ``Worker(...)`` constructor."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import orjson
import pydantic
import pytest

from polos import (
    CommandRejectedError,
    ExecutionHandle,
    Polos,
    PolosClient,
    RunHandle,
    RunNotFoundError,
    Worker,
    WorkflowCancelledError,
    WorkflowContext,
    batch_invoke,
    workflow,
)
from polos._private import limits
from polos.testing import PolosEnvironment, RoleSettings
from tests.helpers import ROOT, until

pytestmark = pytest.mark.slow


class Order(pydantic.BaseModel):
    id: str
    amount: int


class Priced(pydantic.BaseModel):
    id: str
    total: int


@workflow(name="pc_order")
async def pc_order(ctx: WorkflowContext, order: Order) -> Priced:
    total = await ctx.step.run("price", lambda: order.amount * 2)
    return Priced(id=order.id, total=total)


@workflow(name="pc_double")
async def pc_double(ctx: WorkflowContext, n: int) -> int:
    return n * 2


@workflow(name="pc_review")
async def pc_review(ctx: WorkflowContext, item: str) -> dict[str, Any]:
    answer = await ctx.step.suspend("review", data={"item": item})
    return {"item": item, "approved": answer.data["approved"]}


@workflow(name="pc_parent")
async def pc_parent(ctx: WorkflowContext, item: str) -> dict[str, Any]:
    checked = await ctx.step.run("check", lambda: f"checked {item}")
    review = await ctx.step.invoke_and_wait("child", pc_review, item)
    return {"checked": checked, **review}


class Tally(pydantic.BaseModel):
    count: int = 0


@workflow(id="pc_who", state_schema=Tally)
async def pc_who(ctx: WorkflowContext, n: int) -> dict[str, Any]:
    ctx.state.count += n
    await ctx.step.run("mark", lambda: None)
    return {"session": ctx.session_id, "user": ctx.user_id, "count": ctx.state.count}


@workflow(name="pc_hold")
async def pc_hold(ctx: WorkflowContext) -> str:
    await ctx.step.suspend("forever")
    return "never"


async def _waiting_at(client: PolosClient, key: str, workflow: str) -> str:
    """The run id of the run of ``workflow`` suspended at ``key``."""
    found: list[str] = []

    async def look() -> bool:
        found[:] = [
            r.run_id
            for r in await client.waiting()
            if r.workflow == workflow and (r.waiting or {}).get("step") == key
        ]
        return bool(found)

    for _ in range(400):
        if await look():
            return found[0]
        await asyncio.sleep(0.05)
    raise AssertionError(f"no run of {workflow} waits at {key!r}")


async def test_polos_is_a_client_and_a_worker(
    stack: PolosEnvironment, settings: RoleSettings
) -> None:
    async with Polos(settings=settings) as polos:
        assert isinstance(polos, PolosClient)
        await polos.start()  # idempotent
        # Discovered: every workflow defined in the process, the agents' workflow too.
        assert polos.worker is not None
        assert {"pc_order", "pc_review", "polos_agent"} <= set(polos.worker.workflows)
        # As the worker role it serves, as the client role it asks.
        assert polos.worker_settings is not None
        assert polos.worker_settings.nats_url == settings.worker.nats_url
        assert polos.settings.nats_url == settings.client.nats_url

        priced = await pc_order.run(polos, Order(id="A-1", amount=21))
        assert priced == Priced(id="A-1", total=42)

        handle = await pc_order.invoke(polos, {"id": "A-2", "amount": 5})
        assert isinstance(handle, ExecutionHandle) and RunHandle is ExecutionHandle
        assert handle.id == handle.run_id and handle.workflow_id == "pc_order"
        assert handle.root_execution_id == handle.id and handle.root_workflow_id == "pc_order"
        assert "ExecutionHandle(id=" in repr(handle) and "session_id" not in repr(handle)
        assert handle.to_dict()["id"] == handle.id
        assert await handle.result(timeout=20) == Priced(id="A-2", total=10)
        got = await handle.get(polos)
        assert got["status"] == "completed" and got["result"] == Priced(id="A-2", total=10)
        assert got["output_schema_name"] == f"{__name__}.Priced"

        doc = await polos.get_execution(handle.id)
        assert doc["status"] == "completed" and doc["workflow_id"] == "pc_order"
        assert doc["payload"] == {"id": "A-2", "amount": 5}
        assert doc["result"] == {"id": "A-2", "total": 10}  # the raw JSON, as the API's
        assert doc["error"] is None and doc["retry_count"] == 0
        assert doc["created_at"] and doc["completed_at"] and doc["started_at"]
        assert doc["root_execution_id"] == handle.id and doc["queue_name"] == "pc_order"

        # By name, the original's client call; the same run a plain client can follow.
        h2 = await polos.invoke("pc_double", 4)
        assert await stack.client.get_handle(h2.id).result(timeout=20) == 8
    assert polos.worker is None  # stopped
    with pytest.raises(RuntimeError, match="not started"):
        _ = Polos(settings=settings).nc


async def test_get_execution_of_a_failed_and_an_unknown_run(
    stack: PolosEnvironment, settings: RoleSettings
) -> None:
    async with Polos(settings=settings) as polos:
        with pytest.raises(ValueError, match="requires a payload"):
            await pc_order.invoke(polos)
        bad = await polos.invoke("pc_order", {"id": "B-1"})  # no amount: refused by the worker
        with pytest.raises(Exception, match="amount"):
            await bad.result(timeout=20)
        doc = await polos.get_execution(bad.id)
        assert doc["status"] == "failed" and "amount" in doc["error"]
        with pytest.raises(RunNotFoundError):
            await polos.get_execution("no-such-run")


async def test_resume_in_the_original_shape_reaches_the_suspended_child(
    stack: PolosEnvironment, settings: RoleSettings
) -> None:
    async with Polos(settings=settings) as polos:
        handle = await pc_parent.invoke(polos, "deploy")
        child = await _waiting_at(polos, "review", "pc_review")
        assert (await polos.get_execution(child))["status"] == "waiting"
        assert (await polos.get_execution(child))["parent_execution_id"] == handle.id
        # The original resumes with the root's ids; the suspended descendant is found.
        await polos.resume(
            suspend_workflow_id=handle.root_workflow_id,
            suspend_execution_id=handle.root_execution_id,
            suspend_step_key="review",
            data={"approved": True},
        )
        assert await handle.result(timeout=20) == {
            "checked": "checked deploy",
            "item": "deploy",
            "approved": True,
        }
        # Positionally too, (workflow, execution, key, data); and ours, (run_id, key, data).
        h2 = await pc_review.invoke(polos, "a")
        await _waiting_at(polos, "review", "pc_review")
        await polos.resume("pc_review", h2.id, "review", {"approved": False})
        assert (await h2.result(timeout=20))["approved"] is False
        h3 = await pc_review.invoke(polos, "b")
        await _waiting_at(polos, "review", "pc_review")
        await polos.resume(h3.id, "review", {"approved": True})
        assert (await h3.result(timeout=20))["approved"] is True
        with pytest.raises(TypeError, match="resume takes"):
            await polos.resume(h3.id)


async def test_cancel_execution_true_then_false(
    stack: PolosEnvironment, settings: RoleSettings
) -> None:
    async with Polos(settings=settings) as polos:
        handle = await pc_hold.invoke(polos)
        await _waiting_at(polos, "forever", "pc_hold")
        assert await handle.cancel(polos) is True
        with pytest.raises(WorkflowCancelledError):
            await handle.result(timeout=20)
        assert (await polos.get_execution(handle.id))["status"] == "cancelled"
        assert await polos.cancel_execution(handle.id) is False  # already finished
        with pytest.raises(CommandRejectedError):
            await polos.cancel(handle.id)  # ours says why


class BatchItem(pydantic.BaseModel):
    """Shaped as the original's BatchWorkflowInput."""

    id: str
    payload: Any = None


async def test_batch_invoke_queue_limit_and_refused_options(
    stack: PolosEnvironment, settings: RoleSettings
) -> None:
    async with Polos(settings=settings) as polos:
        handles = await polos.batch_invoke(
            [
                {"id": "pc_double", "payload": 1},
                ("pc_double", 2),
                BatchItem(id="pc_double", payload=3),
                (pc_double, 4),
            ]
        )
        assert [await h.result(timeout=20) for h in handles] == [2, 4, 6, 8]
        assert await batch_invoke(polos, []) == []
        with pytest.raises(TypeError, match="batch_invoke item 0"):
            await polos.batch_invoke([42])

        h = await polos.invoke(
            "pc_double", 5, queue_name="pc-lane", queue_concurrency_limit=2, concurrency_key="k"
        )
        assert await h.result(timeout=20) == 10
        kv = await polos.js.key_value(polos.names.queues_bucket)
        entry = await kv.get(limits.queue_key("pc-lane"))
        assert orjson.loads(entry.value)["concurrency"] == 2
        assert (await polos.get_execution(h.id))["concurrency_key"] == "k"

        # The run's session, user and first state travel with the start command.
        h = await polos.invoke("pc_who", 2, session_id="s-1", user_id="u-1")
        assert await h.result(timeout=20) == {"session": "s-1", "user": "u-1", "count": 2}
        assert await pc_who.run(polos, 3, initial_state={"count": 10}, user_id="u-2") == {
            "session": None,
            "user": "u-2",
            "count": 13,
        }
        [b] = await polos.batch_invoke([("pc_who", 1)], session_id="s-2")
        assert (await b.result(timeout=20))["session"] == "s-2"
        with pytest.raises(ValueError, match="run_timeout_seconds not supported"):
            await polos.invoke("pc_double", 1, run_timeout_seconds=5)
        with pytest.raises(ValueError, match="needs queue_name"):
            await polos.invoke("pc_double", 1, queue_concurrency_limit=3)
        with pytest.raises(TimeoutError):
            await pc_hold.run(polos, timeout=0.5)


def test_polos_refuses_what_means_nothing_here() -> None:
    with pytest.raises(ValueError, match=r"api_key=\.\.\.\) is not supported"):
        Polos(api_key="k")
    with pytest.raises(ValueError, match=r"port=\.\.\.\) is not supported"):
        Polos(port=8000)
    with pytest.raises(ValueError, match="deployment_id"):
        Polos(deployment_id="default")
    with pytest.raises(ValueError, match="channels"):
        Polos(channels=[object()])
    with pytest.raises(ValueError, match="not to an HTTP orchestrator"):
        Polos(api_url="http://localhost:8080")
    with pytest.raises(ValueError, match="at least 1"):
        Polos(max_concurrent_workflows=0)
    for option in ("deployment_id", "mode", "worker_server_url", "channels"):
        with pytest.raises(ValueError, match=f"Worker\\({option}=...\\) is not supported"):
            Worker([pc_double], **{option: "x"})
    with pytest.raises(TypeError, match="not an Agent"):
        Worker([pc_double], agents=["x"])


async def test_the_original_worker_constructor(
    stack: PolosEnvironment, settings: RoleSettings
) -> None:
    # Worker(client, workflows=..., max_concurrent_workflows=...): it connects where the client
    # does, so the client carries the worker role's credentials.
    async with await PolosClient.connect(settings=settings.worker) as as_worker:
        worker = Worker(as_worker, workflows=[pc_double], max_concurrent_workflows=3)
        assert worker.max_concurrent_runs == 3 and worker.settings == settings.worker
        await worker.start()
        try:
            h = await stack.client.start(pc_double, 21)
            assert await h.result(timeout=20) == 42
        finally:
            await worker.shutdown()
    # From a Polos: its worker's credentials, whatever its client role is.
    polos = Polos(settings=settings)
    async with polos:
        w = Worker(client=polos, workflows=[pc_order])
        assert w.settings.nats_url == settings.worker.nats_url


async def test_polos_serve_until_sigterm_with_log_file(
    stack: PolosEnvironment, settings: RoleSettings, tmp_path: Path, subprocess_env: Any
) -> None:
    """A process that only serves (`await polos.serve()`), as the original's examples do; its
    log goes to the file, SIGTERM ends it cleanly, its work is done on the way."""
    script = tmp_path / "serve.py"
    log = tmp_path / "polos.log"
    script.write_text(
        textwrap.dedent(f"""
        import asyncio
        from polos import Polos, WorkflowContext, workflow

        @workflow(name="pc_served")
        async def pc_served(ctx: WorkflowContext, n: int) -> int:
            return await ctx.step.run("inc", lambda: n + 1)

        asyncio.run(Polos(log_file={str(log)!r}).serve())
        """)
    )
    env = subprocess_env.as_role("worker")  # one user for both: the worker role may start runs
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        env=env,
        cwd=str(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        await until(lambda: log.exists() and "Polos started" in log.read_text(), 60, "serve")
        h = await stack.client.start("pc_served", 41)
        assert await h.result(timeout=20) == 42
        proc.send_signal(signal.SIGTERM)
        out, _ = await asyncio.to_thread(proc.communicate, timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out.decode()
    assert b"Traceback" not in out and out.strip() == b"", out.decode()  # all in the log
    assert "pc_served" in log.read_text()
    assert ROOT.exists()
