"""Which child runs a parent's history names."""

from __future__ import annotations

from typing import TYPE_CHECKING

from polos import history as ev

if TYPE_CHECKING:
    pass


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
                # ``batch_invoke``: every child it started
                for child in holder.get("children") or ():
                    if event.kind == "invoke" and isinstance(child, dict):
                        if isinstance(child.get("run_id"), str):
                            found.append(child["run_id"])
    return found


__all__ = ["children_named"]
