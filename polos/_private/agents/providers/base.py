"""What every provider shares: the configuration an agent gives, the outcome of one call (the
loop's own shape, whatever the wire format), the errors, and the named providers with their
environment variables."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import orjson

from polos.errors import PolosError


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


# --------------------------------------------------------------------------- named providers

# The wire formats: OpenAI Chat Completions, OpenAI Responses, Anthropic Messages.
CHAT = "chat_completions"
RESPONSES = "responses"
MESSAGES = "messages"


@dataclass(frozen=True)
class ProviderSpec:
    """A provider by name: where its key and endpoint come from and which wire format it speaks.

    ``base_url_env`` lists ``(variable, suffix)`` pairs, first set wins; the suffix turns a host
    variable (``OLLAMA_HOST``, ``AZURE_OPENAI_ENDPOINT``) into the API's base URL."""

    name: str
    key_env: tuple[str, ...]
    base_url_env: tuple[tuple[str, str], ...]
    default_base_url: str | None
    wire: str  # "openai" (Chat Completions or Responses) or "anthropic" (Messages)
    default_llm_api: str = CHAT
    key_required: bool = True


PROVIDERS: dict[str, ProviderSpec] = {
    s.name: s
    for s in (
        ProviderSpec(
            "openai",
            ("OPENAI_API_KEY",),
            (("OPENAI_BASE_URL", ""),),
            "https://api.openai.com/v1",
            "openai",
            default_llm_api=RESPONSES,
        ),
        ProviderSpec(
            "anthropic",
            ("ANTHROPIC_API_KEY",),
            (("ANTHROPIC_BASE_URL", ""),),
            "https://api.anthropic.com",
            "anthropic",
            default_llm_api=MESSAGES,
        ),
        # Azure OpenAI's v1 API takes the plain OpenAI client at <endpoint>/openai/v1; the
        # model is the deployment's name.
        ProviderSpec(
            "azure",
            ("AZURE_OPENAI_API_KEY",),
            (("AZURE_OPENAI_BASE_URL", ""), ("AZURE_OPENAI_ENDPOINT", "/openai/v1")),
            None,
            "openai",
        ),
        ProviderSpec(
            "gemini",
            ("GEMINI_API_KEY",),
            (("GEMINI_BASE_URL", ""),),
            "https://generativelanguage.googleapis.com/v1beta/openai",
            "openai",
        ),
        ProviderSpec(
            "groq",
            ("GROQ_API_KEY",),
            (("GROQ_BASE_URL", ""),),
            "https://api.groq.com/openai/v1",
            "openai",
        ),
        ProviderSpec(
            "fireworks",
            ("FIREWORKS_API_KEY",),
            (("FIREWORKS_BASE_URL", ""),),
            "https://api.fireworks.ai/inference/v1",
            "openai",
        ),
        ProviderSpec(
            "together",
            ("TOGETHER_API_KEY",),
            (("TOGETHER_BASE_URL", ""),),
            "https://api.together.xyz/v1",
            "openai",
        ),
        ProviderSpec(
            "ollama",
            ("OLLAMA_API_KEY",),
            (("OLLAMA_BASE_URL", ""), ("OLLAMA_HOST", "/v1")),
            "http://localhost:11434/v1",
            "openai",
            key_required=False,
        ),
    )
}


def provider_spec(name: str) -> ProviderSpec:
    spec = PROVIDERS.get(name)
    if spec is None:
        raise AgentConfigError(
            f"unknown provider {name!r}: use one of {', '.join(sorted(PROVIDERS))} "
            "(any other OpenAI-compatible server: provider='openai' with base_url=...)"
        )
    return spec


# --------------------------------------------------------------------------- provider config


@dataclass(frozen=True)
class LLMRetry:
    """How a provider call retries on 429, 5xx and connection errors: ``max_attempts`` in all,
    waiting ``Retry-After`` when the provider says so (capped at ``max_interval``), else
    ``initial_interval`` doubling. A bad request (4xx other than 429) never retries."""

    max_attempts: int = 6
    initial_interval: float = 0.5
    max_interval: float = 30.0


def _with_suffix(url: str, suffix: str) -> str:
    url = url.rstrip("/")
    return url if not suffix or url.endswith(suffix) else url + suffix


