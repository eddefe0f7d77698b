"""Large payloads: values above the server's message limit go through the Object Store."""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from typing import Any

import orjson

from polos import Worker, WorkflowContext, workflow
from polos import history as ev
from polos._private.store import REPLY_HEADER, StoredMsg, payloads, read_subject
from polos.testing import PolosEnvironment as Stack
from tests.test_waiting import until_status

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
        isinstance(e, ev.StepCompleted) and e.key == "big"
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
    msgs = await read_subject(
        env.client.nc, env.client.names.runs_stream, env.client.names.run_filter(handle.run_id)
    )
    stubs = [m for m in msgs if (m.headers or {}).get(payloads.HEADER)]
    assert len(stubs) == 1 and len(stubs[0].data) < 4096
    body = orjson.loads(stubs[0].data)
    assert body["output"] is None and body["$refs"]["output"].startswith(f"{handle.run_id}/")
    print(
        f"\n10 MB step: run + store {first:.2f}s, replay on a new worker + finish {replay:.2f}s, "
        f"stub {len(stubs[0].data)} bytes"
    )


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
    msgs = await read_subject(
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
    assert isinstance(requested, ev.RunRequested) and requested.input == text


async def test_bad_input_ref_is_refused_with_a_reason(env_factory: Any) -> None:
    env = await env_factory([big_input])
    p = env.settings.prefix
    inbox = env.client.nc.new_inbox()
    sub = await env.client.nc.subscribe(inbox)
    for ref in ("elsewhere/abc", 5, "r1/0000"):
        await env.client.js.publish(
            f"{p}.cmd.start.big_input",
            orjson.dumps({"run_id": "r1", "input_ref": ref}),
            headers={REPLY_HEADER: inbox},
        )
        reply = orjson.loads((await sub.next_msg(5)).data)
        assert reply["ok"] is False and reply["field"] == "input_ref", reply
    assert "missing" in reply["error"]


# --------------------------------------------------------------------------- resumes and events
#
# Under authentication, each process on its role's user: the client stores the big value, the
# orchestrator (service) reads it and wakes the run, workers replay it.


def _sha(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


@workflow
async def big_approval(ctx: WorkflowContext) -> dict[str, Any]:
    got = await ctx.step.suspend("approve")
    recorded = await ctx.step.run("digest", lambda: _sha(got.data["text"]))
    await ctx.step.run("gate", gate, ctx.run_id)
    # Computed from the replayed value on whichever worker finishes the run.
    return {"len": len(got.data["text"]), "sha": _sha(got.data["text"]), "recorded": recorded}


@workflow
async def big_pickup(ctx: WorkflowContext, topic: str) -> dict[str, Any]:
    got = await ctx.step.wait_for_event("pickup", topic=topic)
    recorded = await ctx.step.run("digest", lambda: _sha(got.data))
    await ctx.step.run("gate", gate, ctx.run_id)
    return {"len": len(got.data), "sha": _sha(got.data), "recorded": recorded}


@workflow(trigger_on_event="big.drop")
async def big_triggered(ctx: WorkflowContext, event: dict[str, Any]) -> dict[str, Any]:
    return {"len": len(event["data"]), "sha": _sha(event["data"])}


async def _finish_on_a_second_worker(
    stack: Stack, first: Worker, run_id: str, wfs: list[Any]
) -> Any:
    """Wait for the run to record its digest on ``first``, stop it, finish on a new worker."""
    deadline = time.monotonic() + 60
    while not any(
        isinstance(e, ev.StepCompleted) and e.key == "digest"
        for _, e in await stack.client.history(run_id)
    ):
        assert time.monotonic() < deadline, "the run never recorded its digest"
        await asyncio.sleep(0.05)
    await stack.stop_worker(first, timeout=0)
    GATE.setdefault(run_id, asyncio.Event()).set()
    await stack.add_worker(wfs)
    return await stack.client.get_handle(run_id).result(timeout=60)


async def _stored(stack: Stack, stream: str, subject: str) -> list[StoredMsg]:
    # As the service: only services read the command stream.
    return await read_subject(stack.orchestrator.nc, stream, subject)


async def test_ten_megabyte_resume_round_trips_through_replay(stack: Stack) -> None:
    w1 = await stack.add_worker([big_approval])
    handle = await stack.client.start(big_approval)
    await until_status(stack, handle.run_id, "suspended")
    text = make_big("resume")
    answer = await stack.client.resume(handle.run_id, "approve", {"text": text})
    assert answer["status"] == "resumed"
    out = await _finish_on_a_second_worker(stack, w1, handle.run_id, [big_approval])
    assert out == {"len": BIG, "sha": _sha(text), "recorded": _sha(text)}
    # The command carried a reference, not 10 MB; the wake names the very same object.
    names = stack.client.names
    [cmd] = await _stored(stack, names.cmd_stream, f"{names.prefix}.cmd.resume.{handle.run_id}.>")
    ref = orjson.loads(cmd.data)["data_ref"]
    assert len(cmd.data) < 200 and ref.startswith(f"{handle.run_id}/")
    woken = [
        m
        for m in await _stored(stack, names.runs_stream, names.run_filter(handle.run_id))
        if (m.headers or {}).get(payloads.HEADER) and b"RunWoken" in m.data
    ]
    assert len(woken) == 1 and len(woken[0].data) < 4096
    assert orjson.loads(woken[0].data)["$refs"] == {"output.data": ref}


async def test_ten_megabyte_event_round_trips_through_replay(stack: Stack) -> None:
    topic = f"big.pickup/{uuid.uuid4().hex[:6]}"
    w1 = await stack.add_worker([big_pickup, big_triggered])
    handle = await stack.client.start(big_pickup, topic)
    await until_status(stack, handle.run_id, "suspended")
    text = make_big("event")
    seq = await stack.client.publish_event(topic, text)
    out = await _finish_on_a_second_worker(stack, w1, handle.run_id, [big_pickup, big_triggered])
    assert out == {"len": BIG, "sha": _sha(text), "recorded": _sha(text)}
    names = stack.client.names
    [stored] = [
        m
        for m in await _stored(stack, names.events_stream, f"{names.prefix}.event.>")
        if m.seq == seq
    ]
    assert stored.data == b"" and stored.headers[payloads.EVENT_REF].startswith("event:")
    # A triggered run gets the 10 MB too, as its input.
    other = make_big("drop")
    await stack.client.publish_event("big.drop", other)
    deadline = time.monotonic() + 60
    while not (runs := await stack.client.list_runs(workflow="big_triggered", status="completed")):
        assert time.monotonic() < deadline, "the triggered run never completed"
        await asyncio.sleep(0.05)
    assert await stack.client.get_handle(runs[0].run_id).result(timeout=5) == {
        "len": BIG,
        "sha": _sha(other),
    }


@workflow
async def big_parent(ctx: WorkflowContext, seed: str) -> dict[str, Any]:
    out: dict[str, Any] = await ctx.step.invoke_and_wait("kid", big_input, make_big(seed))
    return out


async def test_ten_megabyte_child_input(stack: Stack) -> None:
    await stack.add_worker([big_parent, big_input])
    handle = await stack.client.start(big_parent, "kid")
    out = await handle.result(timeout=60)
    assert out == {"len": BIG, "sha": _sha(make_big("kid"))}


# --------------------------------------------------------------------------- raw publishers


@workflow
async def raw_approval(ctx: WorkflowContext) -> str:
    got = await ctx.step.suspend("approve")
    return _sha(got.data)


@workflow
async def raw_pickup(ctx: WorkflowContext, topic: str) -> str:
    got = await ctx.step.wait_for_event("pickup", topic=topic)
    return _sha(got.data)


async def _raw_client(stack: Stack) -> Any:
    """A plain nats-py connection on the client's user, and the payload bucket as any NATS
    client opens it (creating it when nobody has stored a large value yet)."""
    import nats
    import nats.js.errors

    nc = await nats.connect(stack.as_role("client").nats_url)
    js = nc.jetstream()
    bucket = f"{stack.prefix}_payloads"
    try:
        obs = await js.object_store(bucket)
    except nats.js.errors.BucketNotFoundError:
        obs = await js.create_object_store(bucket)
    return nc, js, obs


async def _answer(
    nc: Any, js: Any, subject: str, body: bytes, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, max_msgs=1)
    await js.publish(subject, body, headers={REPLY_HEADER: inbox, **(headers or {})})
    answer: dict[str, Any] = orjson.loads((await sub.next_msg(10)).data)
    return answer


async def test_raw_publisher_sends_big_resume_and_event_by_reference(stack: Stack) -> None:
    await stack.add_worker([raw_approval, raw_pickup])
    nc, js, obs = await _raw_client(stack)
    p = stack.prefix
    try:
        text = make_big("raw")
        run = await stack.client.start(raw_approval)
        await until_status(stack, run.run_id, "suspended")
        await obs.put(f"{run.run_id}/approval", orjson.dumps(text))
        answer = await _answer(
            nc,
            js,
            f"{p}.cmd.resume.{run.run_id}.approve",
            orjson.dumps({"data_ref": f"{run.run_id}/approval"}),
        )
        assert answer["ok"] and answer["status"] == "resumed", answer
        assert await run.result(timeout=60) == _sha(text)

        waiting = await stack.client.start(raw_pickup, "raw.pickup")
        await until_status(stack, waiting.run_id, "suspended")
        await obs.put("event:raw-1", orjson.dumps(text))
        await js.publish(f"{p}.event.raw.pickup", b"", headers={payloads.EVENT_REF: "event:raw-1"})
        assert await waiting.result(timeout=60) == _sha(text)
    finally:
        await nc.close()


async def test_bad_references_are_refused_and_dead_lettered(stack: Stack) -> None:
    await stack.add_worker([raw_approval, raw_pickup])
    nc, js, obs = await _raw_client(stack)
    p = stack.prefix
    try:
        run = await stack.client.start(raw_approval)
        await until_status(stack, run.run_id, "suspended")
        await obs.put("elsewhere/x", b'"x"')
        subject = f"{p}.cmd.resume.{run.run_id}.approve"
        for body, reason in (
            ({"data_ref": "elsewhere/x"}, "must name the run's payload object"),
            ({"data_ref": f"{run.run_id}/none"}, "is missing from bucket"),
            ({"data_ref": f"{run.run_id}/none", "data": 1}, "data or data_ref, not both"),
        ):
            answer = await _answer(nc, js, subject, orjson.dumps(body))
            assert answer["ok"] is False and reason in answer["error"], answer
            assert answer["field"] == "data_ref"
        assert (await stack.client.get(run.run_id)).status == "suspended"  # nothing changed

        waiting = await stack.client.start(raw_pickup, "bad.refs")
        await until_status(stack, waiting.run_id, "suspended")
        for ref in ("elsewhere/x", "event:none"):
            await js.publish(f"{p}.event.bad.refs", b"", headers={payloads.EVENT_REF: ref})
        await stack.client.publish_event("bad.refs", "good")
        # The waiter skips both and takes the good event after them.
        assert await waiting.result(timeout=30) == _sha("good")
        letters = [d for d in await stack.client.dead_letters() if d["source"] == "event"]
        assert len(letters) == 2
        assert "must name an object event:<id>" in letters[0]["reason"]
        assert "'event:none' is missing" in letters[1]["reason"]
        assert letters[1]["headers"][payloads.EVENT_REF] == "event:none"
    finally:
        await nc.close()


async def test_an_object_stored_just_after_its_first_read_is_found(env_factory: Any) -> None:
    """What a replica behind the leader looks like to a reader: a referenced object not there
    yet. It is read again (about 0.2 s) before it is called missing; one that never comes is
    missing, with its one-line reason."""
    env = await env_factory([big_input])
    js, names = env.client.js, env.client.names
    encoded = orjson.dumps({"text": "late"})
    name = f"late/{hashlib.sha256(encoded).hexdigest()}"
    reading = asyncio.ensure_future(payloads.get_value(js, names, name))
    await asyncio.sleep(0.02)
    assert not reading.done()
    assert await payloads.put_value(js, names, "late", encoded) == name
    assert await reading == {"text": "late"}
    t0 = time.monotonic()
    try:
        await payloads.get_value(js, names, "late/never")
    except payloads.PayloadMissingError as exc:
        assert (
            str(exc)
            == f"payload object 'late/never' is missing from bucket {names.payloads_bucket!r}"
        )
    else:
        raise AssertionError("a missing object was found")
    assert time.monotonic() - t0 >= 0.15
