from __future__ import annotations

import asyncio

import pydantic

from polos import WorkflowContext, workflow

CALLS: dict[str, int] = {}


class Order(pydantic.BaseModel):
    id: str
    amount: float


class Payment(pydantic.BaseModel):
    id: str
    amount: float


def charge(order: Order) -> Payment:
    CALLS["charge"] = CALLS.get("charge", 0) + 1
    return Payment(id=f"pay-{order.id}", amount=order.amount)


@workflow
async def smoke_order(ctx: WorkflowContext, order: Order) -> dict[str, object]:
    p = await ctx.step.run("charge", charge, order)
    t = await ctx.step.now()
    u = await ctx.step.uuid()
    a, b = await asyncio.gather(
        ctx.step.run("a", lambda: 1), ctx.step.run("b", lambda: 2)
    )
    return {"payment": p.id, "sum": a + b, "t": t.isoformat(), "u": u}


async def test_smoke(env_factory) -> None:
    env = await env_factory([smoke_order])
    h = await env.client.start(smoke_order, Order(id="o1", amount=5))
    out = await h.result(timeout=10)
    assert out["payment"] == "pay-o1"
    assert out["sum"] == 3
    info = await env.client.get(h.run_id)
    assert info.status == "completed"
    assert info.steps == 5
