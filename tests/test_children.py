"""Child workflows against a real nats-server: invoke, invoke_and_wait, fan-out/fan-in, a
child's failure as a catchable exception in the parent, the parent holding no worker."""

from __future__ import annotations

from typing import Any

import orjson

from polos import ChildWorkflowError, WorkflowContext, workflow
from polos._private.store import REPLY_HEADER
from tests.test_waiting import until_status


@workflow(name="c_square")
async def c_square(ctx: WorkflowContext, n: int) -> int:
    return await ctx.step.run("sq", lambda: n * n)


@workflow(name="c_boom")
async def c_boom(ctx: WorkflowContext, n: int) -> int:
    raise ValueError(f"boom {n}")


@workflow(name="c_slow")
async def c_slow(ctx: WorkflowContext, seconds: float) -> str:
    await ctx.step.sleep("nap", seconds)
    return "slept"


@workflow(name="p_one")
async def p_one(ctx: WorkflowContext, n: int) -> int:
    return int(await ctx.step.invoke_and_wait("child", c_square, n)) + 1


@workflow(name="p_fan")
async def p_fan(ctx: WorkflowContext, n: int) -> int:
    results = await ctx.step.batch_invoke_and_wait("fan", [(c_square, i) for i in range(n)])
    return sum(results)


@workflow(name="p_catch")
async def p_catch(ctx: WorkflowContext) -> dict[str, Any]:
    try:
        await ctx.step.invoke_and_wait("bad", c_boom, 7)
    except ChildWorkflowError as exc:
        return {
            "caught": exc.status,
            "type": exc.error.get("type"),
            "msg": exc.error.get("message"),
        }
    return {"caught": None}


@workflow(name="p_fire")
async def p_fire(ctx: WorkflowContext) -> str:
    handle = await ctx.step.invoke("start", c_square, 3)
    return handle.run_id


async def test_invoke_and_wait(env_factory: Any) -> None:
    env = await env_factory([p_one, c_square])
    handle = await env.client.start(p_one, 6)
    assert await handle.result(timeout=20) == 37
    history = await env.client.history(handle.run_id)
    child_ids = [e.children for _, e in history if type(e).__name__ == "RunSuspended"]
    assert len(child_ids) == 1
    child = await env.client.get(child_ids[0][0])
    assert child.parent_run_id == handle.run_id and child.output == 36


async def test_fan_out_fan_in(env_factory: Any) -> None:
    env = await env_factory([p_fan, c_square])
    handle = await env.client.start(p_fan, 10)
    assert await handle.result(timeout=30) == sum(i * i for i in range(10))


async def test_child_failure_is_catchable(env_factory: Any) -> None:
    env = await env_factory([p_catch, c_boom])
    handle = await env.client.start(p_catch)
    out = await handle.result(timeout=20)
    assert out == {"caught": "failed", "type": "ValueError", "msg": "boom 7"}


async def test_invoke_without_waiting(env_factory: Any) -> None:
    env = await env_factory([p_fire, c_square])
    handle = await env.client.start(p_fire)
    child_id = await handle.result(timeout=20)
    assert await env.client.get_handle(child_id).result(timeout=20) == 9


@workflow(name="p_slow")
async def p_slow(ctx: WorkflowContext) -> list[str]:
    return await ctx.step.batch_invoke_and_wait("kids", [(c_slow, 0.8), (c_slow, 0.8)])


async def test_parent_waits_without_a_worker(env_factory: Any) -> None:
    env = await env_factory([p_slow, c_slow])
    handle = await env.client.start(p_slow)
    await until_status(env, handle.run_id, "suspended")
    info = await env.client.get(handle.run_id)
    assert info.waiting and info.waiting["kind"] == "child"
    assert handle.run_id not in env.worker.active_runs
    assert await handle.result(timeout=20) == ["slept", "slept"]


async def test_child_request_subjects(env_factory: Any) -> None:
    """Requests go under the parent; the one-token form older workers sent is still accepted,
    and a parent in the subject that is not the body's is refused with the reason."""
    env = await env_factory([c_square])
    names = env.client.names
    inbox = env.client.nc.new_inbox()
    sub = await env.client.nc.subscribe(inbox)

    async def send(subject: str, body: dict[str, Any]) -> dict[str, Any]:
        await env.client.js.publish(subject, orjson.dumps(body), headers={REPLY_HEADER: inbox})
        answer: dict[str, Any] = orjson.loads((await sub.next_msg(10)).data)
        return answer

    body = {"workflow": "c_square", "input": 4, "parent_run_id": "pa", "parent_step": "s"}
    assert (await send(names.child_subject("pa", "kid1"), body))["ok"]
    assert (await send(f"{names.prefix}.cmd.child.kid2", body))["ok"]
    for kid in ("kid1", "kid2"):
        assert await env.client.get_handle(kid).result(timeout=20) == 16
        assert (await env.client.get(kid)).parent_run_id == "pa"
    refused = await send(names.child_subject("other", "kid3"), body)
    assert refused["ok"] is False and refused["field"] == "parent_run_id"
    assert "not the parent in the subject" in refused["error"]
