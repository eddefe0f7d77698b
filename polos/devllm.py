"""Polos dev LLM: a small *scripted* OpenAI-compatible HTTP server. It is NOT a model.

It exists so that tests and the demo can drive the real ``openai`` client over real HTTP
without an API key, and so that tests can see exactly which requests a crashed and resumed
agent made. It speaks ``POST /v1/chat/completions`` (tools, parallel tool calls, text alongside tool
calls, reasoning as ``reasoning_content`` (vLLM, DeepSeek) or ``reasoning`` (Ollama),
``response_format`` JSON, streaming SSE, errors such as 429 with ``Retry-After`` and 5xx)
and ``GET /v1/models``, and it keeps a request log.

What it answers is decided, in order, by:

1. the queue filled with ``server.script(Reply...)`` (one reply per request, FIFO);
2. the ``responder`` callable given to the constructor (``body -> Reply``, sync or async);
3. a fixed, documented rule: if tools are offered and no tool result followed the last user
   message, it calls every offered tool (arguments filled from their JSON schemas); otherwise it
   answers, as JSON filled from ``response_format``'s schema if one was asked for, else as text
   that says it is the dev server.

Run it alone with ``python -m polos.devllm --port 8799`` and point ``base_url`` at
``http://127.0.0.1:8799/v1``.
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
    # The field the reasoning is sent in: "reasoning_content" (vLLM, DeepSeek) or "reasoning"
    # (Ollama, OpenRouter).
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
    ) -> None:
        self.host = host
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
        return [r for r in self.requests if r.path.endswith("/chat/completions")]

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
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 429: "Too Many Requests"}.get(
            status, "Error"
        )
        head = [
            f"HTTP/1.1 {status} {reason}",
            "Content-Type: application/json",
            f"Content-Length: {len(data)}",
            "Connection: close",
        ]
        head += [f"{k}: {v}" for k, v in (extra or {}).items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + data)
        await writer.drain()

    async def _route(self, entry: LoggedRequest, writer: asyncio.StreamWriter) -> None:
        if entry.method == "GET" and entry.path.rstrip("/").endswith("/models"):
            entry.status = 200
            await self._send(
                writer, 200, {"object": "list", "data": [{"id": "polos-dev", "object": "model"}]}
            )
            return
        if entry.method != "POST" or not entry.path.endswith("/chat/completions"):
            entry.status = 404
            await self._send(writer, 404, _error_body(f"no route {entry.method} {entry.path}", 404))
            return
        body = entry.body
        if (
            not isinstance(body, dict)
            or not isinstance(body.get("messages"), list)
            or not body.get("model")
        ):
            entry.status = 400
            await self._send(writer, 400, _error_body("'model' and 'messages' are required", 400))
            return
        reply = await self._decide(body)
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
                _error_body(reply.error_message or "error", reply.status),
                extra,
            )
            return
        if body.get("stream"):
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

    def _usage(self, body: dict[str, Any], reply: Reply) -> dict[str, Any]:
        prompt = estimate_tokens(orjson.dumps(body.get("messages")).decode())
        out_text = (reply.content or "") + "".join(
            n + (a if isinstance(a, str) else orjson.dumps(a).decode()) for n, a in reply.tool_calls
        )
        completion = estimate_tokens(out_text)
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


def _error_body(message: str, status: int) -> dict[str, Any]:
    kind = {400: "invalid_request_error", 429: "rate_limit_exceeded"}.get(status, "server_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": kind}}


async def serve_this_process() -> DevLLM:
    """Start a dev LLM for the agents of this process (``polos worker --dev-llm``): the
    ``openai`` client reads ``OPENAI_BASE_URL``, so every agent without its own ``base_url``
    talks to it. Says so in one line, so nobody mistakes its answers for a model's."""
    import os

    server = await DevLLM().start()
    os.environ["OPENAI_BASE_URL"] = server.url
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
    "default_reply",
    "estimate_tokens",
    "serve_this_process",
]
