"""The order example (README, docs/agents.md), with an agent that validates the order.

    python -m examples.agents

With ``OPENAI_API_KEY`` set the agent talks to OpenAI. Without it, this script starts the
**Polos dev LLM** (polos/devllm.py): a small scripted OpenAI-compatible server that is *not a
model*. It calls every tool it is offered once and then answers with JSON filled from the
requested schema, so the whole durable path (LLM steps, tool steps, structured output) runs
for real over HTTP, just without intelligence. Point ``OPENAI_BASE_URL`` at any other
OpenAI-compatible server (vLLM, Ollama, LiteLLM) to use that instead.

A worker serving this module: ``polos worker examples.agents``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile

from pydantic import BaseModel

from polos import WorkflowContext, current_step, workflow
from polos.agent import agent_workflow  # agents run as child runs of this workflow: serve it

from .validation import order_validation_agent


class ProcessOrderInput(BaseModel):
    id: str
    sku: str
    quantity: int
    country: str
    amount: float


class ProcessOrderOutput(BaseModel):
    status: str
    reason: str | None = None
    payment_id: str | None = None


class Payment(BaseModel):
    id: str


def charge_stripe(order: ProcessOrderInput) -> Payment:
    info = current_step()
    # A real charge passes info.idempotency_key to Stripe: a retried step never charges twice.
    return Payment(id=f"pay_{order.id}_{abs(hash(info.idempotency_key if info else '')) % 10_000}")


def send_shipping_email(order: ProcessOrderInput) -> str:
    return f"email sent for {order.id}"


@workflow
async def process_order(ctx: WorkflowContext, order: ProcessOrderInput) -> ProcessOrderOutput:
    validation = await ctx.step.agent_invoke_and_wait(
        "validate_order",
        order_validation_agent.with_input(f"Validate this order: {order.model_dump_json()}"),
    )
    if not validation.result.valid:
        return ProcessOrderOutput(status="invalid", reason=validation.result.reason)
    # The demo's order (examples/order.py) also suspends for a human above $1000 and waits for
    # the warehouse (ctx.step.suspend / wait_for_event); see docs/agents.md for approval-gated
    # tools.
    payment = await ctx.step.run("charge", charge_stripe, order)  # never charged twice
    await ctx.step.run("notify", send_shipping_email, order)
    return ProcessOrderOutput(
        status="completed", reason=validation.result.reason, payment_id=payment.id
    )


async def main() -> None:
    from polos import history as ev
    from polos._private.run import waits as waiting
    from polos.devllm import LABEL, DevLLM
    from polos.testing import EmbeddedServer, PolosEnvironment, fast_settings

    devllm = None
    if not os.environ.get("OPENAI_API_KEY") and not os.environ.get("OPENAI_BASE_URL"):
        devllm = await DevLLM().start()
        os.environ["OPENAI_BASE_URL"] = devllm.url
        print(f"OPENAI_API_KEY is not set: using the {LABEL} at {devllm.url}")
    with tempfile.TemporaryDirectory() as tmp, EmbeddedServer(tmp, port=0) as server:
        async with PolosEnvironment(
            fast_settings(server.url, prefix="example"), [process_order, agent_workflow]
        ) as env:
            order = ProcessOrderInput(
                id="o-1", sku="SKU-42", quantity=2, country="DE", amount=120.0
            )
            handle = await env.client.start(process_order, order)
            result = await handle.result(timeout=120)
            print(f"run {handle.run_id}: {result!r}")
            agent_run = waiting.child_run_id(handle.run_id, "validate_order", 0)
            history = await env.client.history(agent_run) + await env.client.history(handle.run_id)
            for _, e in history:
                if isinstance(e, ev.StepCompleted):
                    meta = e.meta or {}
                    extra = (
                        f"tokens={meta['usage']['total_tokens']} cost=${meta['cost_usd']}"
                        if e.kind == "llm"
                        else f"args={meta.get('arguments')}"
                        if e.kind == "tool"
                        else ""
                    )
                    print(f"  {e.kind:5} {e.key:40} {e.duration_ms or 0:8.1f} ms  {extra}")
    if devllm is not None:
        with contextlib.suppress(Exception):
            await devllm.stop()


if __name__ == "__main__":
    asyncio.run(main())
