"""The durable core in one process: steps, retries, typed replay, determinism, starts, bad input."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from datetime import UTC, datetime
from typing import Any

import orjson
import pydantic
import pytest

from polos import (
    NonDeterminismError,
    RetryPolicy,
    StepFailedError,
    Worker,
    WorkflowContext,
    WorkflowFailedError,
    current_step,
    workflow,
)
from polos import history as ev
from polos._private.store import MSG_ID, REPLY_HEADER

# ----------------------------------------------------------------------------- workflows

COUNTS: dict[str, int] = {}


def bump(name: str) -> int:
    COUNTS[name] = COUNTS.get(name, 0) + 1
    return COUNTS[name]


class Payment(pydantic.BaseModel):
    id: str
    cents: int


@dataclasses.dataclass
class Receipt:
    number: int
    lines: list[str]


class Order(pydantic.BaseModel):
    id: str
    cents: int = pydantic.Field(gt=0)


GATE: dict[str, asyncio.Event] = {}


async def charge(order: Order) -> Payment:
    bump(f"charge:{order.id}")
    return Payment(id=f"pay_{order.id}", cents=order.cents)


def receipt(order: Order) -> Receipt:  # a sync step: runs in a thread
    bump(f"receipt:{order.id}")
    return Receipt(number=7, lines=[order.id])


async def blocker(key: str) -> str:
    bump(f"blocker:{key}")
    await GATE[key].wait()
    return "unblocked"


@workflow
async def typed_replay(ctx: WorkflowContext, order: Order) -> dict[str, Any]:
    payment = await ctx.step.run("charge", charge, order)
    rec = await ctx.step.run("receipt", receipt, order)
    when = datetime.fromtimestamp(await ctx.step.now() / 1000, tz=UTC)
    token = await ctx.step.uuid()
    dice = await ctx.step.random()
    await ctx.step.run("block", blocker, order.id)
    return {
        "payment_is_model": isinstance(payment, Payment),
        "receipt_is_dataclass": isinstance(rec, Receipt),
        "payment": payment.id,
        "when": when.isoformat(),
        "token": token,
        "dice": dice,
        "replaying_at_end": ctx.is_replaying,
    }


async def flaky(key: str, failures: int) -> str:
    n = bump(f"flaky:{key}")
    if n <= failures:
        raise ConnectionError(f"attempt {n} failed")
    info = current_step()
    assert info is not None
    return f"ok after {n} (attempt {info.attempt}, key {info.idempotency_key})"


class CardDeclined(Exception):
    pass


async def declined() -> None:
    bump("declined")
    raise CardDeclined("card declined")


@workflow
async def retries(ctx: WorkflowContext, key: str) -> dict[str, Any]:
    fast = RetryPolicy(max_attempts=4, initial_interval=0.01, backoff=1.0)
    ok = await ctx.step.run("flaky", flaky, key, 2, retry=fast)
    try:
        await ctx.step.run(
            "declined",
            declined,
            retry=RetryPolicy(max_attempts=5, initial_interval=0.01, non_retryable=(CardDeclined,)),
        )
    except StepFailedError as exc:
        return {"ok": ok, "declined": exc.error_type, "attempts": exc.attempts}
    return {"ok": ok}


@workflow
async def unserialisable(ctx: WorkflowContext) -> str:
    await ctx.step.run("bad", lambda: object())
    return "unreachable"


@workflow
async def parallel(ctx: WorkflowContext, n: int) -> list[int]:
    async def sq(i: int) -> int:
        return i * i

    return list(await asyncio.gather(*(ctx.step.run(f"sq-{i}", sq, i) for i in range(n))))


@workflow
async def repeated_keys(ctx: WorkflowContext) -> list[int]:
    out = []
    for i in range(3):
        out.append(await ctx.step.run("same", lambda i=i: i))
    return out


@workflow
async def plain_io(ctx: WorkflowContext, numbers: list[int]) -> int:
    return sum(numbers)


# ----------------------------------------------------------------------------- helpers


async def history_types(client: Any, run_id: str) -> list[str]:
    return [type(e).__name__ for _, e in await client.history(run_id)]


# ----------------------------------------------------------------------------- tests


async def test_typed_replay_after_worker_loss(env_factory: Any, settings: Any) -> None:
    """A run moves to a new worker mid-run: completed steps replay typed, and are not re-run."""
    env = await env_factory([typed_replay])
    oid = uuid.uuid4().hex[:8]
    GATE[oid] = asyncio.Event()
    handle = await env.client.start(typed_replay, Order(id=oid, cents=500))
    await asyncio.wait_for(_until(lambda: COUNTS.get(f"blocker:{oid}") == 1), 10)
    before = await env.client.history(handle.run_id)
    first = {e.kind: e.output for _, e in before if isinstance(e, ev.StepCompleted)}
    # The worker goes away mid-step (its in-flight step is handed back), a new one takes over.
    await env.worker.stop(timeout=0)
    GATE[oid].set()
    async with Worker([typed_replay], settings=settings.worker):
        out = await handle.result(timeout=10)
    assert out["payment_is_model"] and out["receipt_is_dataclass"]
    assert out["payment"] == f"pay_{oid}"
    assert COUNTS[f"charge:{oid}"] == 1 and COUNTS[f"receipt:{oid}"] == 1
    assert COUNTS[f"blocker:{oid}"] == 2  # in flight at the hand-over: at-least-once
    # now/uuid/random came back from the log, not from a new draw
    assert out["token"] == first["uuid"] and out["dice"] == first["random"]
    assert out["replaying_at_end"] is False
    types = await history_types(env.client, handle.run_id)
    assert types.count("RunClaimed") == 2 and types[-1] == "RunCompleted"


async def test_retries_backoff_and_non_retryable(env_factory: Any) -> None:
    env = await env_factory([retries])
    key = uuid.uuid4().hex[:6]
    handle = await env.client.start(retries, key)
    out = await handle.result(timeout=10)
    assert out["ok"].startswith("ok after 3 (attempt 3")
    assert out["declined"] == "CardDeclined" and out["attempts"] == 1
    assert COUNTS["declined"] >= 1
    history = await env.client.history(handle.run_id)
    failed = [e for _, e in history if isinstance(e, ev.StepAttemptFailed)]
    assert [f.attempt for f in failed] == [1, 2]
    assert failed[0].error["type"] == "ConnectionError"


async def test_unserialisable_step_output_fails_the_step_clearly(env_factory: Any) -> None:
    env = await env_factory([unserialisable])
    handle = await env.client.start(unserialisable)
    with pytest.raises(WorkflowFailedError) as info:
        await handle.result(timeout=10)
    msg = info.value.error["message"]
    assert "'bad'" in msg and "builtins.object" in msg and "cannot be serialised" in msg
    history = await env.client.history(handle.run_id)
    failed = [e for _, e in history if isinstance(e, ev.StepFailed)]
    assert failed and failed[0].error["type"] == "SerializationError"


async def test_parallel_steps_and_repeated_keys(env_factory: Any) -> None:
    env = await env_factory([parallel, repeated_keys, plain_io])
    assert await (await env.client.start(parallel, 6)).result(timeout=10) == [0, 1, 4, 9, 16, 25]
    h = await env.client.start(repeated_keys)
    assert await h.result(timeout=10) == [0, 1, 2]
    keys = [e.key for _, e in await env.client.history(h.run_id) if isinstance(e, ev.StepCompleted)]
    assert keys == ["same", "same#2", "same#3"]
    assert await (await env.client.start("plain_io", [1, 2, 3])).result(timeout=10) == 6


async def test_nondeterminism_is_detected_and_named(env_factory: Any, settings: Any) -> None:
    key = uuid.uuid4().hex[:6]
    GATE[key] = asyncio.Event()

    async def step_a() -> str:
        return "a"

    @workflow(name="evolving")
    async def v1(ctx: WorkflowContext, k: str) -> str:
        await ctx.step.run("a", step_a)
        await ctx.step.run("wait", blocker, k)
        return "v1"

    env = await env_factory([v1])
    handle = await env.client.start(v1, key)
    await asyncio.wait_for(_until(lambda: COUNTS.get(f"blocker:{key}") == 1), 10)
    await env.worker.stop(timeout=0)

    async def step_x() -> str:
        return "x"

    @workflow(name="evolving")
    async def v2(ctx: WorkflowContext, k: str) -> str:
        await ctx.step.run("x", step_x)  # the code changed: a new first step
        await ctx.step.run("a", step_a)
        return "v2"

    async with Worker([v2], settings=settings.worker):
        with pytest.raises(WorkflowFailedError) as info:
            await handle.result(timeout=10)
    assert info.value.error_type == NonDeterminismError.__name__
    assert "'x'" in info.value.error["message"] and "'a'" in info.value.error["message"]


async def test_idempotent_start_by_run_id_and_message_id(env_factory: Any) -> None:
    env = await env_factory([plain_io])
    run_id = f"order-{uuid.uuid4().hex[:8]}"
    h1 = await env.client.start(plain_io, [1], run_id=run_id)
    h2 = await env.client.start(plain_io, [2], run_id=run_id)
    assert await h1.result(timeout=10) == 1
    assert await h2.result(timeout=10) == 1  # same run: the second start changed nothing
    # Raw publish of the same run id after the duplicate window would still not fork the run:
    # the orchestrator's create is fenced on an empty history.
    reply = await _raw_start(env, "plain_io", {"input": [5], "run_id": run_id})
    assert reply == {"ok": True, "run_id": run_id, "existing": True, "status": "completed"}
    requested = [t for t in await history_types(env.client, run_id) if t == "RunRequested"]
    assert len(requested) == 1
    # Without a run id, a raw message id makes the start idempotent.
    r1 = await _raw_start(env, "plain_io", {"input": [3]}, msg_id="client-msg-1")
    r2 = await _raw_start(
        env, "plain_io", {"input": [3]}, msg_id="client-msg-1", expect_reply=False
    )
    assert r1["ok"] and r2 is None  # the stream dropped the duplicate: no second command at all


async def test_raw_subject_start_with_any_nats_client(env_factory: Any) -> None:
    env = await env_factory([plain_io])
    reply = await _raw_start(env, "plain_io", {"input": [20, 22]})
    assert reply["ok"] and reply["existing"] is False
    assert await env.client.get_handle(reply["run_id"]).result(timeout=10) == 42


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{not json", "malformed JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"inputs": [1]}', "unknown field(s) inputs"),
        (b'{"input": [1], "run_id": "has spaces"}', "run_id must be"),
    ],
)
async def test_malformed_start_commands_are_answered_and_dead_lettered(
    env_factory: Any, payload: bytes, reason: str
) -> None:
    env = await env_factory([plain_io])
    reply = await _raw_start(env, "plain_io", payload)
    assert reply["ok"] is False and reason in reply["error"]
    letters = await env.client.dead_letters()
    assert letters[-1]["reason"] == reply["error"] and letters[-1]["data"] == payload.decode()
    # The orchestrator is still there and working.
    ok = await _raw_start(env, "plain_io", {"input": [1]})
    assert ok["ok"]


async def test_input_failing_the_schema_fails_the_run_with_field_and_reason(
    env_factory: Any,
) -> None:
    env = await env_factory([typed_replay])
    handle = await env.client.start("typed_replay", {"id": "x", "cents": -5})
    with pytest.raises(WorkflowFailedError) as info:
        await handle.result(timeout=10)
    assert info.value.error_type == "InputValidationError"
    assert info.value.error["details"][0]["field"] == "cents"
    assert "greater than 0" in info.value.error["details"][0]["reason"]
    letters = await env.client.dead_letters()
    assert any(d["source"] == "input" and "cents" in d["reason"] for d in letters)


async def test_unknown_command_subject_is_dead_lettered(env_factory: Any) -> None:
    env = await env_factory([plain_io])
    inbox = env.client.nc.new_inbox()
    sub = await env.client.nc.subscribe(inbox)
    await env.client.js.publish(
        f"{env.settings.prefix}.cmd.explode.now", b"{}", headers={REPLY_HEADER: inbox}
    )
    reply = orjson.loads((await sub.next_msg(5)).data)
    assert reply["ok"] is False and "unknown command subject" in reply["error"]


async def test_workflow_without_worker_waits_visibly_then_runs(
    env_factory: Any, settings: Any
) -> None:
    env = await env_factory([], with_worker=False)
    handle = await env.client.start("plain_io", [4, 5])
    for _ in range(200):
        found = [r for r in await env.client.list_runs() if r.run_id == handle.run_id]
        if found:
            break
        await asyncio.sleep(0.02)
    [info] = found
    assert info.status == "queued" and info.note == "no worker serves 'plain_io' yet"
    async with Worker([plain_io], settings=settings.worker):
        assert await handle.result(timeout=10) == 9
    # The index is a projection the orchestrator folds right after the log: it catches up.
    for _ in range(200):
        runs = await env.client.list_runs(status="completed")
        if runs:
            break
        await asyncio.sleep(0.02)
    assert [r.run_id for r in runs] == [handle.run_id]


# ----------------------------------------------------------------------------- utilities


async def _until(cond: Any) -> None:
    while not cond():
        await asyncio.sleep(0.01)


async def _raw_start(
    env: Any, wf: str, body: Any, *, msg_id: str | None = None, expect_reply: bool = True
) -> Any:
    """Start a run the way any NATS client would: JSON on the documented subject."""
    nc = env.client.nc
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    headers = {REPLY_HEADER: inbox}
    if msg_id:
        headers[MSG_ID] = msg_id
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    await env.client.js.publish(f"{env.settings.prefix}.cmd.start.{wf}", data, headers=headers)
    try:
        msg = await sub.next_msg(5 if expect_reply else 1)
    except Exception:
        if expect_reply:
            raise
        return None
    finally:
        await sub.unsubscribe()
    return orjson.loads(msg.data)
