"""Polos dev LLM: a small *scripted* LLM HTTP server. It is NOT a model.

It exists so that tests and the demo can drive the real ``openai`` and ``anthropic`` clients
over real HTTP without an API key, and so that tests can see exactly which requests a crashed
and resumed agent made. It speaks three wire formats, each with tools, parallel tool calls, text
alongside tool calls, reasoning, JSON answers, streaming SSE and errors such as 429 with
``Retry-After`` and 5xx:

- OpenAI Chat Completions, ``POST /v1/chat/completions`` (reasoning as ``reasoning_content``
  (vLLM, DeepSeek) or ``reasoning`` (Ollama); ``response_format``);
- OpenAI Responses, ``POST /v1/responses`` (reasoning as a summary item; ``text.format``);
- Anthropic Messages, ``POST /v1/messages`` (reasoning as a signed thinking block;
  ``output_config.format``);

plus ``GET /v1/models``, and it keeps a request log. With ``api_key`` set it refuses (401)
a request that does not carry that key (``Authorization: Bearer``, ``x-api-key`` or
``api-key``), so a test can prove which key a provider sent.

What it answers is decided, in order, by:

1. the queue filled with ``server.script(Reply...)`` (one reply per request, FIFO);
2. the ``responder`` callable given to the constructor (``body -> Reply``, sync or async);
3. a fixed, documented rule: if tools are offered and no tool result followed the last user
   message, it calls every offered tool (arguments filled from their JSON schemas); otherwise it
   answers, as JSON filled from the requested schema if one was asked for, else as text
   that says it is the dev server.

The responder and the rule see every request in Chat Completions shape (``chat_view``), whatever
format it came in, so one script serves every provider; the log keeps each body as it was sent.

Run it alone with ``python -m polos.devllm --port 8799`` and point ``base_url`` at
``http://127.0.0.1:8799/v1`` (Anthropic's client: ``http://127.0.0.1:8799``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import itertools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

LABEL = "Polos dev LLM (scripted test server, not a model)"


@dataclass
class Reply:
    """One scripted answer. Build it with the class methods."""

    content: str | None = None
    tool_calls: list[tuple[str, dict[str, Any] | str]] = field(default_factory=list)
    status: int = 200
    error_message: str | None = None
    retry_after: float | None = None
    finish_reason: str | None = None
    reasoning: str | None = None
    # The field Chat Completions sends the reasoning in: "reasoning_content" (vLLM, DeepSeek) or
    # "reasoning" (Ollama, OpenRouter). Responses sends it as a summary, Anthropic as thinking.
    reasoning_as: str = "reasoning_content"
    # Seconds to wait before answering (lets a test kill a client mid-request).
    delay: float = 0.0

    @classmethod
    def text(cls, content: str, **kw: Any) -> Reply:
        return cls(content=content, **kw)

    @classmethod
    def json(cls, value: Any, **kw: Any) -> Reply:
        return cls(content=orjson.dumps(value).decode(), **kw)

    @classmethod
    def tools(cls, *calls: tuple[str, dict[str, Any] | str], **kw: Any) -> Reply:
        """Tool calls: ``Reply.tools(("lookup", {"sku": "A1"}), ("price", {...}))``.

        A string instead of a dict is sent as the raw arguments (to test invalid JSON)."""
        return cls(tool_calls=list(calls), **kw)

    @classmethod
    def error(
        cls, status: int, message: str = "scripted error", retry_after: float | None = None
    ) -> Reply:
        return cls(status=status, error_message=message, retry_after=retry_after)


@dataclass
class LoggedRequest:
    """One request the server received. ``answered`` is False until the reply was sent."""

    n: int
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    at: float
    status: int | None = None
    answered: bool = False

    @property
    def kind(self) -> str | None:
        """The wire format: ``"chat"``, ``"responses"``, ``"messages"`` (None for other paths)."""
        return _kind(self.path)

    @property
    def step(self) -> str | None:
        """The Polos step that made the call (``X-Polos-Step``: ``<run_id>:<step key>``)."""
        return self.headers.get("x-polos-step")


Responder = Callable[[dict[str, Any]], "Reply | Awaitable[Reply]"]


def estimate_tokens(text: str) -> int:
    """Roughly four characters a token: enough for usage figures and budgets in tests."""
    return max(1, len(text) // 4)


def _example(schema: dict[str, Any], name: str = "", answer: bool = False) -> Any:
    """A value that fits a JSON schema, for the fixed rule's tool arguments and JSON answers."""
    if "default" in schema:
        return schema["default"]
    if schema.get("enum"):
        return schema["enum"][0]
    for alt in ("anyOf", "oneOf"):
        if schema.get(alt):
            options = [s for s in schema[alt] if s.get("type") != "null"] or schema[alt]
            return _example(options[0], name, answer)
    t = schema.get("type")
    if isinstance(t, list):
        t = next((x for x in t if x != "null"), "null")
    if t == "object" or "properties" in schema:
        props = schema.get("properties", {})
        return {k: _example(v, k, answer) for k, v in props.items()}
    if t == "array":
        return [_example(schema.get("items", {}), name, answer)]
    if t == "boolean":
        return True
    if t == "integer":
        return 1
    if t == "number":
        return 1.0
    if t == "null":
        return None
    return f"{name or 'value'}: {LABEL}" if answer else f"dev-{name or 'value'}"


