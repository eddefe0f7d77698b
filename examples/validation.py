"""The order-validation agent of the order example, shared by examples/order.py (the demo)
and examples/agents.py: an LLM that checks inventory and shipping with two tools and answers
with a typed ``OrderValidation``.

With ``OPENAI_API_KEY`` it talks to OpenAI; the demo without a key points ``OPENAI_BASE_URL``
at the Polos dev LLM (polos/devllm.py), a scripted OpenAI-compatible server that is not a model.
"""

from __future__ import annotations

import os

from pydantic import BaseModel

from polos import Agent, tool


class OrderValidation(BaseModel):
    valid: bool
    reason: str


@tool
def check_inventory(sku: str, quantity: int = 1) -> dict[str, object]:
    """Check whether enough items are in stock.

    Args:
        sku: the stock keeping unit of the item
        quantity: how many items the order needs
    """
    return {"sku": sku, "available": 12, "enough": quantity <= 12}


async def calculate_shipping(country: str, weight_kg: float = 1.0) -> dict[str, object]:
    """Shipping cost and delivery time to a country.

    Args:
        country: ISO 3166 country code of the destination
        weight_kg: parcel weight in kilograms
    """
    return {"country": country, "cost_usd": round(4.5 + 1.2 * weight_kg, 2), "days": 3}


order_validation_agent = Agent(
    "order_validator",
    provider="openai",
    model=os.environ.get("POLOS_EXAMPLE_MODEL", "gpt-4o"),
    instructions=(
        "You validate e-commerce orders. Check the inventory and the shipping for the order, "
        "then answer whether it is valid and why, in one sentence."
    ),
    tools=[check_inventory, calculate_shipping],
    output_type=OrderValidation,
    temperature=0,
    max_steps=6,
)
