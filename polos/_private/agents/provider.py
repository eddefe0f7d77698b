"""The provider call: one LLM call through the provider's official client (``openai`` for OpenAI
and every OpenAI-compatible provider, ``anthropic`` for Anthropic), with back-off on 429/5xx,
streamed deltas handed over as they come. The loop speaks one shape whatever the provider: a
Chat Completions style request in, an ``LLMOutcome`` out (``providers/``). An agent records its
outcome as ONE ``StepCompleted(kind="llm")`` (``steps.DurableRunner``)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

from polos._private.agents.providers.anthropic_messages import anthropic_call
from polos._private.agents.providers.base import (
    CHAT,
    MESSAGES,
    PROVIDERS,
    RESPONSES,
    AgentConfigError,
    LLMOutcome,
    LLMRetry,
    ProviderConfig,
    ProviderError,
    ProviderSpec,
    estimate_request_tokens,
)
from polos._private.agents.providers.openai_chat import chat_call
from polos._private.agents.providers.openai_responses import responses_call

_clients: dict[tuple[int, str, str | None, str, float], Any] = {}


def _client(cfg: ProviderConfig) -> Any:
    key = cfg.resolved_key()
    base_url = cfg.effective_base_url
    anthropic = cfg.spec.wire == "anthropic"
    # One client (one connection pool) per event loop and endpoint.
    ck = (id(asyncio.get_running_loop()), cfg.provider, base_url, key, cfg.timeout)
    client = _clients.get(ck)
    if client is None:
        if len(_clients) > 64:
            _clients.clear()
        # Retries are ours (below), so that back-off and the attempt count are recorded.
        if anthropic:
            from anthropic import AsyncAnthropic

            client = AsyncAnthropic(
                api_key=key, base_url=base_url, max_retries=0, timeout=cfg.timeout
            )
        else:
            from openai import AsyncOpenAI

            # Azure's v1 API reads its key from api-key; the bearer header serves the rest.
            headers = {"api-key": key} if cfg.provider == "azure" else None
            client = AsyncOpenAI(
                api_key=key,
                base_url=base_url,
                max_retries=0,
                timeout=cfg.timeout,
                default_headers=headers,
            )
        _clients[ck] = client
    return client


def _errors(
    cfg: ProviderConfig,
) -> tuple[type[Exception], type[Exception], tuple[type[Exception], ...]]:
    """(status error, rate-limit error, retryable errors) of the provider's client."""
    if cfg.spec.wire == "anthropic":
        import anthropic as sdk
    else:
        import openai as sdk  # type: ignore[no-redef]
    return (
        sdk.APIStatusError,
        sdk.RateLimitError,
        (sdk.RateLimitError, sdk.InternalServerError, sdk.APIConnectionError),
    )


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


_CALLS = {CHAT: chat_call, RESPONSES: responses_call, MESSAGES: anthropic_call}


async def call_llm(
    cfg: ProviderConfig,
    request: dict[str, Any],
    *,
    headers: dict[str, str] | None = None,
    on_delta: Callable[[str], Awaitable[None]] | None = None,
    on_rate_limited: Callable[[float], Awaitable[None]] | None = None,
) -> LLMOutcome:
    """One LLM call with back-off. ``request`` holds Chat Completions style messages, tools,
    response_format and model settings (each provider translates them, reasoning settings
    included: ``reasoning_effort``, ``reasoning={"effort", "summary", "budget_tokens"}``,
    Anthropic's ``thinking``). With ``on_delta`` the call streams and each text delta is handed
    over. ``on_rate_limited(seconds)`` hears of every 429 (the shared token limiter blocks the
    model for every process)."""
    client = _client(cfg)
    call = _CALLS[cfg.llm_api_in_use]
    status_error, rate_limited, retryable = _errors(cfg)
    attempt = 0
    delay = cfg.retry.initial_interval
    while True:
        attempt += 1
        t0 = time.perf_counter()
        try:
            message, usage, finish = await call(client, cfg, request, headers, on_delta)
            return LLMOutcome(
                message=message,
                usage=usage,
                finish_reason=finish,
                latency_ms=round((time.perf_counter() - t0) * 1000, 3),
                attempts=attempt,
            )
        except retryable as exc:
            if attempt >= cfg.retry.max_attempts:
                status = getattr(exc, "status_code", None)
                raise ProviderError(status, _provider_message(exc), type(exc).__name__) from exc
            wait = _retry_after(exc)
            if on_rate_limited is not None and isinstance(exc, rate_limited):
                with contextlib.suppress(Exception):
                    await on_rate_limited(wait if wait is not None else delay)
            await asyncio.sleep(min(cfg.retry.max_interval, wait if wait is not None else delay))
            delay = min(cfg.retry.max_interval, delay * 2)
        except status_error as exc:
            code = int(getattr(exc, "status_code", 0) or 0)
            if code >= 500 and attempt < cfg.retry.max_attempts:
                await asyncio.sleep(min(cfg.retry.max_interval, _retry_after(exc) or delay))
                delay = min(cfg.retry.max_interval, delay * 2)
                continue
            raise ProviderError(code, _provider_message(exc), type(exc).__name__) from exc


__all__ = [
    "PROVIDERS",
    "AgentConfigError",
    "LLMOutcome",
    "LLMRetry",
    "ProviderConfig",
    "ProviderError",
    "ProviderSpec",
    "call_llm",
    "estimate_request_tokens",
]