def default_reply(body: dict[str, Any]) -> Reply:
    """The fixed rule described in the module docstring."""
    messages = body.get("messages") or []
    tools = body.get("tools") or []
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
    tool_results_since = any(m.get("role") == "tool" for m in messages[last_user + 1 :])
    callable_tools = [
        t["function"]
        for t in tools
        if t.get("type") == "function"
        and not t["function"]["name"].startswith(("transfer_to_", "memory_"))
    ]
    if callable_tools and not tool_results_since:
        return Reply.tools(
            *(
                (f["name"], _example(f.get("parameters") or {"type": "object"}))
                for f in callable_tools
            )
        )
    fmt = body.get("response_format") or {}
    if fmt.get("type") == "json_schema":
        return Reply.json(_example(fmt.get("json_schema", {}).get("schema", {}), answer=True))
    if fmt.get("type") == "json_object":
        return Reply.json({"answer": LABEL})
    return Reply.text(f"{LABEL}: received {len(messages)} messages.")


# --------------------------------------------------------------------------- the wire formats


def _kind(path: str) -> str | None:
    path = path.split("?", 1)[0].rstrip("/")
    if path.endswith("/chat/completions"):
        return "chat"
    if path.endswith("/responses"):
        return "responses"
    if path.endswith("/messages"):
        return "messages"
    return None


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) if isinstance(p, dict) else str(p) for p in content)
    return orjson.dumps(content).decode()


def _fn_tool(name: Any, description: Any, parameters: Any) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": str(name),
            "description": description or "",
            "parameters": parameters or {"type": "object"},
        },
    }


def _responses_view(body: dict[str, Any]) -> dict[str, Any]:
    messages: list[dict[str, Any]] = []
    if body.get("instructions"):
        messages.append({"role": "system", "content": body["instructions"]})
    items = body.get("input")
    for item in [{"role": "user", "content": items}] if isinstance(items, str) else items or []:
        kind = item.get("type")
        if kind == "function_call":
            messages.append(
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": item.get("call_id"),
                            "type": "function",
                            "function": {
                                "name": item.get("name"),
                                "arguments": item.get("arguments"),
                            },
                        }
                    ],
                }
            )
        elif kind == "function_call_output":
            messages.append(
                {"role": "tool", "tool_call_id": item.get("call_id"), "content": item.get("output")}
            )
        elif "role" in item:
            messages.append({"role": item["role"], "content": _text(item.get("content"))})
    tools = [
        _fn_tool(t.get("name"), t.get("description"), t.get("parameters"))
        for t in body.get("tools") or []
        if t.get("type") == "function"
    ]
    view: dict[str, Any] = {"model": body.get("model"), "messages": messages, "tools": tools}
    fmt = (body.get("text") or {}).get("format") or {}
    if fmt.get("type") == "json_schema":
        view["response_format"] = {
            "type": "json_schema",
            "json_schema": {"schema": fmt.get("schema", {})},
        }
    elif fmt.get("type") == "json_object":
        view["response_format"] = {"type": "json_object"}
    return view


