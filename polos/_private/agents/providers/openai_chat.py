"""OpenAI Chat Completions (``client.chat.completions.create``): OpenAI's older format, and the
one every OpenAI-compatible server speaks (Azure, Gemini, Groq, Fireworks, Together, Ollama,
vLLM, LiteLLM). The loop's requests are already in this shape; only our own additions go."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from functools import cache
from typing import Any

from .base import ProviderConfig, ProviderError, effort_of, parse_args, usage_dict

# Keys the loop may put on a message that are ours, not the wire format's.
_OURS = ("reasoning_items", "reasoning")


@cache
def _accepted() -> frozenset[str]:
    from openai.resources.chat.completions import AsyncCompletions

    return frozenset(inspect.signature(AsyncCompletions.create).parameters) - {"self"}


def _clean(message: dict[str, Any]) -> dict[str, Any]:
    if not any(k in message for k in _OURS):
        return message
    return {k: v for k, v in message.items() if k not in _OURS}


def chat_kwargs(cfg: ProviderConfig, request: dict[str, Any]) -> dict[str, Any]:
    """The loop's request as keyword arguments of ``chat.completions.create``; a setting the
    installed client does not know travels in ``extra_body`` for the server to judge."""
    kw: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in request.items():
        if key == "messages":
            value = [_clean(m) for m in value]
        elif key == "max_output_tokens":
            # OpenAI's reasoning models refuse max_tokens; compatible servers know max_tokens.
            key = "max_completion_tokens" if cfg.provider == "openai" else "max_tokens"
        elif key == "reasoning":
            other = sorted(set(value) - {"effort", "summary"}) if isinstance(value, dict) else []
            if other:
                raise ProviderError(
                    None,
                    f"reasoning settings {other} have no Chat Completions form: give "
                    "reasoning_effort, or use llm_api='responses'",
                )
            effort = effort_of(request)
            if effort is not None and "reasoning_effort" not in request:
                kw["reasoning_effort"] = effort
            continue
        (kw if key in _accepted() else extra)[key] = value
    if extra:
        kw["extra_body"] = {**extra, **kw.get("extra_body", {})}
    return kw


def _usage(u: Any) -> dict[str, int]:
    if u is None:
        return usage_dict(0, 0)
    details = getattr(u, "prompt_tokens_details", None)
    cached = (getattr(details, "cached_tokens", 0) or 0) if details is not None else 0
    out_details = getattr(u, "completion_tokens_details", None)
    reasoning = (getattr(out_details, "reasoning_tokens", 0) or 0) if out_details else 0
    p = getattr(u, "prompt_tokens", 0) or 0
    c = getattr(u, "completion_tokens", 0) or 0
    usage = usage_dict(p, c, cached, reasoning)
    usage["total_tokens"] = getattr(u, "total_tokens", 0) or p + c
    return usage


async def chat_call(
    client: Any,
    cfg: ProviderConfig,
    request: dict[str, Any],
    headers: dict[str, str] | None,
    on_delta: Callable[[str], Awaitable[None]] | None,
) -> tuple[dict[str, Any], dict[str, int], str | None]:
    kw = chat_kwargs(cfg, request)
    if on_delta is not None:
        return await _stream(client, cfg, kw, headers, on_delta)
    resp = await client.chat.completions.create(model=cfg.model, extra_headers=headers, **kw)
    choice = resp.choices[0]
    msg = choice.message
    extra = msg.model_extra or {}
    message = {
        "content": msg.content,
        "tool_calls": [
            {
                "id": tc.id,
                "name": tc.function.name,
                "arguments": parse_args(tc.function.arguments),
            }
            for tc in (msg.tool_calls or [])
        ],
        # vLLM/DeepSeek answer "reasoning_content", Ollama and OpenRouter "reasoning".
        "reasoning": getattr(msg, "reasoning_content", None)
        or extra.get("reasoning_content")
        or extra.get("reasoning"),
    }
    return message, _usage(resp.usage), choice.finish_reason


async def _stream(
    client: Any,
    cfg: ProviderConfig,
    kw: dict[str, Any],
    headers: dict[str, str] | None,
    on_delta: Callable[[str], Awaitable[None]],
) -> tuple[dict[str, Any], dict[str, int], str | None]:
    stream = await client.chat.completions.create(
        model=cfg.model,
        extra_headers=headers,
        stream=True,
        stream_options={"include_usage": True},
        **kw,
    )
    text: list[str] = []
    reasoning: list[str] = []
    calls: dict[int, dict[str, Any]] = {}
    usage: dict[str, int] = _usage(None)
    finish: str | None = None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = _usage(chunk.usage)
        for choice in chunk.choices:
            d = choice.delta
            if d.content:
                text.append(d.content)
                await on_delta(d.content)
            extra = d.model_extra or {}
            said = extra.get("reasoning_content") or extra.get("reasoning")
            if isinstance(said, str) and said:
                reasoning.append(said)
            for tc in d.tool_calls or []:
                slot = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                if tc.id:
                    slot["id"] = tc.id
                if tc.function is not None:
                    slot["name"] += tc.function.name or ""
                    slot["arguments"] += tc.function.arguments or ""
            if choice.finish_reason:
                finish = choice.finish_reason
    message = {
        "content": "".join(text) if text or not calls else None,
        "tool_calls": [
            {"id": c["id"], "name": c["name"], "arguments": parse_args(c["arguments"])}
            for _, c in sorted(calls.items())
        ],
        "reasoning": "".join(reasoning) or None,
    }
    return message, usage, finish


__all__ = ["chat_call", "chat_kwargs"]
