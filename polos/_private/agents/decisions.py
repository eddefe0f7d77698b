"""The decision record of an LLM call: the tools it chose, those it did not, and why."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    pass


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
    not choose, its stated reason and its reasoning. Recorded in the llm step's
    ``meta["choice"]``."""
    chosen = [str(c.get("name")) for c in message.get("tool_calls") or [] if isinstance(c, dict)]
    record: dict[str, Any] = {
        "chosen": chosen,
        "alternatives": [t for t in offered if t not in chosen],
        "reason": reason_of(message),
    }
    said = message.get("reasoning")
    if isinstance(said, str) and said.strip():
        # The model's reasoning summary (Responses), thinking (Anthropic) or reasoning text
        # (compatible servers), kept whole beside the reason.
        record["reasoning"] = said.strip()
    return record


def decision_of(output: Any, meta: Any) -> dict[str, Any]:
    """The decision record of a recorded llm step (rebuilt for steps recorded before it was)."""
    if isinstance(meta, dict) and isinstance(meta.get("choice"), dict):
        return dict(meta["choice"])
    offered = [
        str(t) for t in (meta.get("tools_offered") if isinstance(meta, dict) else None) or []
    ]
    return decision_record(output if isinstance(output, dict) else {}, offered)


__all__ = ["decision_of", "decision_record", "reason_of"]
