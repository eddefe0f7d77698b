"""OpenAI Responses (``client.responses.create``), OpenAI's default API. The loop's history is in
Chat Completions shape; this turns it into Responses input items (leading system messages become
``instructions``, tool calls ``function_call`` items, tool results ``function_call_output``) and
the response back into the loop's message, the reasoning summaries included."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from functools import cache
from typing import Any

from .base import ProviderConfig, ProviderError, dumps, effort_of, parse_args, text_of, usage_dict


@cache
def _accepted() -> frozenset[str]:
    from openai.resources.responses import AsyncResponses

    return frozenset(inspect.signature(AsyncResponses.create).parameters) - {"self"}


def _user_content(content: Any) -> Any:
    if not isinstance(content, list):
        return text_of(content)
    parts: list[Any] = []
    for p in content:
        kind = p.get("type") if isinstance(p, dict) else None
        if kind == "text":
            parts.append({"type": "input_text", "text": p.get("text", "")})
        elif kind == "image_url":
            url = p.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            parts.append({"type": "input_image", "image_url": url})
        else:
            parts.append(p)  # already a Responses part (input_text, input_file...)
    return parts


def responses_input(messages: list[dict[str, Any]]) -> tuple[str | None, list[dict[str, Any]]]:
    """``(instructions, input items)`` for a chat-format history."""
    instructions: list[str] = []
    items: list[dict[str, Any]] = []
    for m in messages:
        role = m.get("role")
        if role is None and m.get("type"):
            items.append(m)  # a Responses item given as input: as it is
        elif role in ("system", "developer"):
            if not items:
                instructions.append(text_of(m.get("content")))
            else:  # a later system message stays where it was said
                items.append({"role": role, "content": text_of(m.get("content"))})
        elif role == "user":
            items.append({"role": "user", "content": _user_content(m.get("content"))})
        elif role == "assistant":
            text = text_of(m.get("content"))
            if text:
                items.append({"role": "assistant", "content": text})
            for tc in m.get("tool_calls") or []:
                fn = tc.get("function") or {}
                # No item id: an id would have to come with its reasoning item.
                items.append(
                    {
                        "type": "function_call",
                        "call_id": tc.get("id"),
                        "name": fn.get("name"),
                        "arguments": dumps(fn.get("arguments") or {}),
                    }
                )
        elif role == "tool":
            items.append(
                {
                    "type": "function_call_output",
                    "call_id": m.get("tool_call_id"),
                    "output": text_of(m.get("content")),
                }
            )
        else:
            raise ProviderError(None, f"a message with role {role!r} has no Responses form")
    return ("\n\n".join(instructions) if instructions else None), items


def _tool(schema: dict[str, Any]) -> dict[str, Any]:
    if schema.get("type") != "function" or "function" not in schema:
        return schema  # a Responses tool already (web_search, a function in Responses shape)
    fn = schema["function"]
    out = {
        "type": "function",
        "name": fn["name"],
        "parameters": fn.get("parameters") or {"type": "object", "properties": {}},
        "strict": bool(fn.get("strict", False)),
    }
    if fn.get("description"):
        out["description"] = fn["description"]
    return out


def responses_kwargs(request: dict[str, Any]) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in request.items():
        if key == "messages":
            instructions, items = responses_input(value)
            kw["input"] = items
            if instructions is not None:
                kw["instructions"] = instructions
        elif key == "tools":
            kw["tools"] = [_tool(t) for t in value]
        elif key == "response_format":
            fmt = value or {}
            if fmt.get("type") == "json_schema":
                js = fmt.get("json_schema") or {}
                kw["text"] = {
                    "format": {
                        "type": "json_schema",
                        "name": js.get("name", "output"),
                        "schema": js.get("schema", {}),
                        "strict": bool(js.get("strict", False)),
                    }
                }
            elif fmt:
                kw["text"] = {"format": fmt}
        elif key in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
            kw["max_output_tokens"] = value
        elif key == "tool_choice" and isinstance(value, dict) and "function" in value:
            kw["tool_choice"] = {"type": "function", "name": value["function"].get("name")}
        elif key in ("reasoning", "reasoning_effort"):
            reasoning = (
                dict(request["reasoning"]) if isinstance(request.get("reasoning"), dict) else {}
            )
            effort = effort_of(request)
            if effort is not None:
                reasoning["effort"] = effort
            # A summary is what the decision record keeps of the model's reasoning.
            reasoning.setdefault("summary", "auto")
            kw["reasoning"] = reasoning
        else:
            (kw if key in _accepted() else extra)[key] = value
    if extra:
        kw["extra_body"] = {**extra, **kw.get("extra_body", {})}
    return kw


def parse_response(resp: Any) -> tuple[dict[str, Any], dict[str, int], str | None]:
    text: list[str] = []
    calls: list[dict[str, Any]] = []
    summaries: list[str] = []
    for item in resp.output or []:
        kind = getattr(item, "type", None)
        if kind == "message":
            for part in item.content or []:
                if getattr(part, "type", None) == "output_text":
                    text.append(part.text)
                elif getattr(part, "type", None) == "refusal":
                    text.append(part.refusal)
        elif kind == "function_call":
            calls.append(
                {"id": item.call_id, "name": item.name, "arguments": parse_args(item.arguments)}
            )
        elif kind == "reasoning":
            said = [s.text for s in (item.summary or []) if getattr(s, "text", None)]
            if not said:  # open-weight models send their reasoning text itself
                said = [c.text for c in (getattr(item, "content", None) or []) if c.text]
            summaries.extend(said)
    u = resp.usage
    if u is None:
        usage = usage_dict(0, 0)
    else:
        cached = getattr(getattr(u, "input_tokens_details", None), "cached_tokens", 0) or 0
        reasoning = getattr(getattr(u, "output_tokens_details", None), "reasoning_tokens", 0) or 0
        usage = usage_dict(u.input_tokens or 0, u.output_tokens or 0, cached, reasoning)
        usage["total_tokens"] = u.total_tokens or usage["total_tokens"]
    finish = "tool_calls" if calls else "stop"
    if getattr(resp, "status", None) == "incomplete":
        why = getattr(getattr(resp, "incomplete_details", None), "reason", None)
        finish = "length" if why == "max_output_tokens" else str(why or "incomplete")
    message = {
        "content": "".join(text) if text or not calls else None,
        "tool_calls": calls,
        "reasoning": "\n\n".join(summaries) or None,
    }
    return message, usage, finish


async def responses_call(
    client: Any,
    cfg: ProviderConfig,
    request: dict[str, Any],
    headers: dict[str, str] | None,
    on_delta: Callable[[str], Awaitable[None]] | None,
) -> tuple[dict[str, Any], dict[str, int], str | None]:
    kw = responses_kwargs(request)
    if on_delta is None:
        resp = await client.responses.create(model=cfg.model, extra_headers=headers, **kw)
        return parse_response(resp)
    stream = await client.responses.create(
        model=cfg.model, extra_headers=headers, stream=True, **kw
    )
    final: Any = None
    async for event in stream:
        kind = getattr(event, "type", None)
        if kind == "response.output_text.delta" and event.delta:
            await on_delta(event.delta)
        elif kind in ("response.completed", "response.incomplete"):
            final = event.response
        elif kind == "response.failed":
            err = getattr(event.response, "error", None)
            raise ProviderError(None, str(getattr(err, "message", None) or "response failed"))
        elif kind == "error":
            raise ProviderError(None, str(getattr(event, "message", None) or "stream error"))
    if final is None:
        raise ProviderError(None, "the Responses stream ended before response.completed")
    return parse_response(final)


__all__ = ["parse_response", "responses_call", "responses_input", "responses_kwargs"]