def _messages_view(body: dict[str, Any]) -> dict[str, Any]:
    messages: list[dict[str, Any]] = []
    system = body.get("system")
    if system:
        messages.append({"role": "system", "content": _text(system)})
    for m in body.get("messages") or []:
        content = m.get("content")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content or []
        text = "".join(b.get("text", "") for b in blocks if b.get("type") == "text")
        if m.get("role") == "assistant":
            calls = [
                {
                    "id": b.get("id"),
                    "type": "function",
                    "function": {
                        "name": b.get("name"),
                        "arguments": orjson.dumps(b.get("input")).decode(),
                    },
                }
                for b in blocks
                if b.get("type") == "tool_use"
            ]
            msg: dict[str, Any] = {"role": "assistant", "content": text or None}
            if calls:
                msg["tool_calls"] = calls
            messages.append(msg)
            continue
        for b in blocks:
            if b.get("type") == "tool_result":
                messages.append(
                    {
                        "role": "tool",
                        "tool_call_id": b.get("tool_use_id"),
                        "content": _text(b.get("content")),
                    }
                )
        if text or not any(b.get("type") == "tool_result" for b in blocks):
            messages.append({"role": m.get("role", "user"), "content": text})
    tools = [
        _fn_tool(t.get("name"), t.get("description"), t.get("input_schema"))
        for t in body.get("tools") or []
        if "input_schema" in t
    ]
    view: dict[str, Any] = {"model": body.get("model"), "messages": messages, "tools": tools}
    fmt = (body.get("output_config") or {}).get("format") or {}
    if fmt.get("type") == "json_schema":
        view["response_format"] = {
            "type": "json_schema",
            "json_schema": {"schema": fmt.get("schema", {})},
        }
    return view


def chat_view(kind: str, body: dict[str, Any]) -> dict[str, Any]:
    """A request of any wire format in Chat Completions shape (``messages``, ``tools``,
    ``response_format``, ``model``, ``stream``): what responders and the fixed rule read."""
    if kind == "chat":
        return body
    view = _responses_view(body) if kind == "responses" else _messages_view(body)
    view["stream"] = bool(body.get("stream"))
    return view


def _invalid(kind: str, body: Any) -> str | None:
    """Why a request body is not one of its format (None when it is)."""
    if not isinstance(body, dict) or not body.get("model"):
        return "'model' is required"
    if kind == "chat" and not isinstance(body.get("messages"), list):
        return "'messages' is required"
    if kind == "responses" and not isinstance(body.get("input"), list | str):
        return "'input' is required"
    if kind == "messages":
        if not isinstance(body.get("messages"), list):
            return "messages: Field required"
        if not isinstance(body.get("max_tokens"), int):
            return "max_tokens: Field required"
    return None


