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

import asyncio
import inspect
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, overload

import pydantic

from polos.converter import to_json

_TOOL_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _doc_parts(fn: Callable[..., Any]) -> tuple[str, dict[str, str]]:
    """The description and per-parameter descriptions from a Google or Sphinx style docstring."""
    doc = inspect.getdoc(fn) or ""
    params: dict[str, str] = {}
    desc_lines: list[str] = []
    in_args = False
    current: str | None = None
    for line in doc.splitlines():
        stripped = line.strip()
        sphinx = re.match(r":param\s+(?:\w+\s+)?(\w+):\s*(.*)", stripped)
        if sphinx:
            params[sphinx.group(1)] = sphinx.group(2).strip()
            current, in_args = sphinx.group(1), False
            continue
        if stripped.lower() in {"args:", "arguments:", "parameters:"}:
            in_args, current = True, None
            continue
        if stripped.lower() in {"returns:", "raises:", "yields:", "examples:", "example:"} or (
            stripped.startswith(":") and not sphinx
        ):
            in_args, current = False, None
            continue
        if in_args:
            m = re.match(r"(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)", stripped)
            if m and line.startswith((" ", "\t")) and len(line) - len(line.lstrip()) <= 8:
                current = m.group(1)
                params[current] = m.group(2).strip()
            elif current and stripped:
                params[current] = f"{params[current]} {stripped}".strip()
            continue
        if current and stripped and not in_args:
            params[current] = f"{params[current]} {stripped}".strip()
            continue
        desc_lines.append(line)
    description = "\n".join(desc_lines).strip().split("\n\n")[0].strip()
    return description, params


@dataclass(eq=False)
class Tool:
    """A function the model can call. Build one with ``@tool`` or ``Tool.from_function``."""

    name: str
    description: str
    parameters: dict[str, Any]
    fn: Callable[..., Any]
    approval: bool = False
    args_model: type[pydantic.BaseModel] | None = field(default=None, repr=False)

    @classmethod
    def from_function(
        cls,
        fn: Callable[..., Any],
        *,
        name: str | None = None,
        description: str | None = None,
        approval: bool = False,
    ) -> Tool:
        tool_name = name or getattr(fn, "__name__", None) or ""
        if not _TOOL_NAME_RE.match(tool_name):
            raise ValueError(
                f"tool name {tool_name!r} must be 1-64 letters, digits, '_' or '-' (OpenAI's rule)"
            )
        doc_desc, param_docs = _doc_parts(fn)
        try:
            hints = typing.get_type_hints(fn)
        except Exception:
            hints = dict(getattr(fn, "__annotations__", {}))
        fields: dict[str, Any] = {}
        for p in inspect.signature(fn).parameters.values():
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            ann = hints.get(p.name, Any)
            default = ... if p.default is p.empty else p.default
            fields[p.name] = (ann, pydantic.Field(default, description=param_docs.get(p.name)))
        model = pydantic.create_model(f"{tool_name}_args", **fields)
        schema = model.model_json_schema()
        schema.pop("title", None)
        for prop in schema.get("properties", {}).values():
            prop.pop("title", None)
        schema.setdefault("properties", {})
        return cls(
            name=tool_name,
            description=(description or doc_desc or tool_name).strip(),
            parameters=schema,
            fn=fn,
            approval=approval,
            args_model=model,
        )

    def openai_schema(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }

    async def call(self, arguments: dict[str, Any]) -> Any:
        """Validate the model's arguments, call the function (sync ones in a thread), and
        return its result as JSON. Raises what the function raises, or a validation error."""
        if self.args_model is not None:
            parsed = self.args_model.model_validate(arguments)
            kwargs = {k: getattr(parsed, k) for k in type(parsed).model_fields}
        else:
            kwargs = dict(arguments)
        if inspect.iscoroutinefunction(self.fn):
            result = await self.fn(**kwargs)
        else:
            result = await asyncio.to_thread(self.fn, **kwargs)
            if inspect.isawaitable(result):
                result = await result
        return to_json(result, what=f"the result of tool {self.name!r}")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Calling a tool calls its function, so decorated functions stay usable."""
        return self.fn(*args, **kwargs)


def as_tool(obj: Tool | Callable[..., Any]) -> Tool:
    """A ``Tool`` for a tool or a plain function."""
    if isinstance(obj, Tool):
        return obj
    if callable(obj):
        return Tool.from_function(obj)
    raise TypeError(f"a tool must be a function or a polos.tools.Tool, got {obj!r}")


@overload
def tool(fn: Callable[..., Any], /) -> Tool: ...


@overload
def tool(
    *, name: str | None = None, description: str | None = None, approval: bool = False
) -> Callable[[Callable[..., Any]], Tool]: ...


def tool(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    name: str | None = None,
    description: str | None = None,
    approval: bool = False,
) -> Any:
    """Declare a tool: ``@tool`` bare, or ``@tool(name=..., description=..., approval=True)``.

    With ``approval=True`` each call suspends the run for a human before it executes."""
    if fn is not None:
        return Tool.from_function(fn)

    def wrap(f: Callable[..., Any]) -> Tool:
        return Tool.from_function(f, name=name, description=description, approval=approval)

    return wrap


__all__ = ["Tool", "as_tool", "tool"]
