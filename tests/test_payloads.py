"""Large payloads: values above the server's message limit go through the Object Store."""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Any

import orjson

from polos import Worker, WorkflowContext, workflow
from polos._private import jetstream as jsl
from polos._private import payloads

BIG = 10 * 1024 * 1024
CALLS: dict[str, int] = {}
GATE: dict[str, asyncio.Event] = {}


def make_big(seed: str) -> str:
    CALLS["big"] = CALLS.get("big", 0) + 1
    block = hashlib.sha256(seed.encode()).hexdigest()
    return (block * (BIG // len(block) + 1))[:BIG]


async def gate(run_id: str) -> bool:
    # The first worker blocks here until it is stopped; the second finds the gate open.
    event = GATE.setdefault(run_id, asyncio.Event())
    await event.wait()
    return True


@workflow
async def big_output(ctx: WorkflowContext, seed: str) -> dict[str, Any]:
    big = await ctx.step.run("big", make_big, seed)
    await ctx.step.run("gate", gate, ctx.run_id)
    return {"len": len(big), "sha": hashlib.sha256(big.encode()).hexdigest()}


@workflow
async def big_result(ctx: WorkflowContext, n: int) -> str:
    return await ctx.step.run("make", lambda: "y" * n)


async def test_ten_megabyte_step_output_round_trips_through_replay(
    env_factory: Any, settings: Any
) -> None:
    CALLS.clear()
    env = await env_factory([], with_worker=False)
    w1 = Worker([big_output], settings=settings.worker)
    await w1.start()
    handle = await env.client.start(big_output, "s1")
    t0 = time.perf_counter()
    while not any(
        isinstance(e, jsl.ev.StepCompleted) and e.key == "big"
        for _, e in await env.client.history(handle.run_id)
    ):
        await asyncio.sleep(0.05)
    first = time.perf_counter() - t0
    # Hand the run to a fresh worker mid-run: it must replay the 10 MB step from the store.
    await w1.stop(timeout=0)
    GATE.setdefault(handle.run_id, asyncio.Event()).set()
    t1 = time.perf_counter()
    async with Worker([big_output], settings=settings.worker):
        out = await handle.result(timeout=60)
    replay = time.perf_counter() - t1
    expected = make_big("s1")
    assert out == {"len": BIG, "sha": hashlib.sha256(expected.encode()).hexdigest()}
    assert CALLS["big"] == 2  # once in the run, once here to compute the expectation
    # The history holds a stub, not 10 MB; the object is in the run's payload bucket.
    msgs = await jsl.read_subject(
        env.client.nc, env.client.names.runs_stream, env.client.names.run_filter(handle.run_id)
    )
    stubs = [m for m in msgs if (m.headers or {}).get(payloads.HEADER)]
    assert len(stubs) == 1 and len(stubs[0].data) < 4096
    body = orjson.loads(stubs[0].data)
    assert body["output"] is None and body["$refs"]["output"].startswith(f"{handle.run_id}/")
    print(f"\n10 MB step: run + store {first:.2f}s, replay on a new worker + finish {replay:.2f}s, "
          f"stub {len(stubs[0].data)} bytes")


async def test_large_workflow_result_reaches_the_client(env_factory: Any) -> None:
    env = await env_factory([big_result])
    n = env.client.nc.max_payload + 1000
    handle = await env.client.start(big_result, n)
    out = await handle.result(timeout=30)
    assert out == "y" * n
    info = await env.client.get(handle.run_id)
    assert info.status == "completed" and info.output == out
    # The orchestrator's index saw the stubbed RunCompleted and still knows the run ended.
    while not await env.client.list_runs(status="completed"):
        await asyncio.sleep(0.02)
    # Removing a run's objects is retention's job (the service role's).
    removed = await payloads.delete_run(env.orchestrator.js, env.client.names, handle.run_id)
    # The step's output and the run's output are the same value: stored once (content address).
    assert removed == 1


async def test_small_events_stay_inline(env_factory: Any) -> None:
    env = await env_factory([big_result])
    handle = await env.client.start(big_result, 10)
    assert await handle.result(timeout=10) == "y" * 10
    msgs = await jsl.read_subject(
        env.client.nc, env.client.names.runs_stream, env.client.names.run_filter(handle.run_id)
    )
    assert not any((m.headers or {}).get(payloads.HEADER) for m in msgs)


@workflow
async def big_input(ctx: WorkflowContext, text: str) -> dict[str, Any]:
    n = await ctx.step.run("len", lambda: len(text))
    return {"len": n, "sha": hashlib.sha256(text.encode()).hexdigest()}


async def test_ten_megabyte_input_goes_through_the_object_store(env_factory: Any) -> None:
    env = await env_factory([big_input])
    text = make_big("input")
    handle = await env.client.start(big_input, text)
    out = await handle.result(timeout=60)
    assert out == {"len": BIG, "sha": hashlib.sha256(text.encode()).hexdigest()}
    [(_, requested), *_] = await env.client.history(handle.run_id)
    assert isinstance(requested, jsl.ev.RunRequested) and requested.input == text


async def test_bad_input_ref_is_refused_with_a_reason(env_factory: Any) -> None:
    env = await env_factory([big_input])
    p = env.settings.prefix
    inbox = env.client.nc.new_inbox()
    sub = await env.client.nc.subscribe(inbox)
    for ref in ("elsewhere/abc", 5, "r1/0000"):
        await env.client.js.publish(
            f"{p}.cmd.start.big_input", orjson.dumps({"run_id": "r1", "input_ref": ref}),
            headers={jsl.REPLY_HEADER: inbox},
        )
        reply = orjson.loads((await sub.next_msg(5)).data)
        assert reply["ok"] is False and reply["field"] == "input_ref", reply
    assert "missing" in reply["error"]