class DevLLM:
    """The server. ``async with DevLLM() as llm: AsyncOpenAI(base_url=llm.url, api_key="x")``."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        responder: Responder | None = None,
        cached_tokens: int = 0,
        chunk_chars: int = 8,
        api_key: str | None = None,
    ) -> None:
        self.host = host
        self.api_key = api_key
        self.port = port
        self.responder = responder
        self.cached_tokens = cached_tokens
        self.chunk_chars = chunk_chars
        self.requests: list[LoggedRequest] = []
        self._queue: list[Reply] = []
        self._server: asyncio.Server | None = None
        self._ids = itertools.count(1)
        self._handlers: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        """The ``base_url`` to give an OpenAI client (ends in ``/v1``)."""
        return f"http://{self.host}:{self.port}/v1"

    @property
    def anthropic_url(self) -> str:
        """The ``base_url`` to give an Anthropic client (it adds ``/v1/messages`` itself)."""
        return f"http://{self.host}:{self.port}"

    async def start(self) -> DevLLM:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for t in list(self._handlers):
                t.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def __aenter__(self) -> DevLLM:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ scripting and the log

    def script(self, *replies: Reply) -> None:
        """Queue replies; each chat request takes the next one."""
        self._queue.extend(replies)

    @property
    def chat_requests(self) -> list[LoggedRequest]:
        """The Chat Completions requests, in arrival order."""
        return [r for r in self.requests if r.kind == "chat"]

    @property
    def responses_requests(self) -> list[LoggedRequest]:
        """The OpenAI Responses requests, in arrival order."""
        return [r for r in self.requests if r.kind == "responses"]

    @property
    def messages_requests(self) -> list[LoggedRequest]:
        """The Anthropic Messages requests, in arrival order."""
        return [r for r in self.requests if r.kind == "messages"]

    @property
    def llm_requests(self) -> list[LoggedRequest]:
        """Every LLM request of any wire format, in arrival order."""
        return [r for r in self.requests if r.kind is not None]

    # ------------------------------------------------------------------ HTTP

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            # One request per connection (Connection: close): simple and enough for a dev server.
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = {}
            for ln in lines[1:]:
                if ":" in ln:
                    k, v = ln.split(":", 1)
                    headers[k.strip().lower()] = v.strip()
            length = int(headers.get("content-length", "0") or 0)
            raw = await reader.readexactly(length) if length else b""
            try:
                body = orjson.loads(raw) if raw else {}
            except orjson.JSONDecodeError:
                body = None
            entry = LoggedRequest(next(self._ids), method, path, headers, body, time.time())
            self.requests.append(entry)
            await self._route(entry, writer)
            entry.answered = True
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._handlers.discard(task)
            with contextlib.suppress(Exception):
                writer.close()

    async def _send(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        body: Any,
        extra: dict[str, str] | None = None,
    ) -> None:
        data = orjson.dumps(body)
        reason = {
            200: "OK",
            400: "Bad Request",
            401: "Unauthorized",
            404: "Not Found",
            429: "Too Many Requests",
        }.get(status, "Error")
        head = [
            f"HTTP/1.1 {status} {reason}",
            "Content-Type: application/json",
            f"Content-Length: {len(data)}",
            "Connection: close",
        ]
        head += [f"{k}: {v}" for k, v in (extra or {}).items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + data)
        await writer.drain()

    def _authorized(self, headers: dict[str, str]) -> bool:
        if self.api_key is None:
            return True
        bearer = headers.get("authorization", "")
        sent = {bearer[7:] if bearer.startswith("Bearer ") else None}
        sent |= {headers.get("x-api-key"), headers.get("api-key")}
        return self.api_key in sent

    async def _route(self, entry: LoggedRequest, writer: asyncio.StreamWriter) -> None:
        kind = entry.kind
        if entry.method == "GET" and entry.path.rstrip("/").endswith("/models"):
            entry.status = 200
            await self._send(
                writer, 200, {"object": "list", "data": [{"id": "polos-dev", "object": "model"}]}
            )
            return
        if entry.method != "POST" or kind is None:
            entry.status = 404
            await self._send(writer, 404, _error_body(f"no route {entry.method} {entry.path}", 404))
            return
        if not self._authorized(entry.headers):
            entry.status = 401
            await self._send(writer, 401, _error_body("invalid API key", 401, kind))
            return
        body = entry.body
        why = _invalid(kind, body)
        if why is not None:
            entry.status = 400
            await self._send(writer, 400, _error_body(why, 400, kind))
            return
        reply = await self._decide(chat_view(kind, body))
        if reply.delay:
            await asyncio.sleep(reply.delay)
        entry.status = reply.status
        if reply.status != 200:
            extra = (
                {"Retry-After": f"{reply.retry_after:g}"} if reply.retry_after is not None else {}
            )
            await self._send(
                writer,
                reply.status,
                _error_body(reply.error_message or "error", reply.status, kind),
                extra,
            )
            return
        if kind == "responses":
            doc = self._response(body, reply)
            if body.get("stream"):
                await self._stream_response(writer, doc)
            else:
                await self._send(writer, 200, doc)
        elif kind == "messages":
            doc = self._message(body, reply)
            if body.get("stream"):
                await self._stream_message(writer, doc)
            else:
                await self._send(writer, 200, doc)
        elif body.get("stream"):
            await self._stream(writer, body, reply)
        else:
            await self._send(writer, 200, self._completion(body, reply))

    async def _decide(self, body: dict[str, Any]) -> Reply:
        if self._queue:
            return self._queue.pop(0)
        if self.responder is not None:
            out = self.responder(body)
            if inspect.isawaitable(out):
                out = await out
            return out
        return default_reply(body)

    # ------------------------------------------------------------------ completions

    def _tokens(self, prompt_part: Any, reply: Reply) -> tuple[int, int, int]:
        """(prompt, completion, reasoning) token counts of a request part and its reply."""
        prompt = estimate_tokens(orjson.dumps(prompt_part).decode())
        out_text = (reply.content or "") + "".join(
            n + (a if isinstance(a, str) else orjson.dumps(a).decode()) for n, a in reply.tool_calls
        )
        reasoning = estimate_tokens(reply.reasoning) if reply.reasoning else 0
        return prompt, estimate_tokens(out_text) + reasoning, reasoning

    def _usage(self, body: dict[str, Any], reply: Reply) -> dict[str, Any]:
        prompt, completion, _ = self._tokens(body.get("messages"), reply)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": min(self.cached_tokens, prompt)},
        }

    @staticmethod
    def _calls(reply: Reply, rid: str) -> list[dict[str, Any]]:
        return [
            {
                "id": f"call_{rid}_{i}",
                "type": "function",
                "function": {
                    "name": name,
                    "arguments": args if isinstance(args, str) else orjson.dumps(args).decode(),
                },
            }
            for i, (name, args) in enumerate(reply.tool_calls)
        ]

    def _finish(self, reply: Reply) -> str:
        return reply.finish_reason or ("tool_calls" if reply.tool_calls else "stop")

    def _completion(self, body: dict[str, Any], reply: Reply) -> dict[str, Any]:
        rid = f"{len(self.requests)}"
        message: dict[str, Any] = {"role": "assistant", "content": reply.content}
        if reply.tool_calls:
            message["tool_calls"] = self._calls(reply, rid)
        if reply.reasoning:
            message[reply.reasoning_as] = reply.reasoning
        return {
            "id": f"chatcmpl-dev-{rid}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "system_fingerprint": "polos-devllm",
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "finish_reason": self._finish(reply),
                    "logprobs": None,
                }
            ],
            "usage": self._usage(body, reply),
        }

    async def _stream(
        self, writer: asyncio.StreamWriter, body: dict[str, Any], reply: Reply
    ) -> None:
        rid = f"{len(self.requests)}"
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
            b"Connection: close\r\n\r\n"
        )

        async def chunk(
            delta: dict[str, Any], finish: str | None = None, usage: Any = None
        ) -> None:
            doc: dict[str, Any] = {
                "id": f"chatcmpl-dev-{rid}",
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": body["model"],
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]
                if delta is not None
                else [],
            }
            if usage is not None:
                doc["usage"] = usage
            writer.write(b"data: " + orjson.dumps(doc) + b"\n\n")
            await writer.drain()

        await chunk({"role": "assistant", "content": ""})
        thought = reply.reasoning or ""
        for i in range(0, len(thought), self.chunk_chars):
            await chunk({reply.reasoning_as: thought[i : i + self.chunk_chars]})
        text = reply.content or ""
        for i in range(0, len(text), self.chunk_chars):
            await chunk({"content": text[i : i + self.chunk_chars]})
        for i, call in enumerate(self._calls(reply, rid)):
            await chunk({"tool_calls": [{"index": i, **call}]})
        await chunk({}, finish=self._finish(reply))
        if (body.get("stream_options") or {}).get("include_usage"):
            await chunk(None, usage=self._usage(body, reply))  # type: ignore[arg-type]
        writer.write(b"data: [DONE]\n\n")
        await writer.drain()

    # ------------------------------------------------------------------ OpenAI Responses

    def _response(self, body: dict[str, Any], reply: Reply) -> dict[str, Any]:
        rid = f"{len(self.requests)}"
        output: list[dict[str, Any]] = []
        if reply.reasoning:
            output.append(
                {
                    "type": "reasoning",
                    "id": f"rs_dev_{rid}",
                    "summary": [{"type": "summary_text", "text": reply.reasoning}],
                }
            )
        if reply.content is not None:
            output.append(
                {
                    "type": "message",
                    "id": f"msg_dev_{rid}",
                    "status": "completed",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": reply.content, "annotations": []}],
                }
            )
        for i, (name, args) in enumerate(reply.tool_calls):
            output.append(
                {
                    "type": "function_call",
                    "id": f"fc_dev_{rid}_{i}",
                    "call_id": f"call_{rid}_{i}",
                    "name": name,
                    "arguments": args if isinstance(args, str) else orjson.dumps(args).decode(),
                    "status": "completed",
                }
            )
        prompt, completion, reasoning = self._tokens(
            [body.get("instructions"), body.get("input")], reply
        )
        cut = reply.finish_reason == "length"
        return {
            "id": f"resp_dev_{rid}",
            "object": "response",
            "created_at": int(time.time()),
            "status": "incomplete" if cut else "completed",
            "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
            "error": None,
            "model": body["model"],
            "instructions": body.get("instructions"),
            "output": output,
            "parallel_tool_calls": True,
            "tool_choice": body.get("tool_choice", "auto"),
            "tools": body.get("tools") or [],
            "temperature": body.get("temperature"),
            "top_p": body.get("top_p"),
            "metadata": {},
            "text": body.get("text") or {"format": {"type": "text"}},
            "reasoning": body.get("reasoning"),
            "usage": {
                "input_tokens": prompt,
                "input_tokens_details": {"cached_tokens": min(self.cached_tokens, prompt)},
                "output_tokens": completion,
                "output_tokens_details": {"reasoning_tokens": reasoning},
                "total_tokens": prompt + completion,
            },
        }

    async def _sse(self, writer: asyncio.StreamWriter, events: list[dict[str, Any]]) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
            b"Connection: close\r\n\r\n"
        )
        for event in events:
            writer.write(
                b"event: " + event["type"].encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"
            )
            await writer.drain()

    def _chunks(self, text: str) -> list[str]:
        return [text[i : i + self.chunk_chars] for i in range(0, len(text), self.chunk_chars)]

    async def _stream_response(self, writer: asyncio.StreamWriter, doc: dict[str, Any]) -> None:
        """The Responses event stream of ``doc``: each output item added, its deltas, done."""
        events: list[dict[str, Any]] = [
            {"type": "response.created", "response": {**doc, "status": "in_progress", "output": []}}
        ]
        for i, item in enumerate(doc["output"]):
            if item["type"] == "message":
                text = item["content"][0]["text"]
                events.append(
                    {
                        "type": "response.output_item.added",
                        "output_index": i,
                        "item": {**item, "status": "in_progress", "content": []},
                    }
                )
                for piece in self._chunks(text):
                    events.append(
                        {
                            "type": "response.output_text.delta",
                            "item_id": item["id"],
                            "output_index": i,
                            "content_index": 0,
                            "delta": piece,
                            "logprobs": [],
                        }
                    )
                events.append(
                    {
                        "type": "response.output_text.done",
                        "item_id": item["id"],
                        "output_index": i,
                        "content_index": 0,
                        "text": text,
                        "logprobs": [],
                    }
                )
            elif item["type"] == "function_call":
                events.append(
                    {
                        "type": "response.output_item.added",
                        "output_index": i,
                        "item": {**item, "arguments": "", "status": "in_progress"},
                    }
                )
                for piece in self._chunks(item["arguments"]):
                    events.append(
                        {
                            "type": "response.function_call_arguments.delta",
                            "item_id": item["id"],
                            "output_index": i,
                            "delta": piece,
                        }
                    )
            elif item["type"] == "reasoning":
                events.append(
                    {
                        "type": "response.output_item.added",
                        "output_index": i,
                        "item": {**item, "summary": []},
                    }
                )
                for piece in self._chunks(item["summary"][0]["text"]):
                    events.append(
                        {
                            "type": "response.reasoning_summary_text.delta",
                            "item_id": item["id"],
                            "output_index": i,
                            "summary_index": 0,
                            "delta": piece,
                        }
                    )
            events.append({"type": "response.output_item.done", "output_index": i, "item": item})
        final = "response.incomplete" if doc["status"] == "incomplete" else "response.completed"
        events.append({"type": final, "response": doc})
        for n, event in enumerate(events):
            event["sequence_number"] = n
        await self._sse(writer, events)

    # ------------------------------------------------------------------ Anthropic Messages

    def _message(self, body: dict[str, Any], reply: Reply) -> dict[str, Any]:
        rid = f"{len(self.requests)}"
        content: list[dict[str, Any]] = []
        if reply.reasoning:
            content.append(
                {"type": "thinking", "thinking": reply.reasoning, "signature": f"sig-dev-{rid}"}
            )
        if reply.content is not None:
            content.append({"type": "text", "text": reply.content})
        for i, (name, args) in enumerate(reply.tool_calls):
            if isinstance(args, str):
                with contextlib.suppress(orjson.JSONDecodeError):
                    args = orjson.loads(args)
            content.append(
                {
                    "type": "tool_use",
                    "id": f"toolu_dev_{rid}_{i}",
                    "name": name,
                    "input": args if isinstance(args, dict) else {"arguments": args},
                }
            )
        prompt, completion, _ = self._tokens([body.get("system"), body.get("messages")], reply)
        cached = min(self.cached_tokens, prompt)
        stop = {"length": "max_tokens"}.get(
            reply.finish_reason or "", "tool_use" if reply.tool_calls else "end_turn"
        )
        return {
            "id": f"msg_dev_{rid}",
            "type": "message",
            "role": "assistant",
            "model": body["model"],
            "content": content,
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": {
                # Anthropic counts cached prompt tokens apart from input_tokens.
                "input_tokens": prompt - cached,
                "output_tokens": completion,
                "cache_read_input_tokens": cached,
                "cache_creation_input_tokens": 0,
            },
        }

    async def _stream_message(self, writer: asyncio.StreamWriter, doc: dict[str, Any]) -> None:
        """The Messages event stream of ``doc``: each content block started, its deltas, stopped."""
        usage = doc["usage"]
        events: list[dict[str, Any]] = [
            {
                "type": "message_start",
                "message": {
                    **doc,
                    "content": [],
                    "stop_reason": None,
                    "usage": {**usage, "output_tokens": 1},
                },
            }
        ]
        for i, block in enumerate(doc["content"]):
            if block["type"] == "text":
                start: dict[str, Any] = {"type": "text", "text": ""}
                deltas = [{"type": "text_delta", "text": p} for p in self._chunks(block["text"])]
            elif block["type"] == "thinking":
                start = {"type": "thinking", "thinking": "", "signature": ""}
                deltas = [
                    {"type": "thinking_delta", "thinking": p}
                    for p in self._chunks(block["thinking"])
                ]
                deltas.append({"type": "signature_delta", "signature": block["signature"]})
            else:
                start = {**block, "input": {}}
                raw = orjson.dumps(block["input"]).decode()
                deltas = [
                    {"type": "input_json_delta", "partial_json": p} for p in self._chunks(raw)
                ]
            events.append({"type": "content_block_start", "index": i, "content_block": start})
            events += [{"type": "content_block_delta", "index": i, "delta": d} for d in deltas]
            events.append({"type": "content_block_stop", "index": i})
        events.append(
            {
                "type": "message_delta",
                "delta": {"stop_reason": doc["stop_reason"], "stop_sequence": None},
                "usage": {"output_tokens": usage["output_tokens"]},
            }
        )
        events.append({"type": "message_stop"})
        await self._sse(writer, events)


def _error_body(message: str, status: int, kind: str | None = None) -> dict[str, Any]:
    if kind == "messages":
        anthropic_kind = {
            400: "invalid_request_error",
            401: "authentication_error",
            429: "rate_limit_error",
            529: "overloaded_error",
        }.get(status, "api_error")
        return {"type": "error", "error": {"type": anthropic_kind, "message": message}}
    kind = {400: "invalid_request_error", 401: "invalid_api_key", 429: "rate_limit_exceeded"}.get(
        status, "server_error"
    )
    return {"error": {"message": message, "type": kind, "param": None, "code": kind}}


async def serve_this_process() -> DevLLM:
    """Start a dev LLM for the agents of this process (``polos worker --dev-llm``): every
    provider's base-URL variable (``OPENAI_BASE_URL``, ``ANTHROPIC_BASE_URL``, ``GROQ_BASE_URL``...)
    points at it, so every agent without its own ``base_url`` talks to it, whatever its provider.
    Says so in one line, so nobody mistakes its answers for a model's."""
    import os

    from polos._private.agents.providers.base import PROVIDERS

    server = await DevLLM().start()
    for spec in PROVIDERS.values():
        var = spec.base_url_env[0][0]
        os.environ[var] = server.anthropic_url if spec.wire == "anthropic" else server.url
    print(f"agents use the {LABEL} at {server.url}", flush=True)
    return server


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m polos.devllm", description=LABEL)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8799)
    args = parser.parse_args(argv)

    async def serve() -> None:
        server = await DevLLM(args.host, args.port).start()
        print(f"{LABEL} listening on {server.url}", flush=True)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


if __name__ == "__main__":
    main()


__all__ = [
    "LABEL",
    "DevLLM",
    "LoggedRequest",
    "Reply",
    "chat_view",
    "default_reply",
    "estimate_tokens",
    "serve_this_process",
]
