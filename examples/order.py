"""The order scenario of the design brief: charge, wait for a fraud review, wait for the
warehouse pickup, send the shipping email.

The run holds no worker while it waits for the human or for the warehouse, survives its worker
being killed, and never charges twice. Each side effect appends a line to ``$POLOS_DEMO_LOG``
(if set) when it really executes, so the demo can count executions.

    polos worker examples/order.py
    polos start process_order '{"id": "A-1001", "amount": 2500, "email": "ada@example.com"}'
    polos runs --waiting
    polos resume <run_id> fraud_review --data '{"approved": true}'
    polos event warehouse.pickup/A-1001 --data '{"dock": 4}'
"""

from __future__ import annotations

import os
import time

from pydantic import BaseModel

from polos import WorkflowContext, current_step, workflow


class Order(BaseModel):
    id: str
    amount: float
    email: str


class Payment(BaseModel):
    id: str
    amount: float
    idempotency_key: str


class OrderResult(BaseModel):
    status: str
    payment_id: str | None = None
    reason: str | None = None
    dock: int | None = None


def _mark(label: str) -> None:
    path = os.environ.get("POLOS_DEMO_LOG")
    if path:
        with open(path, "a") as f:
            f.write(f"{time.time():.3f} {label}\n")


async def charge_stripe(order: Order) -> Payment:
    # A real integration passes the step's idempotency key to Stripe, so even the one case where
    # a step may run twice (its worker died mid-call) cannot charge twice.
    info = current_step()
    key = info.idempotency_key if info else order.id
    _mark(f"charge {order.id} {key}")
    return Payment(id=f"ch_{order.id}", amount=order.amount, idempotency_key=key)


async def send_shipping_email(order: Order, dock: int | None) -> str:
    _mark(f"email {order.id} dock={dock}")
    return f"sent to {order.email}"


@workflow
async def process_order(ctx: WorkflowContext, order: Order) -> OrderResult:
    payment = await ctx.step.run("charge", charge_stripe, order)
    review = await ctx.step.suspend(
        "fraud_review", data={"order": order.id, "amount": order.amount, "payment": payment.id}
    )
    if not review.data.get("approved"):
        return OrderResult(status="rejected", payment_id=payment.id, reason=review.data.get("reason"))
    pickup = await ctx.step.wait_for_event("wait_pickup", topic=f"warehouse.pickup/{order.id}")
    await ctx.step.run("notify", send_shipping_email, order, (pickup.data or {}).get("dock"))
    return OrderResult(status="completed", payment_id=payment.id, dock=(pickup.data or {}).get("dock"))
