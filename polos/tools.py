"""Tools an agent can call: plain sync or async functions, described to the model by JSON schema.

The schema comes from the function's type hints (through pydantic, so models, enums, lists and
optionals work) and its docstring (the first paragraph is the description; ``Args:`` or
``:param x:`` lines describe the parameters). ``@tool`` sets the name, the description and
``approval=True`` (a human approves each call before it runs)::

    @tool
    def check_inventory(sku: str, quantity: int = 1) -> dict:
        '''Is the item in stock?

        Args:
            sku: the stock keeping unit
            quantity: how many are needed
        '''
"""

from __future__ import annotations

from polos._private.agents.tools import Tool, as_tool, tool

__all__ = ["Tool", "as_tool", "tool"]
