"""Anthropic Messages (``AsyncAnthropic().messages``), through the official ``anthropic`` client.

The loop's history is in Chat Completions shape; this turns it into Messages: system messages
become ``system``, tool calls ``tool_use`` blocks, tool results ``tool_result`` blocks in a user
turn, and thinking blocks (with their signatures) go back at the head of their assistant turn, as
Anthropic requires when a thinking model uses tools."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from functools import cache
from typing import Any

from .base import ProviderConfig, ProviderError, effort_of, parse_args, text_of, usage_dict

DEFAULT_MAX_TOKENS = 4096
# Thinking budgets for a reasoning effort (Anthropic's minimum budget is 1024 tokens).
THINKING_BUDGET = {"minimal": 1024, "low": 1024, "medium": 4096, "high": 16384, "xhigh": 32768}
_STOP = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "tool_use": "tool_calls",
    "max_tokens": "length",
}


@cache
def _accepted() -> frozenset[str]:
    from anthropic.resources.messages import AsyncMessages

    return frozenset(inspect.signature(AsyncMessages.stream).parameters) - {"self"}


def _image(url: str) -> dict[str, Any]:
    if url.startswith("data:") and ";base64," in url:
        media, data = url[5:].split(";base64,", 1)
        return {"type": "image", "source": {"type": "base64", "media_type": media, "data": data}}
    return {"type": "image", "source": {"type": "url", "url": url}}


def _user_blocks(content: Any) -> list[dict[str, Any]]:
    if not isinstance(content, list):
        text = text_of(content)
        return [{"type": "text", "text": text}] if text else []
    blocks: list[dict[str, Any]] = []
    for p in content:
        kind = p.get("type") if isinstance(p, dict) else None
        if kind == "text":
            blocks.append({"type": "text", "text": p.get("text", "")})
        elif kind == "image_url":
            url = p.get("image_url")
            blocks.append(_image(str(url.get("url") if isinstance(url, dict) else url)))
        elif isinstance(p, dict):
            blocks.append(p)  # an Anthropic block already
    return blocks


def anthropic_messages(
    messages: list[dict[str, Any]],
) -> tuple[str | None, list[dict[str, Any]]]:
    """``(system, messages)`` for a chat-format history; consecutive turns of one role merge."""
    system: list[str] = []
    out: list[dict[str, Any]] = []

    def add(role: str, blocks: list[dict[str, Any]]) -> None:
        if not blocks:
            return
        if out and out[-1]["role"] == role:
            out[-1]["content"].extend(blocks)
        else:
            out.append({"role": role, "content": list(blocks)})

    for m in messages:
        role = m.get("role")
        if role in ("system", "developer"):
            system.append(text_of(m.get("content")))
        elif role == "user":
            add("user", _user_blocks(m.get("content")))
        elif role == "assistant":
            blocks = [dict(b) for b in m.get("reasoning_items") or [] if isinstance(b, dict)]
            text = text_of(m.get("content"))
            if text:
                blocks.append({"type": "text", "text": text})
            for tc in m.get("tool_calls") or []:
                fn = tc.get("function") or {}
                args = fn.get("arguments")
                args = parse_args(args) if isinstance(args, str) else (args or {})
                blocks.append(
                    {
                        "type": "tool_use",
                        "id": tc.get("id"),
                        "name": fn.get("name"),
                        "input": args if isinstance(args, dict) else {"arguments": args},
                    }
                )
            add("assistant", blocks)
        elif role == "tool":
            block: dict[str, Any] = {
                "type": "tool_result",
                "tool_use_id": m.get("tool_call_id"),
                "content": text_of(m.get("content")),
            }
            if m.get("is_error"):
                block["is_error"] = True
            add("user", [block])
        else:
            raise ProviderError(None, f"a message with role {role!r} has no Anthropic form")
    return ("\n\n".join(s for s in system if s) or None), out


def _tool(schema: dict[str, Any]) -> dict[str, Any]:
    if schema.get("type") != "function" or "function" not in schema:
        return schema  # an Anthropic tool already (a server tool, a custom tool)
    fn = schema["function"]
    out = {
        "name": fn["name"],
        "input_schema": fn.get("parameters") or {"type": "object", "properties": {}},
    }
    if fn.get("description"):
        out["description"] = fn["description"]
    return out


def _tool_choice(value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        if "function" in value:
            return {"type": "tool", "name": value["function"].get("name")}
        return value
    return {"type": {"required": "any"}.get(str(value), str(value))}


def anthropic_kwargs(request: dict[str, Any]) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    max_tokens: int | None = None
    for key, value in request.items():
        if key == "messages":
            system, msgs = anthropic_messages(value)
            kw["messages"] = msgs
            if system is not None:
                kw["system"] = system
        elif key == "tools":
            kw["tools"] = [_tool(t) for t in value]
        elif key in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
            max_tokens = int(value)
        elif key == "tool_choice":
            kw["tool_choice"] = {**kw.get("tool_choice", {}), **_tool_choice(value)}
        elif key == "parallel_tool_calls":
            if value is False:
                choice = kw.setdefault("tool_choice", {"type": "auto"})
                choice["disable_parallel_tool_use"] = True
        elif key == "stop":
            kw["stop_sequences"] = [value] if isinstance(value, str) else list(value)
        elif key == "user":
            kw["metadata"] = {**kw.get("metadata", {}), "user_id": value}
        elif key == "response_format":
            fmt = value or {}
            if fmt.get("type") == "json_schema":
                schema = (fmt.get("json_schema") or {}).get("schema", {})
                kw["output_config"] = {
                    **kw.get("output_config", {}),
                    "format": {"type": "json_schema", "schema": schema},
                }
            elif fmt.get("type") == "json_object":
                extra_system = "Answer with one JSON object and nothing else."
                kw["system"] = (
                    f"{kw['system']}\n\n{extra_system}" if "system" in kw else extra_system
                )
        elif key in ("reasoning", "reasoning_effort"):
            if "thinking" in request:
                continue  # Anthropic's own setting wins
            given = request.get("reasoning")
            reasoning: dict[str, Any] = given if isinstance(given, dict) else {}
            effort = effort_of(request)
            budget = reasoning.get("budget_tokens") or THINKING_BUDGET.get(str(effort))
            if effort == "none":
                kw["thinking"] = {"type": "disabled"}
            elif budget is None:
                raise ProviderError(
                    None,
                    f"reasoning effort {effort!r} has no Anthropic thinking budget: use "
                    f"{', '.join(THINKING_BUDGET)} or reasoning={{'budget_tokens': N}}",
                )
            else:
                kw["thinking"] = {"type": "enabled", "budget_tokens": int(budget)}
        else:
            (kw if key in _accepted() else extra)[key] = value
    budget = (kw.get("thinking") or {}).get("budget_tokens")
    if max_tokens is None:
        max_tokens = DEFAULT_MAX_TOKENS
        if isinstance(budget, int) and budget >= max_tokens:
            max_tokens = budget + DEFAULT_MAX_TOKENS  # room for the answer after the thinking
    kw["max_tokens"] = max_tokens
    if extra:
        kw["extra_body"] = {**extra, **kw.get("extra_body", {})}
    return kw


def parse_message(msg: Any) -> tuple[dict[str, Any], dict[str, int], str | None]:
    text: list[str] = []
    calls: list[dict[str, Any]] = []
    thoughts: list[str] = []
    items: list[dict[str, Any]] = []
    for block in msg.content or []:
        kind = getattr(block, "type", None)
        if kind == "text":
            text.append(block.text)
        elif kind == "tool_use":
            calls.append({"id": block.id, "name": block.name, "arguments": block.input})
        elif kind == "thinking":
            thoughts.append(block.thinking)
            items.append(
                {"type": "thinking", "thinking": block.thinking, "signature": block.signature}
            )
        elif kind == "redacted_thinking":
            items.append({"type": "redacted_thinking", "data": block.data})
    u = msg.usage
    read = getattr(u, "cache_read_input_tokens", 0) or 0
    write = getattr(u, "cache_creation_input_tokens", 0) or 0
    # Anthropic's input_tokens leave out the cached part; ours count every prompt token.
    usage = usage_dict((u.input_tokens or 0) + read + write, u.output_tokens or 0, read, 0, write)
    message: dict[str, Any] = {
        "content": "".join(text) if text or not calls else None,
        "tool_calls": calls,
        "reasoning": "\n\n".join(t for t in thoughts if t) or None,
    }
    if items:
        message["reasoning_items"] = items
    stop = getattr(msg, "stop_reason", None)
    return message, usage, _STOP.get(str(stop), stop)


async def anthropic_call(
    client: Any,
    cfg: ProviderConfig,
    request: dict[str, Any],
    headers: dict[str, str] | None,
    on_delta: Callable[[str], Awaitable[None]] | None,
) -> tuple[dict[str, Any], dict[str, int], str | None]:
    kw = anthropic_kwargs(request)
    if on_delta is None:
        msg = await client.messages.create(model=cfg.model, extra_headers=headers, **kw)
        return parse_message(msg)
    async with client.messages.stream(model=cfg.model, extra_headers=headers, **kw) as stream:
        async for event in stream:
            if getattr(event, "type", None) == "text" and event.text:
                await on_delta(event.text)
        final = await stream.get_final_message()
    return parse_message(final)


__all__ = ["anthropic_call", "anthropic_kwargs", "anthropic_messages", "parse_message"]
