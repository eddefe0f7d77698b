"""The provider call: one chat completion through the real ``openai`` client, with back-off on
429/5xx, streamed deltas handed over as they come. An agent records its outcome as ONE
``StepCompleted(kind="llm")`` (``steps.DurableRunner``)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from polos.errors import PolosError

if TYPE_CHECKING:
    pass


class AgentConfigError(PolosError):
    """An agent cannot call its provider as configured (e.g. no API key): raised before any call."""


class ProviderError(PolosError):
    """The provider refused a request for good (a bad request, bad credentials...).

    ``status`` is the HTTP status, ``message`` the provider's own message."""

    def __init__(self, status: int | None, message: str, error_type: str = "ProviderError") -> None:
        super().__init__(f"{error_type} ({status}): {message}")
        self.status = status
        self.message = message
        self.error_type = error_type


# --------------------------------------------------------------------------- provider config


@dataclass(frozen=True)
class LLMRetry:
    """How a provider call retries on 429, 5xx and connection errors: ``max_attempts`` in all,
    waiting ``Retry-After`` when the provider says so (capped at ``max_interval``), else
    ``initial_interval`` doubling. A bad request (4xx other than 429) never retries."""

    max_attempts: int = 6
    initial_interval: float = 0.5
    max_interval: float = 30.0


@dataclass(frozen=True)
class ProviderConfig:
    provider: str = "openai"
    model: str = "gpt-4o"
    base_url: str | None = None
    api_key: str | None = None
    timeout: float = 120.0
    retry: LLMRetry = field(default_factory=LLMRetry)

    @property
    def effective_base_url(self) -> str | None:
        """``base_url``, else ``OPENAI_BASE_URL`` (as the openai client reads it), else OpenAI."""
        return self.base_url or os.environ.get("OPENAI_BASE_URL") or None

    def resolved_key(self) -> str:
        """The API key to send; a clear error, before any call, when OpenAI has none."""
        if self.provider != "openai":
            raise AgentConfigError(
                f"provider {self.provider!r} is not supported; use provider='openai' with base_url "
                "for any OpenAI-compatible server (vLLM, Ollama, LiteLLM, a gateway)"
            )
        key = self.api_key or os.environ.get("OPENAI_API_KEY")
        if key:
            return key
        if self.effective_base_url:
            return "not-needed"  # local OpenAI-compatible servers usually take any key
        raise AgentConfigError(
            f"no OpenAI API key for model {self.model!r}: set OPENAI_API_KEY (or api_key=..., "
            "or OPENAI_BASE_URL / base_url for an OpenAI-compatible server), or run the worker "
            "with `polos worker --dev-llm` to use the Polos dev LLM, a scripted test server "
            "that is not a model"
        )


_clients: dict[tuple[int, str | None, str, float], Any] = {}


def _client(cfg: ProviderConfig) -> Any:
    from openai import AsyncOpenAI

    key = cfg.resolved_key()
    # One client (one connection pool) per event loop and endpoint.
    base_url = cfg.effective_base_url
    ck = (id(asyncio.get_running_loop()), base_url, key, cfg.timeout)
    client = _clients.get(ck)
    if client is None:
        if len(_clients) > 64:
            _clients.clear()
        # Retries are ours (below), so that back-off and the attempt count are recorded.
        client = AsyncOpenAI(api_key=key, base_url=base_url, max_retries=0, timeout=cfg.timeout)
        _clients[ck] = client
    return client


@dataclass
class LLMOutcome:
    message: dict[str, Any]  # {"content", "tool_calls": [{"id","name","arguments"}], "reasoning"}
    usage: dict[str, int]
    finish_reason: str | None
    latency_ms: float
    attempts: int


def estimate_request_tokens(request: dict[str, Any]) -> int:
    """A cheap upper-side guess of a call's tokens, for reserving rate-limit capacity before
    the provider reports the real usage (four characters a token, plus the answer's cap)."""
    size = len(orjson.dumps(request.get("messages"))) + len(
        orjson.dumps(request.get("tools") or [])
    )
    answer = request.get("max_completion_tokens") or request.get("max_tokens") or 512
    return size // 4 + int(answer)


def _parse_args(raw: str | None) -> Any:
    if not raw:
        return {}
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw  # the model sent invalid JSON: kept as the string, the tool reports it