@dataclass(frozen=True)
class ProviderConfig:
    """How an agent reaches its model. ``provider`` is a name of ``PROVIDERS``; ``llm_api``
    picks OpenAI's wire format (``"responses"`` or ``"chat_completions"``) for the
    OpenAI-compatible providers; None is the provider's default (see ``llm_api_in_use``)."""

    provider: str = "openai"
    model: str = "gpt-4o"
    base_url: str | None = None
    api_key: str | None = None
    timeout: float = 120.0
    retry: LLMRetry = field(default_factory=LLMRetry)
    llm_api: str | None = None

    def __post_init__(self) -> None:
        spec = provider_spec(self.provider)  # an unknown name fails where the agent is built
        if self.llm_api is None:
            return
        allowed = (MESSAGES,) if spec.wire == "anthropic" else (RESPONSES, CHAT)
        if self.llm_api not in allowed:
            raise AgentConfigError(
                f"llm_api {self.llm_api!r} is not spoken by provider {self.provider!r}: "
                f"use {' or '.join(repr(a) for a in allowed)}"
            )

    @property
    def spec(self) -> ProviderSpec:
        return provider_spec(self.provider)

    def _env_base_url(self) -> str | None:
        for var, suffix in self.spec.base_url_env:
            value = os.environ.get(var)
            if value:
                return _with_suffix(value, suffix)
        return None

    @property
    def effective_base_url(self) -> str | None:
        """``base_url``, else the provider's base-URL variable, else its public endpoint."""
        return self.base_url or self._env_base_url() or self.spec.default_base_url

    @property
    def custom_endpoint(self) -> bool:
        """True when the agent talks to another server than the provider's own (Azure has no
        endpoint of its own: each is a customer's resource, with its key)."""
        url = self.base_url or self._env_base_url()
        default = self.spec.default_base_url
        return url is not None and default is not None and url.rstrip("/") != default

    @property
    def llm_api_in_use(self) -> str:
        """The wire format of the calls: ``llm_api`` when given; else OpenAI itself speaks
        Responses, and every OpenAI-compatible server (another base URL, or azure, gemini, groq,
        fireworks, together, ollama) Chat Completions, the format they all share."""
        if self.llm_api is not None:
            return self.llm_api
        if self.spec.wire == "openai" and self.custom_endpoint:
            return CHAT
        return self.spec.default_llm_api

    def resolved_key(self) -> str:
        """The API key to send; a clear one-line error, before any call, when there is none."""
        spec = self.spec
        if self.effective_base_url is None:
            names = " or ".join(var for var, _ in spec.base_url_env)
            raise AgentConfigError(
                f"provider {self.provider!r} has no endpoint: set {names} (or base_url=...)"
            )
        if self.api_key:
            return self.api_key
        for var in spec.key_env:
            key = os.environ.get(var)
            if key:
                return key
        if not spec.key_required or self.custom_endpoint:
            return "not-needed"  # local and compatible servers usually take any key
        keys = " or ".join(spec.key_env)
        if self.provider == "openai":
            raise AgentConfigError(
                f"no OpenAI API key for model {self.model!r}: set OPENAI_API_KEY (or api_key=..., "
                "or OPENAI_BASE_URL / base_url for an OpenAI-compatible server), or run the worker "
                "with `polos worker --dev-llm` to use the Polos dev LLM, a scripted test server "
                "that is not a model"
            )
        base = spec.base_url_env[0][0]
        raise AgentConfigError(
            f"no API key for provider {self.provider!r} (model {self.model!r}): set {keys} "
            f"(or api_key=...); {base} or base_url=... points it at another server"
        )


@dataclass
class LLMOutcome:
    """One call, in the loop's shape whatever the wire format.

    ``message``: ``{"content", "tool_calls": [{"id", "name", "arguments"}], "reasoning"}`` and,
    when the model reasoned, ``"reasoning_items"``: the provider's own reasoning blocks (Anthropic
    thinking blocks with their signatures), which the next request must carry back on the
    assistant message. ``usage``: ``prompt_tokens``, ``completion_tokens``, ``cached_tokens``,
    ``total_tokens``, plus ``reasoning_tokens`` and ``cache_write_tokens`` when nonzero."""

    message: dict[str, Any]
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
    answer = (
        request.get("max_output_tokens")
        or request.get("max_completion_tokens")
        or request.get("max_tokens")
        or 512
    )
    return size // 4 + int(answer)


def parse_args(raw: str | None) -> Any:
    if not raw:
        return {}
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw  # the model sent invalid JSON: kept as the string, the tool reports it


def usage_dict(
    prompt: int, completion: int, cached: int = 0, reasoning: int = 0, cache_write: int = 0
) -> dict[str, int]:
    out = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "cached_tokens": cached,
        "total_tokens": prompt + completion,
    }
    if reasoning:
        out["reasoning_tokens"] = reasoning
    if cache_write:
        out["cache_write_tokens"] = cache_write
    return out


def dumps(value: Any) -> str:
    return value if isinstance(value, str) else orjson.dumps(value).decode()


def text_of(content: Any) -> str:
    """The text of chat-format content: a string, or a list of parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) if isinstance(p, dict) else str(p) for p in content)
    return dumps(content)


def effort_of(request: dict[str, Any]) -> str | None:
    """The reasoning effort asked for: ``reasoning_effort`` or ``reasoning={"effort": ...}``."""
    effort = request.get("reasoning_effort")
    reasoning = request.get("reasoning")
    if effort is None and isinstance(reasoning, dict):
        effort = reasoning.get("effort")
    return str(effort) if effort is not None else None


__all__ = [
    "CHAT",
    "MESSAGES",
    "PROVIDERS",
    "RESPONSES",
    "AgentConfigError",
    "LLMOutcome",
    "LLMRetry",
    "ProviderConfig",
    "ProviderError",
    "ProviderSpec",
    "dumps",
    "effort_of",
    "estimate_request_tokens",
    "parse_args",
    "provider_spec",
    "text_of",
    "usage_dict",
]
