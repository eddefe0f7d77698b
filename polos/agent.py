"""Durable LLM agents: tools, structured output, handoffs, guardrails, stop conditions, memory.

::

    agent = Agent(id="order_validator", provider="openai", model="gpt-4o",
                  system_prompt="You validate orders.", tools=[check_inventory, calculate_shipping],
                  output_schema=OrderValidation, stop_conditions=[max_steps(MaxStepsConfig(count=10))])

    @workflow
    async def process_order(ctx: WorkflowContext, order: Order) -> str:
        v = await ctx.step.agent_invoke_and_wait("validate_order", agent.with_input(f"Validate {order}"))
        return "ok" if v.result.valid else v.result.reason

Inside a run every LLM call is one ``StepCompleted(kind="llm")`` and every tool call one
``StepCompleted(kind="tool")`` in the run's history; a replay (after a crash, on another
worker) returns the recorded calls, so no token is paid for twice and no completed tool runs
twice. ``agent.run(polos, input)`` / ``agent.stream(polos, input)`` start the agent as a
durable run of its own; ``agent.run(input)`` runs the same loop in plain code, without
durability. Hooks, ``guardrails`` and custom stop conditions are durable steps too.
"""

from __future__ import annotations

from polos._private.agents.loop import (
    Agent,
    AgentError,
    AgentGuardrailError,
    AgentOutputError,
    AgentRequest,
    AgentResult,
    AgentRun,
    AgentStep,
    GuardrailViolation,
    Usage,
    agent_workflow,
    get_agent,
    invoke_agent,
)
from polos._private.agents.memory import SharedMemory
from polos._private.agents.pricing import PRICES, ModelPrice, set_price
from polos._private.agents.provider import AgentConfigError, LLMRetry, ProviderError
from polos._private.agents.stream import AgentStream, StreamEvent
from polos._private.store import Names


def stream_subject(prefix: str, run_id: str, step_key: str) -> str:
    """Where an LLM step's text deltas are published: ``<prefix>.stream.<run_id>.<step>``.

    The step key becomes one subject token (characters other than letters, digits, ``_-/``
    become ``_``); follow a whole run with ``<prefix>.stream.<run_id>.>``."""
    return Names(prefix).delta_subject(run_id, step_key)


__all__ = [
    "PRICES",
    "Agent",
    "AgentConfigError",
    "AgentError",
    "AgentGuardrailError",
    "AgentOutputError",
    "AgentRequest",
    "AgentResult",
    "AgentRun",
    "AgentStep",
    "AgentStream",
    "GuardrailViolation",
    "LLMRetry",
    "ModelPrice",
    "ProviderError",
    "SharedMemory",
    "StreamEvent",
    "Usage",
    "agent_workflow",
    "get_agent",
    "invoke_agent",
    "set_price",
    "stream_subject",
]
