"""The order scenario of the design brief: an agent validates the order, the charge, a fraud
review for large amounts, the warehouse pickup, the shipping email.

The run holds no worker while it waits for the human or for the warehouse, survives its worker
being killed, and never charges twice. Each side effect appends a line to ``$POLOS_DEMO_LOG``
(if set) when it really executes, so the demo can count executions.

    polos worker examples/order.py
    polos start process_order --input '{"id": "A-1001", "amount": 2500, "email": "ada@example.com"}'
    polos runs --waiting
    polos resume <run_id> fraud_review --data '{"approved": true}'
    polos event warehouse.pickup/A-1001 --data '{"dock": 4}'
"""

from __future__ import annotations

import os
import time

from pydantic import BaseModel

from polos import WorkflowContext, current_step, workflow
from polos.agent import agent_workflow  # noqa: F401 - served here: agents run as child runs

from .validation import order_validation_agent


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
    # An agent (LLM + inventory and shipping tools) validates the order, as a child run: each of
    # its LLM and tool calls is a durable step of its own.
    validation = await ctx.step.agent_invoke_and_wait(
        "validate_order",
        order_validation_agent.with_input(f"Validate this order: {order.model_dump_json()}"),
    )
    if not validation.result.valid:
        return OrderResult(status="invalid", reason=validation.result.reason)
    payment = await ctx.step.run("charge", charge_stripe, order)
    if order.amount > 1000:  # unusual amounts wait for the fraud team, holding no worker
        review = await ctx.step.suspend(
            "fraud_review", data={"order": order.id, "amount": order.amount, "payment": payment.id}
        )
        if not review.data.get("approved"):
            return OrderResult(
                status="rejected", payment_id=payment.id, reason=review.data.get("reason")
            )
    pickup = await ctx.step.wait_for_event("wait_pickup", topic=f"warehouse.pickup/{order.id}")
    await ctx.step.run("notify", send_shipping_email, order, (pickup.data or {}).get("dock"))
    return OrderResult(
        status="completed", payment_id=payment.id, dock=(pickup.data or {}).get("dock")
    )
