"""What a process defines, as the data ``polos agent list`` / ``polos tool list`` show: every
``Agent`` made in the process and every tool they (or a module) hold. Workers put it in their
registration, so the commands can list what live workers serve without importing user code."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from polos._private.agents.loop import _AGENTS
from polos._private.agents.tools import Tool

_PROMPT_CUT = 200  # characters of an agent's instructions kept in its registration


def agent_doc(agent: Any) -> dict[str, Any]:
    prompt = agent.instructions or ""
    return {
        "id": agent.name,
        "provider": agent.provider,
        "model": agent.model,
        "tools": [t.name for t in agent.tools],
        "description": agent.description,
        "instructions": prompt[:_PROMPT_CUT] + ("..." if len(prompt) > _PROMPT_CUT else ""),
        "temperature": agent.temperature,
        "max_steps": agent.max_steps,
        "max_tokens": agent.max_tokens,
    }


def tool_doc(tool: Tool) -> dict[str, Any]:
    return {
        "id": tool.name,
        "description": tool.description,
        "parameters": tool.parameters,
        "approval": bool(tool.approval),
    }


def agents() -> list[dict[str, Any]]:
    """Every agent defined in this process."""
    return [agent_doc(a) for _, a in sorted(_AGENTS.items())]


def tools(extra: Iterable[Tool] = ()) -> list[dict[str, Any]]:
    """Every tool of the process's agents, and ``extra`` ones; one entry per name."""
    found: dict[str, Tool] = {}
    for agent in _AGENTS.values():
        for t in agent.tools:
            found.setdefault(t.name, t)
    for t in extra:
        found.setdefault(t.name, t)
    return [tool_doc(t) for _, t in sorted(found.items())]


__all__ = ["agent_doc", "agents", "tool_doc", "tools"]