def _usage(u: Any) -> dict[str, int]:
    if u is None:
        return {"prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0, "total_tokens": 0}
    details = getattr(u, "prompt_tokens_details", None)
    cached = getattr(details, "cached_tokens", 0) or 0 if details is not None else 0
    p = getattr(u, "prompt_tokens", 0) or 0
    c = getattr(u, "completion_tokens", 0) or 0
    return {
        "prompt_tokens": p,
        "completion_tokens": c,
        "cached_tokens": cached,
        "total_tokens": getattr(u, "total_tokens", 0) or p + c,
    }


def _retry_after(exc: Any) -> float | None:
    response = getattr(exc, "response", None)
    if response is None:
        return None
    raw = response.headers.get("retry-after-ms")
    if raw:
        with contextlib.suppress(ValueError):
            return float(raw) / 1000
    raw = response.headers.get("retry-after")
    if raw:
        with contextlib.suppress(ValueError):
            return float(raw)
    return None


def _provider_message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
    return str(getattr(exc, "message", None) or exc)


async def call_llm(
    cfg: ProviderConfig,
    request: dict[str, Any],
    *,
    headers: dict[str, str] | None = None,
    on_delta: Callable[[str], Awaitable[None]] | None = None,
    on_rate_limited: Callable[[float], Awaitable[None]] | None = None,
) -> LLMOutcome:
    """One chat completion with back-off. ``request`` holds messages, tools, response_format
    and model settings. With ``on_delta`` the call streams and each text delta is handed over.
    ``on_rate_limited(seconds)`` hears of every 429 (the shared token limiter blocks the model
    for every process)."""
    import openai

    client = _client(cfg)
    attempt = 0
    delay = cfg.retry.initial_interval
    while True:
        attempt += 1
        t0 = time.perf_counter()
        try:
            if on_delta is None:
                resp = await client.chat.completions.create(
                    model=cfg.model, extra_headers=headers, **request
                )
                choice = resp.choices[0]
                msg = choice.message
                message = {
                    "content": msg.content,
                    "tool_calls": [
                        {
                            "id": tc.id,
                            "name": tc.function.name,
                            "arguments": _parse_args(tc.function.arguments),
                        }
                        for tc in (msg.tool_calls or [])
                    ],
                    "reasoning": getattr(msg, "reasoning_content", None)
                    or (msg.model_extra or {}).get("reasoning_content")
                    or (msg.model_extra or {}).get("reasoning"),
                }
                usage, finish = _usage(resp.usage), choice.finish_reason
            else:
                message, usage, finish = await _stream(client, cfg, request, headers, on_delta)
            return LLMOutcome(
                message=message,
                usage=usage,
                finish_reason=finish,
                latency_ms=round((time.perf_counter() - t0) * 1000, 3),
                attempts=attempt,
            )
        except (
            openai.RateLimitError,
            openai.InternalServerError,
            openai.APIConnectionError,
        ) as exc:
            if attempt >= cfg.retry.max_attempts:
                status = getattr(exc, "status_code", None)
                raise ProviderError(status, _provider_message(exc), type(exc).__name__) from exc
            wait = _retry_after(exc)
            if on_rate_limited is not None and isinstance(exc, openai.RateLimitError):
                with contextlib.suppress(Exception):
                    await on_rate_limited(wait if wait is not None else delay)
            await asyncio.sleep(min(cfg.retry.max_interval, wait if wait is not None else delay))
            delay = min(cfg.retry.max_interval, delay * 2)
        except openai.APIStatusError as exc:
            if exc.status_code >= 500 and attempt < cfg.retry.max_attempts:
                await asyncio.sleep(min(cfg.retry.max_interval, _retry_after(exc) or delay))
                delay = min(cfg.retry.max_interval, delay * 2)
                continue
            raise ProviderError(
                exc.status_code, _provider_message(exc), type(exc).__name__
            ) from exc


async def _stream(
    client: Any,
    cfg: ProviderConfig,
    request: dict[str, Any],
    headers: dict[str, str] | None,
    on_delta: Callable[[str], Awaitable[None]],
) -> tuple[dict[str, Any], dict[str, int], str | None]:
    stream = await client.chat.completions.create(
        model=cfg.model,
        extra_headers=headers,
        stream=True,
        stream_options={"include_usage": True},
        **request,
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
            # vLLM/DeepSeek stream "reasoning_content", Ollama and OpenRouter "reasoning".
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
            {"id": c["id"], "name": c["name"], "arguments": _parse_args(c["arguments"])}
            for _, c in sorted(calls.items())
        ],
        "reasoning": "".join(reasoning) or None,
    }
    return message, usage, finish


__all__ = [
    "AgentConfigError",
    "LLMOutcome",
    "LLMRetry",
    "ProviderConfig",
    "ProviderError",
    "call_llm",
    "estimate_request_tokens",
]
