"""Every named provider through a real agent run: a worker subprocess under auth runs an agent
whose provider finds its key and endpoint in its own environment variables, pointed at the
local fake server of its wire format (OpenAI Chat Completions, OpenAI Responses, Anthropic
Messages), driven by the real ``openai`` / ``anthropic`` client. The fake refuses any other
key, so each run also proves which variable the key came from."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest

import polos_analytics as analytics
from polos import history as ev
from polos._private.agents.pricing import cost_usd
from polos._private.agents.providers.base import PROVIDERS
from polos.agent import Agent, AgentConfigError
from polos.devllm import DevLLM, LoggedRequest, Reply
from polos.errors import WorkflowFailedError
from polos_analytics.export import Exporter
from tests.helpers import spawn, stop

pytestmark = pytest.mark.slow

WORKER = ["-m", "polos_services.worker", "tests.test_parity_providers_workers"]
ANSWER = "There are 3 of A1 in stock, enough for the order."
THOUGHT = "The user wants stock figures; the lookup tool has them."

# Every variable a provider reads, so the host's own settings never leak into a test.
ALL_VARS = {v for s in PROVIDERS.values() for v in s.key_env} | {
    var for s in PROVIDERS.values() for var, _ in s.base_url_env
}


def _env(case: str, llm: DevLLM, key: str) -> dict[str, str]:
    root = llm.anthropic_url  # http://host:port, for host-style variables
    return {
        "openai_responses": {"OPENAI_BASE_URL": llm.url, "OPENAI_API_KEY": key},
        "openai_chat": {"OPENAI_BASE_URL": llm.url, "OPENAI_API_KEY": key},
        "anthropic": {"ANTHROPIC_BASE_URL": root, "ANTHROPIC_API_KEY": key},
        "azure": {"AZURE_OPENAI_ENDPOINT": root, "AZURE_OPENAI_API_KEY": key},
        "gemini": {"GEMINI_BASE_URL": llm.url, "GEMINI_API_KEY": key},
        "groq": {"GROQ_BASE_URL": llm.url, "GROQ_API_KEY": key},
        "fireworks": {"FIREWORKS_BASE_URL": llm.url, "FIREWORKS_API_KEY": key},
        "together": {"TOGETHER_BASE_URL": llm.url, "TOGETHER_API_KEY": key},
        "ollama": {"OLLAMA_HOST": root},  # a local server: no key at all
    }[case]


# case -> (provider, model, wire format)
CASES: dict[str, tuple[str, str, str]] = {
    "openai_responses": ("openai", "gpt-4o-mini", "responses"),
    "openai_chat": ("openai", "gpt-4.1-mini", "chat"),
    "anthropic": ("anthropic", "claude-sonnet-4-5", "messages"),
    "azure": ("azure", "gpt-4o", "chat"),
    "gemini": ("gemini", "gemini-2.5-flash", "chat"),
    "groq": ("groq", "llama-3.3-70b-versatile", "chat"),
    "fireworks": ("fireworks", "accounts/fireworks/models/llama-v3p3-70b-instruct", "chat"),
    "together": ("together", "meta-llama/Llama-3.3-70B-Instruct-Turbo", "chat"),
    "ollama": ("ollama", "llama3.2", "chat"),
}
REASONING_CASES = {"openai_responses", "anthropic"}


def _tool_result_of(req: LoggedRequest) -> tuple[str | None, str]:
    """(the call id, the content) of the tool result a request carries, in its own format."""
    body = req.body
    if req.kind == "responses":
        out = [i for i in body["input"] if i.get("type") == "function_call_output"]
        assert len(out) == 1 and any(i.get("type") == "function_call" for i in body["input"])
        return out[0]["call_id"], out[0]["output"]
    if req.kind == "messages":
        blocks = [
            b
            for m in body["messages"]
            if m["role"] == "user" and isinstance(m["content"], list)
            for b in m["content"]
            if b.get("type") == "tool_result"
        ]
        assert len(blocks) == 1
        return blocks[0]["tool_use_id"], blocks[0]["content"]
    tool = [m for m in body["messages"] if m["role"] == "tool"]
    assert len(tool) == 1
    return tool[0]["tool_call_id"], tool[0]["content"]


def _sent_key(req: LoggedRequest) -> str | None:
    # Anthropic's client sends x-api-key (older versions) or a bearer token (newer ones).
    bearer = req.headers.get("authorization", "")
    return req.headers.get("x-api-key") or bearer.removeprefix("Bearer ") or None


@pytest.mark.parametrize("case", list(CASES))
async def test_provider_runs_a_tool_call_then_answers_with_usage_cost_and_deltas(
    env_factory: Any, subprocess_env: Any, tmp_path: Path, case: str
) -> None:
    provider, model, kind = CASES[case]
    key = f"key-{case}"
    reasoning = THOUGHT if case in REASONING_CASES else None
    async with DevLLM(api_key=None if case == "ollama" else key) as llm:
        llm.script(Reply.tools(("lookup", {"sku": "A1"}), reasoning=reasoning), Reply.text(ANSWER))
        for var in ALL_VARS:
            subprocess_env.pop(var, None)
        subprocess_env.update(_env(case, llm, key))
        env = await env_factory([], with_worker=False)
        run_id = f"prov_{case}"
        got: list[dict[str, Any]] = []
        finished = asyncio.Event()

        async def on_msg(msg: Any) -> None:
            doc = orjson.loads(msg.data)
            got.append(doc)
            if doc.get("done") and str(doc.get("step", "")).endswith("/llm/2"):
                finished.set()

        sub = await env.client.nc.subscribe(f"{env.settings.prefix}.stream.{run_id}.>", cb=on_msg)
        worker = spawn(WORKER, subprocess_env.as_role("worker"), tmp_path / "worker.out")
        try:
            h = await env.client.start("provider_job", case, run_id=run_id)
            out = await h.result(timeout=60)
            await asyncio.wait_for(finished.wait(), 10)
        finally:
            stop(worker)
            await sub.unsubscribe()
        requests = list(llm.requests)

    # The final answer, after one tool call, each LLM call once and in the provider's format.
    assert out["text"] == ANSWER
    assert [(r.kind, r.status) for r in requests] == [(kind, 200), (kind, 200)]
    assert all(r.body["stream"] is True and r.body["model"] == model for r in requests)
    if case == "ollama":
        assert _sent_key(requests[0]) == "not-needed"  # nothing asked for one
    else:
        assert {_sent_key(r) for r in requests} == {key}  # from the provider's own variable
    if case == "azure":
        assert requests[0].path == "/openai/v1/chat/completions"
        assert requests[0].headers["api-key"] == key

    history = await env.client.history(out["run_id"])
    steps = [e for _, e in history if isinstance(e, ev.StepCompleted)]
    llm_steps = [s for s in steps if s.kind == "llm"]
    tool_steps = [s for s in steps if s.kind == "tool"]
    assert len(llm_steps) == 2 and len(tool_steps) == 1
    call = llm_steps[0].output["tool_calls"][0]
    assert call["name"] == "lookup" and call["arguments"] == {"sku": "A1"}
    assert tool_steps[0].output == {"sku": "A1", "stock": 3}
    # The tool's result went back to the model paired with the id the model gave its call.
    call_id, content = _tool_result_of(requests[1])
    assert call_id == call["id"] and orjson.loads(content) == {"sku": "A1", "stock": 3}

    # Usage and cost, recorded with each call.
    total = 0.0
    for s in llm_steps:
        usage = s.meta["usage"]
        assert s.meta["provider"] == provider and s.meta["model"] == model
        assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        expected = cost_usd(model, usage, provider)
        assert expected is not None and s.meta["cost_usd"] == expected
        assert expected == 0.0 if case == "ollama" else expected > 0
        total += expected
    assert out["cost_usd"] == pytest.approx(total)

    # Streaming deltas, live on the delta subject, make up the final answer.
    deltas = [d for d in got if "delta" in d and d["step"].endswith("/llm/2")]
    assert len(deltas) > 3 and "".join(d["delta"] for d in deltas) == ANSWER
    assert [d["seq"] for d in deltas] == list(range(1, len(deltas) + 1))

    if reasoning is None:
        return
    # Reasoning settings passed through in the provider's own terms, the reasoning kept in
    # the decision record and shown by the analytics decisions view.
    first, second = requests[0].body, requests[1].body
    if kind == "responses":
        assert first["reasoning"] == {"effort": "low", "summary": "auto"}
    else:
        assert first["thinking"] == {"type": "enabled", "budget_tokens": 1024}
        assert first["max_tokens"] > 1024
        turn = next(m for m in second["messages"] if m["role"] == "assistant")
        # The signed thinking block goes back at the head of its tool-use turn.
        assert turn["content"][0]["type"] == "thinking"
        assert turn["content"][0]["thinking"] == THOUGHT
        assert turn["content"][0]["signature"].startswith("sig-dev-")
        assert turn["content"][1]["type"] == "tool_use"
    assert llm_steps[0].meta["choice"]["reasoning"] == THOUGHT
    if llm_steps[0].meta["usage"].get("reasoning_tokens") is not None:
        assert llm_steps[0].meta["usage"]["reasoning_tokens"] > 0
    export = tmp_path / "export"
    async with Exporter(env.as_role("service"), export) as exporter:
        await exporter.export_once()
    con = analytics.connect(export)
    rows = con.execute(
        "select chosen_tool, reasoning from decisions where run_id = ?", [out["run_id"]]
    ).fetchall()
    assert rows == [("lookup", THOUGHT)]


# --------------------------------------------------------------------------- errors


async def test_a_missing_key_fails_the_run_in_one_line_naming_the_variable(
    env_factory: Any, subprocess_env: Any, tmp_path: Path
) -> None:
    """A groq agent on a worker whose environment has no GROQ_API_KEY: the run fails before
    any call, with one line that says which variable to set."""
    async with DevLLM() as llm:
        for var in ALL_VARS:
            subprocess_env.pop(var, None)
        env = await env_factory([], with_worker=False)
        worker = spawn(WORKER, subprocess_env.as_role("worker"), tmp_path / "worker.out")
        try:
            h = await env.client.start("provider_job", "groq")
            with pytest.raises(WorkflowFailedError) as failed:
                await h.result(timeout=60)
        finally:
            stop(worker)
        assert llm.requests == []
    text = str(failed.value)
    print(text)
    assert "GROQ_API_KEY" in text and "GROQ_BASE_URL" in text
    assert "\n" not in text.strip()


@pytest.mark.parametrize("provider", sorted(set(PROVIDERS) - {"ollama"}))
def test_each_provider_without_a_key_names_its_variables(
    provider: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ALL_VARS:
        monkeypatch.delenv(var, raising=False)
    spec = PROVIDERS[provider]
    agent = Agent(f"keyless_{provider}", provider=provider, model="some-model")
    with pytest.raises(AgentConfigError) as missing:
        agent.config.resolved_key()
    text = str(missing.value)
    assert "\n" not in text
    if provider == "azure":  # no public endpoint: the endpoint is asked for first
        assert "AZURE_OPENAI_BASE_URL" in text and "AZURE_OPENAI_ENDPOINT" in text
        monkeypatch.setenv("AZURE_OPENAI_ENDPOINT", "https://example.openai.azure.com")
        with pytest.raises(AgentConfigError) as missing:
            agent.config.resolved_key()
        text = str(missing.value)
    assert spec.key_env[0] in text, text
    monkeypatch.setenv(spec.key_env[0], "k-1")
    assert agent.config.resolved_key() == "k-1"


def test_ollama_needs_no_key_and_costs_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ALL_VARS:
        monkeypatch.delenv(var, raising=False)
    agent = Agent("local_ollama", provider="ollama", model="llama3.2")
    assert agent.config.resolved_key() == "not-needed"
    assert agent.config.effective_base_url == "http://localhost:11434/v1"
    monkeypatch.setenv("OLLAMA_HOST", "http://gpu-box:11434")
    assert agent.config.effective_base_url == "http://gpu-box:11434/v1"
    assert agent.config.llm_api_in_use == "chat_completions"
    usage = {"prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 150}
    assert cost_usd("llama3.2", usage, "ollama") == 0.0


def test_an_unknown_provider_or_api_fails_where_the_agent_is_built() -> None:
    with pytest.raises(AgentConfigError) as unknown:
        Agent("typo_agent", provider="antropic", model="claude-sonnet-4-5")
    text = str(unknown.value)
    assert "\n" not in text and "'antropic'" in text
    assert all(name in text for name in PROVIDERS)
    import dataclasses

    agent = Agent("api_agent", provider="anthropic", model="claude-sonnet-4-5")
    with pytest.raises(AgentConfigError, match="'responses' is not spoken by provider 'anthropic'"):
        dataclasses.replace(agent.config, llm_api="responses")
    with pytest.raises(AgentConfigError, match="use 'responses' or 'chat_completions'"):
        dataclasses.replace(Agent("api_agent2").config, llm_api="completions")


def test_openai_speaks_responses_to_openai_and_chat_to_other_servers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for var in ALL_VARS:
        monkeypatch.delenv(var, raising=False)
    assert Agent("to_openai").config.llm_api_in_use == "responses"
    assert Agent("to_vllm", base_url="http://vllm:8000/v1").config.llm_api_in_use == (
        "chat_completions"
    )
    monkeypatch.setenv("OPENAI_BASE_URL", "http://gateway/v1")
    assert Agent("to_gateway").config.llm_api_in_use == "chat_completions"


def test_prices_per_provider_and_model() -> None:
    usage = {"prompt_tokens": 1_000_000, "completion_tokens": 1_000_000, "cached_tokens": 0}
    # A dated name takes its model's price; a provider's own price wins over none.
    assert cost_usd("claude-sonnet-4-5-20250929", usage, "anthropic") == 18.0
    assert cost_usd("llama-3.3-70b-versatile", usage, "groq") == pytest.approx(1.38)
    assert cost_usd("llama-3.3-70b-versatile", usage, "together") is None
    cached = {"prompt_tokens": 1_000_000, "completion_tokens": 0, "cached_tokens": 500_000}
    assert cost_usd("gpt-4o", cached, "openai") == pytest.approx(1.25 + 0.625)
    written = {
        "prompt_tokens": 1_000_000,
        "completion_tokens": 0,
        "cached_tokens": 0,
        "cache_write_tokens": 1_000_000,
    }
    assert cost_usd("claude-haiku-4-5", written, "anthropic") == pytest.approx(1.25)
