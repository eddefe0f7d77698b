"""Turning user values into JSON and back, typed by annotations.

Anything pydantic can serialise goes in: models, dataclasses, datetimes, UUIDs, enums and plain
JSON types. On the way back a value is validated against the annotation it is read with, so a
step that returned ``Payment`` live returns ``Payment`` on replay too.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import pydantic
import pydantic_core

from polos.errors import SerializationError

_MISSING = inspect.Parameter.empty


def to_json(value: Any, *, what: str) -> Any:
    """Return a JSON-compatible copy of ``value``; ``what`` names it in the error message."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    try:
        return pydantic_core.to_jsonable_python(value)
    except (pydantic_core.PydanticSerializationError, TypeError, ValueError) as exc:
        raise SerializationError(
            f"{what} is a {type(value).__module__}.{type(value).__qualname__}, "
            f"which cannot be serialised to JSON: {exc}"
        ) from exc


@lru_cache(maxsize=1024)
def _adapter(tp: Any) -> pydantic.TypeAdapter[Any]:
    return pydantic.TypeAdapter(tp)


def from_json(data: Any, tp: Any) -> Any:
    """Validate JSON ``data`` as ``tp``; with no annotation the JSON comes back as it is."""
    if tp is None or tp is _MISSING or tp is Any:
        return data
    try:
        return _adapter(tp).validate_python(data)
    except TypeError:  # an unhashable or exotic annotation: build an adapter without the cache
        return pydantic.TypeAdapter(tp).validate_python(data)


def validation_errors(exc: pydantic.ValidationError) -> list[dict[str, Any]]:
    """Pydantic's errors as ``{"field": "a.b", "reason": "..."}`` for messages and dead letters."""
    out = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ())) or "(input)"
        out.append({"field": loc, "reason": err.get("msg", "invalid")})
    return out


@lru_cache(maxsize=1024)
def return_type(fn: Callable[..., Any]) -> Any:
    """The annotated return type of ``fn`` (the awaited type for coroutine functions)."""
    target = getattr(fn, "__wrapped__", fn)
    try:
        hints = typing.get_type_hints(target)
    except Exception:
        hints = getattr(target, "__annotations__", {})
    tp = hints.get("return", _MISSING)
    return None if tp is _MISSING or tp is type(None) else tp


def json_schema(tp: Any) -> dict[str, Any] | None:
    """A JSON schema for ``tp`` where pydantic can make one (for the registry and the docs)."""
    if tp is None or tp is _MISSING or tp is Any:
        return None
    try:
        return _adapter(tp).json_schema()
    except Exception:
        return None


__all__ = ["from_json", "json_schema", "return_type", "to_json", "validation_errors"]
