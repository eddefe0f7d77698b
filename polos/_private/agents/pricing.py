"""Prices of models and the cost of a call; LLM totals over recorded steps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    pass


# --------------------------------------------------------------------------- prices


@dataclass(frozen=True)
class ModelPrice:
    """US dollars per 1M tokens. ``cached_input`` is what a cached prompt token costs,
    ``cache_write`` what a prompt token written to the cache costs (Anthropic)."""

    input: float
    output: float
    cached_input: float | None = None
    cache_write: float | None = None


# A starting table; prices change, so set your own with ``set_price`` (the cost recorded in
# each llm step comes from whatever the table says when the call is made). A key is a model
# name, or ``provider/model`` where one provider prices a model its own way; a dated or
# suffixed name (``claude-sonnet-4-5-20250929``) takes the price of its longest listed prefix.
PRICES: dict[str, ModelPrice] = {
    # OpenAI (and Azure OpenAI deployments named after their model)
    "gpt-4o": ModelPrice(2.50, 10.00, 1.25),
    "gpt-4o-mini": ModelPrice(0.15, 0.60, 0.075),
    "gpt-4.1": ModelPrice(2.00, 8.00, 0.50),
    "gpt-4.1-mini": ModelPrice(0.40, 1.60, 0.10),
    "gpt-4.1-nano": ModelPrice(0.10, 0.40, 0.025),
    "gpt-5": ModelPrice(1.25, 10.00, 0.125),
    "gpt-5-mini": ModelPrice(0.25, 2.00, 0.025),
    "gpt-5-nano": ModelPrice(0.05, 0.40, 0.005),
    "o3": ModelPrice(2.00, 8.00, 0.50),
    "o3-mini": ModelPrice(1.10, 4.40, 0.55),
    "o4-mini": ModelPrice(1.10, 4.40, 0.275),
    # Anthropic (cache reads 0.1x, cache writes 1.25x the input price)
    "claude-opus-4-1": ModelPrice(15.00, 75.00, 1.50, 18.75),
    "claude-opus-4": ModelPrice(15.00, 75.00, 1.50, 18.75),
    "claude-sonnet-4-5": ModelPrice(3.00, 15.00, 0.30, 3.75),
    "claude-sonnet-4": ModelPrice(3.00, 15.00, 0.30, 3.75),
    "claude-3-7-sonnet": ModelPrice(3.00, 15.00, 0.30, 3.75),
    "claude-haiku-4-5": ModelPrice(1.00, 5.00, 0.10, 1.25),
    "claude-3-5-haiku": ModelPrice(0.80, 4.00, 0.08, 1.00),
    # Google Gemini (prompts up to 200k tokens)
    "gemini-2.5-pro": ModelPrice(1.25, 10.00, 0.31),
    "gemini-2.5-flash": ModelPrice(0.30, 2.50, 0.075),
    "gemini-2.5-flash-lite": ModelPrice(0.10, 0.40, 0.025),
    "gemini-2.0-flash": ModelPrice(0.10, 0.40, 0.025),
    # Groq
    "groq/llama-3.3-70b-versatile": ModelPrice(0.59, 0.79),
    "groq/llama-3.1-8b-instant": ModelPrice(0.05, 0.08),
    "groq/openai/gpt-oss-120b": ModelPrice(0.15, 0.75),
    "groq/openai/gpt-oss-20b": ModelPrice(0.10, 0.50),
    # Fireworks
    "fireworks/accounts/fireworks/models/llama-v3p3-70b-instruct": ModelPrice(0.90, 0.90),
    "fireworks/accounts/fireworks/models/llama-v3p1-8b-instruct": ModelPrice(0.20, 0.20),
    "fireworks/accounts/fireworks/models/deepseek-v3": ModelPrice(0.90, 0.90),
    # Together
    "together/meta-llama/Llama-3.3-70B-Instruct-Turbo": ModelPrice(0.88, 0.88),
    "together/meta-llama/Meta-Llama-3.1-8B-Instruct-Turbo": ModelPrice(0.18, 0.18),
    "together/deepseek-ai/DeepSeek-V3": ModelPrice(1.25, 1.25),
}

# Models these providers run on your own machine: no price, no cost.
FREE_PROVIDERS = frozenset({"ollama"})


def set_price(
    model: str,
    input: float,
    output: float,
    cached_input: float | None = None,
    cache_write: float | None = None,
    *,
    provider: str | None = None,
) -> None:
    """Set the price of ``model`` in dollars per 1M input, output, cached input and cache-write
    tokens; with ``provider``, only for that provider (``set_price(m, ..., provider="groq")``)."""
    PRICES[f"{provider}/{model}" if provider else model] = ModelPrice(
        input, output, cached_input, cache_write
    )


def price_of(model: str, provider: str | None = None) -> ModelPrice | None:
    """The price of a model: ``provider/model``, else ``model``, else the longest listed prefix
    of either that ends where a dated or suffixed name goes on (``-``, ``@``, ``:``)."""
    names = ([f"{provider}/{model}"] if provider else []) + [model]
    for name in names:
        if name in PRICES:
            return PRICES[name]
    for name in names:
        best = max(
            (
                k
                for k in PRICES
                if len(name) > len(k) and name.startswith(k) and name[len(k)] in "-@:"
            ),
            key=len,
            default=None,
        )
        if best is not None:
            return PRICES[best]
    return None


def cost_usd(model: str, usage: dict[str, int], provider: str | None = None) -> float | None:
    """The dollars a call cost; None when the model has no price (0 for local providers)."""
    if provider in FREE_PROVIDERS and price_of(model, provider) is None:
        return 0.0
    price = price_of(model, provider)
    if price is None:
        return None
    cached = usage.get("cached_tokens", 0) or 0
    written = usage.get("cache_write_tokens", 0) or 0
    fresh = max(0, (usage.get("prompt_tokens", 0) or 0) - cached - written)
    cached_price = price.cached_input if price.cached_input is not None else price.input
    write_price = price.cache_write if price.cache_write is not None else price.input
    total = (
        fresh * price.input
        + cached * cached_price
        + written * write_price
        + (usage.get("completion_tokens", 0) or 0) * price.output
    )
    return round(total / 1_000_000, 10)


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


__all__ = [
    "FREE_PROVIDERS",
    "PRICES",
    "LLMTotals",
    "ModelPrice",
    "cost_usd",
    "price_of",
    "set_price",
]
