"""The public API is what ``polos.__all__`` lists, with these signatures: adding, removing or
changing a name, a parameter, a default or an annotation is a decision, so this fails until
``tests/public_api.txt`` says it too. After such a decision, rewrite the file with
``python tests/test_public_api.py > tests/public_api.txt`` and review the diff."""

from __future__ import annotations

import difflib
import inspect
from pathlib import Path

import polos

SNAPSHOT = Path(__file__).with_name("public_api.txt")


def _is_type_alias(obj: object) -> bool:
    """A ``Literal[...]`` or ``Callable[...]`` the API names (``ToolApproval``): a type, not
    a value, and defined by ``typing``."""
    return type(obj).__module__ in ("typing", "collections.abc", "types") and not inspect.isclass(
        obj
    )


def describe() -> list[str]:
    """One line per public name, and per public method or property of a public class."""
    lines: list[str] = []
    for name in sorted(polos.__all__):
        obj = getattr(polos, name)
        if inspect.isclass(obj):
            bases = ", ".join(b.__name__ for b in obj.__bases__)
            lines.append(f"class {name}({bases})")
            for member, value in sorted(vars(obj).items()):
                if member.startswith("_") and member not in ("__init__", "__call__"):
                    continue
                if isinstance(value, classmethod | staticmethod):
                    kind, fn = type(value).__name__, value.__func__
                    lines.append(f"    {kind} {member}{inspect.signature(fn)}")
                elif inspect.isfunction(value):
                    lines.append(f"    def {member}{inspect.signature(value)}")
                elif isinstance(value, property):
                    lines.append(f"    property {member}")
        elif _is_type_alias(obj):
            lines.append(f"type {name} = {obj!r}")
        elif inspect.ismodule(obj):
            lines.append(f"module {name} ({obj.__name__}): " + ", ".join(sorted(obj.__all__)))
        elif callable(obj):
            lines.append(f"def {name}{inspect.signature(obj)}")
        else:
            lines.append(f"{name}: {type(obj).__name__} = {obj!r}")
    return lines


def test_public_names_and_signatures_are_pinned() -> None:
    expected = SNAPSHOT.read_text().splitlines()
    actual = describe()
    diff = "\n".join(difflib.unified_diff(expected, actual, "public_api.txt", "polos", lineterm=""))
    assert actual == expected, f"the public API changed:\n{diff}"


def test_every_public_name_resolves_and_internals_stay_private() -> None:
    assert not [n for n in polos.__all__ if n.startswith("_")]
    assert not [n for n in polos.__all__ if getattr(polos, n, None) is None]
    # Nothing public is defined where users are told not to look.
    private = [
        n
        for n in polos.__all__
        if not _is_type_alias(getattr(polos, n))
        and not getattr(getattr(polos, n), "__module__", "polos").startswith("polos")
    ]
    assert not private


if __name__ == "__main__":
    print("\n".join(describe()))
