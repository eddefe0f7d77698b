"""Agents of every named provider, loaded by worker subprocesses
(``python -m polos_services.worker tests.test_parity_providers_workers``). No tests here.

No agent names an endpoint or a key: each provider finds both in its own environment variables
(``GROQ_API_KEY``, ``GROQ_BASE_URL``...), which the test points at its local fake server.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from polos import WorkflowContext, workflow
from polos.agent import Agent, agent_workflow  # noqa: F401 - served as a workflow too


def lookup(sku: str) -> dict[str, Any]:
    """How many of a product are in stock.

    Args:
        sku: the product's code
    """
    return {"sku": sku, "stock": 3}


def _agent(case: str, provider: str, model: str, **kw: Any) -> Agent[Any]:
    return Agent(
        f"prov_{case}",
        provider=provider,
        model=model,
        instructions="Answer stock questions with the lookup tool.",
        tools=[lookup],
        stream=True,
        max_steps=5,
        timeout=30,
        **kw,
    )


REASONING = {"reasoning": {"effort": "low"}}

AGENTS: dict[str, Agent[Any]] = {
    "openai_responses": _agent(
        "openai_responses", "openai", "gpt-4o-mini", model_settings=REASONING
    ),
    "openai_chat": _agent("openai_chat", "openai", "gpt-4.1-mini"),
    "anthropic": _agent("anthropic", "anthropic", "claude-sonnet-4-5", model_settings=REASONING),
    "azure": _agent("azure", "azure", "gpt-4o"),
    "gemini": _agent("gemini", "gemini", "gemini-2.5-flash"),
    "groq": _agent("groq", "groq", "llama-3.3-70b-versatile"),
    "fireworks": _agent(
        "fireworks", "fireworks", "accounts/fireworks/models/llama-v3p3-70b-instruct"
    ),
    "together": _agent("together", "together", "meta-llama/Llama-3.3-70B-Instruct-Turbo"),
    "ollama": _agent("ollama", "ollama", "llama3.2"),
}
# The wire format is chosen by the agent's provider configuration; an OpenAI agent pointed at
# another server speaks Chat Completions unless told otherwise.
_resp = AGENTS["openai_responses"]
_resp.config = dataclasses.replace(_resp.config, llm_api="responses")
_chat = AGENTS["openai_chat"]
_chat.config = dataclasses.replace(_chat.config, llm_api="chat_completions")


@workflow
async def provider_job(ctx: WorkflowContext, case: str) -> dict[str, Any]:
    r = await ctx.step.agent_invoke_and_wait(
        "ask", AGENTS[case].with_input("How many A1 are in stock?")
    )
    return {"text": r.result, "run_id": r.run_id, "cost_usd": r.usage.cost_usd}
