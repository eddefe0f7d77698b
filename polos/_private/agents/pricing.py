"""Prices of models and the cost of a call; LLM totals over recorded steps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    pass


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
    total = (
        fresh * price.input
        + cached * cached_price
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


__all__ = ["PRICES", "LLMTotals", "ModelPrice", "cost_usd", "set_price"]
