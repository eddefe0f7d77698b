"""Each wire format's edges, through the real ``openai`` and ``anthropic`` clients against the
dev LLM: 429/5xx retried with back-off, a bad request failing at once with the provider's own
message, structured output in each API's terms, and settings translated, not dropped."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pydantic import BaseModel

from polos.agent import Agent, LLMRetry
from polos.devllm import DevLLM, Reply
from polos.errors import StepFailedError

# (provider, llm_api, the requests of that format)
FORMATS = {
    "responses": ("openai", "responses"),
    "chat": ("openai", "chat_completions"),
    "messages": ("anthropic", None),
}


@pytest.fixture
async def llm() -> AsyncIterator[DevLLM]:
    async with DevLLM(api_key="k-wire") as server:
        yield server


def _agent(llm: DevLLM, kind: str, name: str, **kw: Any) -> Agent[Any]:
    provider, api = FORMATS[kind]
    url = llm.anthropic_url if provider == "anthropic" else llm.url
    model = "claude-haiku-4-5" if provider == "anthropic" else "gpt-4o-mini"
    agent: Agent[Any] = Agent(
        f"{name}_{kind}",
        provider=provider,
        model=model,
        base_url=url,
        api_key="k-wire",
        retry=LLMRetry(initial_interval=0.01),
        **kw,
    )
    agent.config = dataclasses.replace(agent.config, llm_api=api)
    return agent


@pytest.mark.parametrize("kind", list(FORMATS))
async def test_each_format_retries_429_and_5xx_and_fails_a_bad_request_at_once(
    llm: DevLLM, kind: str
) -> None:
    agent = _agent(llm, kind, "flaky")
    llm.script(
        Reply.error(429, "slow down", retry_after=0.05),
        Reply.error(503, "overloaded"),
        Reply.text("finally"),
    )
    r = await agent.run("hi")
    assert r.result == "finally"
    assert [(q.kind, q.status) for q in llm.requests] == [(kind, 429), (kind, 503), (kind, 200)]

    llm.script(Reply.error(400, "messages.0.content: too long"))
    with pytest.raises(StepFailedError, match="too long") as info:
        await agent.run("hi")
    assert info.value.error_type == "BadRequestError"
    assert len(llm.requests) == 4  # a bad request is not retried

    wrong_key = dataclasses.replace(agent.config, api_key="k-other")
    agent.config = wrong_key
    with pytest.raises(StepFailedError, match="invalid API key") as info:
        await agent.run("hi")
    assert info.value.error_type == "AuthenticationError"
    assert llm.requests[-1].status == 401 and len(llm.requests) == 5


class Stock(BaseModel):
    sku: str
    count: int


@pytest.mark.parametrize("kind", list(FORMATS))
async def test_each_format_asks_for_structured_output_in_its_own_terms(
    llm: DevLLM, kind: str
) -> None:
    agent = _agent(llm, kind, "typed", output_type=Stock)
    llm.script(Reply.json({"sku": "A1", "count": 3}))
    r = await agent.run("How many A1?")
    assert r.result == Stock(sku="A1", count=3)
    body = llm.requests[-1].body
    schema = Stock.model_json_schema()
    if kind == "responses":
        fmt = body["text"]["format"]
        assert fmt["type"] == "json_schema" and fmt["name"] == "Stock"
        assert fmt["schema"]["properties"].keys() == schema["properties"].keys()
    elif kind == "messages":
        fmt = body["output_config"]["format"]
        assert fmt["type"] == "json_schema"
        assert fmt["schema"]["properties"].keys() == schema["properties"].keys()
    else:
        assert body["response_format"]["type"] == "json_schema"


async def test_settings_reach_each_api_under_its_own_names(llm: DevLLM) -> None:
    settings = {
        "max_output_tokens": 300,
        "top_p": 0.5,
        "stop": ["END"],
        "parallel_tool_calls": False,
        "tool_choice": "required",
    }

    def lookup(sku: str) -> int:
        """Stock of a product.

        Args:
            sku: its code
        """
        return 3

    for kind in FORMATS:
        agent = _agent(
            llm,
            kind,
            "tuned",
            tools=[lookup],
            temperature=0.2,
            instructions="Be brief.",
            model_settings=dict(settings),
        )
        llm.script(Reply.tools(("lookup", {"sku": "A1"})), Reply.text("3"))
        assert (await agent.run("How many A1?")).result == "3"
    responses, _, chat, _, messages, _ = (q.body for q in llm.requests)
    assert responses["instructions"] == "Be brief."
    assert responses["max_output_tokens"] == 300 and responses["top_p"] == 0.5
    assert responses["tool_choice"] == "required" and responses["parallel_tool_calls"] is False
    assert responses["temperature"] == 0.2
    assert responses["stop"] == ["END"]  # Responses has no stop: sent for OpenAI to judge
    assert chat["max_completion_tokens"] == 300 and chat["stop"] == ["END"]
    assert chat["messages"][0] == {"role": "system", "content": "Be brief."}
    assert messages["system"] == "Be brief." and messages["max_tokens"] == 300
    assert messages["stop_sequences"] == ["END"] and messages["top_p"] == 0.5
    assert messages["temperature"] == 0.2
    assert messages["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
    assert messages["tools"][0]["input_schema"]["properties"]["sku"]["type"] == "string"


async def test_anthropic_reasoning_effort_becomes_a_thinking_budget(llm: DevLLM) -> None:
    for effort, budget in (("low", 1024), ("medium", 4096), ("high", 16384)):
        agent = _agent(
            llm, "messages", f"thinker_{effort}", model_settings={"reasoning_effort": effort}
        )
        llm.script(Reply.text("ok", reasoning="Thinking it over."))
        r = await agent.run("hi")
        assert r.result == "ok"
        body = llm.requests[-1].body
        assert body["thinking"] == {"type": "enabled", "budget_tokens": budget}
        assert body["max_tokens"] > budget  # room left for the answer
    own = _agent(
        llm,
        "messages",
        "thinker_own",
        model_settings={"thinking": {"type": "adaptive"}, "reasoning_effort": "high"},
    )
    llm.script(Reply.text("ok"))
    await own.run("hi")
    assert llm.requests[-1].body["thinking"] == {"type": "adaptive"}  # Anthropic's own wins
    bad = _agent(llm, "messages", "thinker_bad", model_settings={"reasoning_effort": "huge"})
    with pytest.raises(StepFailedError, match="'huge' has no Anthropic thinking budget"):
        await bad.run("hi")


async def test_chat_completions_takes_the_effort_and_refuses_what_it_cannot_send(
    llm: DevLLM,
) -> None:
    agent = _agent(
        llm, "chat", "effort", model_settings={"reasoning": {"effort": "low", "summary": "auto"}}
    )
    llm.script(Reply.text("ok", reasoning="Short thought."))
    r = await agent.run("hi")
    body = llm.requests[-1].body
    assert body["reasoning_effort"] == "low" and "reasoning" not in body
    assert r.steps[0].output["reasoning"] == "Short thought."
    budget = _agent(llm, "chat", "budget", model_settings={"reasoning": {"budget_tokens": 5}})
    with pytest.raises(StepFailedError, match=r"\['budget_tokens'\] have no Chat Completions form"):
        await budget.run("hi")
