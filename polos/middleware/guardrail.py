"""Guardrails: checks on every LLM answer of an agent, before its text or tool calls are used.

A guardrail is ``(ctx, guardrail_context: GuardrailContext) -> GuardrailResult`` (sync or async,
marked with ``@guardrail``), or a string: a rule an LLM judges the answer against (the agent's
own provider and model, as a durable LLM step of its own). A guardrail may pass the answer,
change its text (``modified_content``) or its tool calls (``modified_tool_calls``: ``[]`` runs
no tool), or reject it (``GuardrailResult.fail(reason)``): the agent then asks the model again
with the reason, at most ``guardrail_max_retries`` times, each retry a new LLM request.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict

from polos.middleware.hook import HookAction, HookResult, hook
from polos.types import AgentConfig, Step, ToolCall

__all__ = [
    "GuardrailContext",
    "GuardrailResult",
    "check_guardrails",
    "guardrail",
    "limit_tool_calls",
]


class GuardrailContext(BaseModel):
    """What a guardrail sees: the answer's text and tool calls, and the agent they came from."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    content: Any | None = None
    tool_calls: list[ToolCall] | None = None
    agent_workflow_id: str | None = ""
    agent_run_id: str | None = ""
    session_id: str | None = None
    user_id: str | None = None
    llm_config: AgentConfig = AgentConfig(name="", provider="", model="")
    steps: list[Step] = []


class GuardrailResult(HookResult):
    """A guardrail's answer: continue (perhaps with ``modified_content`` /
    ``modified_tool_calls``), or ``fail(reason)`` to have the model try again."""

    modified_content: Any | None = None
    modified_tool_calls: list[ToolCall] | None = None
    modified_llm_config: AgentConfig | None = None

    @classmethod
    def continue_with(cls, **modifications: Any) -> GuardrailResult:
        """Go on, with ``modified_content=...`` and/or ``modified_tool_calls=[...]``."""
        known = {"modified_content", "modified_tool_calls", "modified_payload", "modified_output"}
        unknown = set(modifications) - known
        if "modified_llm_config" in unknown:
            raise TypeError(
                "GuardrailResult.continue_with(modified_llm_config=...) is not supported here: "
                "an agent's configuration is fixed for its run"
            )
        if unknown:
            raise TypeError(
                f"GuardrailResult.continue_with() got {', '.join(sorted(unknown))}; it accepts "
                "modified_content and modified_tool_calls"
            )
        return cls(action=HookAction.CONTINUE, **modifications)

    @classmethod
    def fail(cls, message: str) -> GuardrailResult:
        """Reject the answer: the model is asked again with ``message`` (or the run fails once
        the retries are used up)."""
        return cls(action=HookAction.FAIL, error_message=message)


GuardrailFunction = Callable[..., Any]


def guardrail(func: GuardrailFunction | None = None) -> Any:
    """Mark ``func(ctx, guardrail_context)`` as a guardrail: ``@guardrail`` or ``@guardrail()``.
    The signature is checked here (two positional parameters)."""

    def mark(fn: GuardrailFunction) -> GuardrailFunction:
        hook(fn)  # the same two-parameter check
        fn.__polos_guardrail__ = True  # type: ignore[attr-defined]
        return fn

    return mark if func is None else mark(func)


def limit_tool_calls(max_calls: int = 5) -> GuardrailFunction:
    """A guardrail that keeps only the first ``max_calls`` tool calls of an answer (``0``: the
    answer's tool calls are dropped and the model sees its text only)."""
    if max_calls < 0:
        raise ValueError("limit_tool_calls(max_calls) needs max_calls >= 0")

    def limit_tool_calls(ctx: Any, guardrail_ctx: GuardrailContext) -> GuardrailResult:
        calls = guardrail_ctx.tool_calls or []
        if len(calls) <= max_calls:
            return GuardrailResult.continue_with()
        return GuardrailResult.continue_with(modified_tool_calls=calls[:max_calls])

    guardrail(limit_tool_calls)
    return limit_tool_calls


def check_guardrails(guardrails: Any, *, where: str) -> list[GuardrailFunction | str]:
    """The guardrails option as a list: callables (checked as ``@guardrail`` would) and
    strings (rules an LLM judges); anything else raises naming ``where``."""
    if guardrails is None:
        return []
    items = list(guardrails) if isinstance(guardrails, list | tuple) else [guardrails]
    for item in items:
        if isinstance(item, str):
            if not item.strip():
                raise ValueError(f"{where}: a string guardrail must say what to check")
            continue
        if not callable(item):
            raise TypeError(
                f"{where}: a guardrail is a function (ctx, guardrail_context) or a string, "
                f"got {item!r}"
            )
        guardrail(item)
    return items
