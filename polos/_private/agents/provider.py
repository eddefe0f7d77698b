"""The durable LLM call: one provider request (with back-off on 429/5xx), streamed deltas
published live, and the outcome recorded as ONE ``StepCompleted(kind="llm")``.

Also the generic step path agents use for LLM and tool calls (``StepRunner``): inside a run
it goes through the run's own step machinery (``RunExecution.recorded / check_new_step /
record``), so a replay returns the recorded outcome and calls nothing; outside a run
(``Agent.run`` in plain code) it just executes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from polos import history as ev
from polos.errors import PolosError, StepFailedError

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS
    from nats.js import JetStreamContext

    from polos._private.run.execution import RunExecution


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


# --------------------------------------------------------------------------- prices


@dataclass(frozen=True)
class ModelPrice:
    """US dollars per 1M tokens. ``cached_input`` is what a cached prompt token costs."""

    input: float
    output: float
    cached_input: float | None = None


# A starting table; prices change, so set your own with ``set_price`` (the cost recorded in
# each llm step comes from whatever the table says when the call is made).
PRICES: dict[str, ModelPrice] = {
    "gpt-4o": ModelPrice(2.50, 10.00, 1.25),
    "gpt-4o-mini": ModelPrice(0.15, 0.60, 0.075),
    "gpt-4.1": ModelPrice(2.00, 8.00, 0.50),
    "gpt-4.1-mini": ModelPrice(0.40, 1.60, 0.10),
    "gpt-4.1-nano": ModelPrice(0.10, 0.40, 0.025),
    "o4-mini": ModelPrice(1.10, 4.40, 0.275),
}


def set_price(model: str, input: float, output: float, cached_input: float | None = None) -> None:
    """Set the price of ``model`` in dollars per 1M input, output and cached input tokens."""
    PRICES[model] = ModelPrice(input, output, cached_input)


def cost_usd(model: str, usage: dict[str, int]) -> float | None:
    price = PRICES.get(model)
    if price is None:
        return None
    cached = usage.get("cached_tokens", 0) or 0
    fresh = max(0, (usage.get("prompt_tokens", 0) or 0) - cached)
    cached_price = price.cached_input if price.cached_input is not None else price.input
    total = fresh * price.input + cached * cached_price + (usage.get("completion_tokens", 0) or 0) * price.output
    return round(total / 1_000_000, 10)


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
    size = len(orjson.dumps(request.get("messages"))) + len(orjson.dumps(request.get("tools") or []))
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
        except (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError) as exc:
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
            raise ProviderError(exc.status_code, _provider_message(exc), type(exc).__name__) from exc


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


# --------------------------------------------------------------------------- the decision record


def reason_of(message: dict[str, Any]) -> str | None:
    """Why the model did what it did, in its own words: its reasoning (``reasoning_content``,
    a reasoning summary), else the text it wrote alongside its tool calls; None when it said
    nothing. (A final answer's text is the answer, not a reason.)"""
    said = message.get("reasoning")
    if isinstance(said, str) and said.strip():
        return said.strip()
    said = message.get("content")
    if message.get("tool_calls") and isinstance(said, str) and said.strip():
        return said.strip()
    return None


def decision_record(message: dict[str, Any], offered: list[str]) -> dict[str, Any]:
    """What one LLM call decided: the tools it chose (in its order), the offered tools it did
    not choose, and its stated reason. Recorded in the llm step's ``meta["choice"]``."""
    chosen = [str(c.get("name")) for c in message.get("tool_calls") or [] if isinstance(c, dict)]
    return {
        "chosen": chosen,
        "alternatives": [t for t in offered if t not in chosen],
        "reason": reason_of(message),
    }


def decision_of(output: Any, meta: Any) -> dict[str, Any]:
    """The decision record of a recorded llm step (rebuilt for steps recorded before it was)."""
    if isinstance(meta, dict) and isinstance(meta.get("choice"), dict):
        return dict(meta["choice"])
    offered = [str(t) for t in (meta.get("tools_offered") if isinstance(meta, dict) else None) or []]
    return decision_record(output if isinstance(output, dict) else {}, offered)


@dataclass
class LLMTotals:
    """LLM calls, tokens and dollars summed over llm steps (of a run, or a run and its children).
    ``unpriced`` counts calls whose model has no price (their cost is not in ``cost_usd``)."""

    llm_calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0
    cost_usd: float = 0.0
    unpriced: int = 0

    def add_step(self, meta: Any) -> None:
        meta = meta if isinstance(meta, dict) else {}
        usage = meta.get("usage") if isinstance(meta.get("usage"), dict) else {}
        self.llm_calls += 1
        self.input_tokens += int(usage.get("prompt_tokens") or 0)
        self.output_tokens += int(usage.get("completion_tokens") or 0)
        self.total_tokens += int(usage.get("total_tokens") or 0)
        cost = meta.get("cost_usd")
        if isinstance(cost, int | float) and not isinstance(cost, bool):
            self.cost_usd += float(cost)
        else:
            self.unpriced += 1

    def add(self, other: LLMTotals) -> None:
        self.llm_calls += other.llm_calls
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.total_tokens += other.total_tokens
        self.cost_usd += other.cost_usd
        self.unpriced += other.unpriced


def children_named(event: ev.Event) -> list[str]:
    """The child runs an event of a parent's history names: the children a wait is for, and
    the child a started (``invoke``) or awaited child step recorded."""
    found: list[str] = []
    if isinstance(event, ev.RunSuspended) and event.children:
        found.extend(str(c) for c in event.children)
    if isinstance(event, ev.StepCompleted) and event.kind in ("child", "invoke"):
        for holder in (event.meta, event.output):
            if isinstance(holder, dict):
                for key in ("run_id", "child_run_id"):
                    if isinstance(holder.get(key), str):
                        found.append(holder[key])
    return found


# --------------------------------------------------------------------------- streaming subject

_SUBJECT_UNSAFE = re.compile(r"[^A-Za-z0-9_\-/]")


def stream_subject(prefix: str, run_id: str, step_key: str) -> str:
    """Where an LLM step's text deltas are published: ``<prefix>.stream.<run_id>.<step>``.

    The step key becomes one subject token (characters other than letters, digits, ``_-/``
    become ``_``); follow a whole run with ``<prefix>.stream.<run_id>.>``."""
    return f"{prefix}.stream.{run_id}.{_SUBJECT_UNSAFE.sub('_', step_key)}"


# --------------------------------------------------------------------------- the step path


@dataclass
class StepDone:
    """What a step produced: recorded as one StepCompleted."""

    output: Any
    meta: dict[str, Any]
    attempts: int = 1


class StepError(Exception):
    """A step failed for good: recorded as StepFailed; raised as StepFailedError."""

    def __init__(self, error_type: str, message: str, meta: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message
        self.meta = meta or {}


@dataclass
class Recorded:
    output: Any
    meta: dict[str, Any]
    key: str
    replayed: bool


class StepRunner:
    """Runs an agent's steps outside a run: no history, nothing replayed."""

    def __init__(self, nc: NATS | None = None, prefix: str | None = None, js: JetStreamContext | None = None) -> None:
        self.run_id = f"local-{uuid.uuid4().hex[:12]}"
        # Streams are published under the root run (the one a client started), so a client
        # follows every agent of the tree, children included, on one subject.
        self.root_run_id = self.run_id
        self.nc = nc
        self.js = js
        self.prefix = prefix
        self.execution: RunExecution | None = None

    @property
    def is_replaying(self) -> bool:
        return False

    async def step(
        self, key: str, kind: str, name: str | None, fn: Callable[[str], Awaitable[StepDone]]
    ) -> Recorded:
        try:
            done = await fn(key)
        except StepError as exc:
            raise StepFailedError(key, exc.error_type, exc.message, 1) from exc
        return Recorded(done.output, done.meta, key, False)


class DurableRunner(StepRunner):
    """Runs steps through the run's history: recorded outcomes are returned, new ones appended
    as one fenced event each."""

    def __init__(self, execution: RunExecution) -> None:
        super().__init__(execution.nc, execution.names.prefix, execution.js)
        self.run_id = execution.run_id
        requested = execution.state.requested
        self.root_run_id = (requested.root_run_id if requested else None) or execution.run_id
        self.execution = execution

    @property
    def is_replaying(self) -> bool:
        assert self.execution is not None
        return self.execution.is_replaying

    async def step(
        self, key: str, kind: str, name: str | None, fn: Callable[[str], Awaitable[StepDone]]
    ) -> Recorded:
        exe = self.execution
        assert exe is not None
        step_id = exe.step_id(key, kind)
        # An llm step is named by its model, but a model upgrade while runs are in flight is
        # not a code change that breaks replay: the recorded answer stands, so only the kind
        # is checked. (A tool's name is part of its key already.)
        found = exe.recorded(step_id, kind, None if kind == "llm" else name)
        if isinstance(found, ev.StepCompleted):
            return Recorded(found.output, dict(found.meta or {}), step_id, True)
        if isinstance(found, ev.StepFailed):
            raise StepFailedError(
                step_id, str(found.error.get("type")), str(found.error.get("message")), found.attempts
            )
        await exe.check_new_step(step_id)
        started = time.time()
        t0 = time.perf_counter()
        try:
            done = await fn(step_id)
        except StepError as exc:
            await exe.record(
                ev.StepFailed(
                    key=step_id,
                    kind=kind,
                    name=name,
                    error={
                        "type": exc.error_type,
                        "message": exc.message,
                        "step": step_id,
                        "retryable": False,
                        "details": exc.meta or None,
                    },
                ),
                msg_id=f"{exe.run_id}/s/{step_id}",
            )
            raise StepFailedError(step_id, exc.error_type, exc.message, 1) from exc
        await exe.record(
            ev.StepCompleted(
                key=step_id,
                kind=kind,
                name=name,
                output=done.output,
                attempts=done.attempts,
                started_at=started,
                duration_ms=round((time.perf_counter() - t0) * 1000, 3),
                meta=done.meta,
            ),
            msg_id=f"{exe.run_id}/s/{step_id}",
        )
        return Recorded(done.output, done.meta, step_id, False)


__all__ = [
    "PRICES",
    "AgentConfigError",
    "DurableRunner",
    "LLMOutcome",
    "LLMRetry",
    "LLMTotals",
    "ModelPrice",
    "ProviderConfig",
    "ProviderError",
    "Recorded",
    "StepDone",
    "StepError",
    "StepRunner",
    "call_llm",
    "children_named",
    "cost_usd",
    "decision_of",
    "decision_record",
    "estimate_request_tokens",
    "reason_of",
    "set_price",
    "stream_subject",
]
