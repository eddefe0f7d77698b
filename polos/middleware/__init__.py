"""What user code puts around workflows, agents and tools: hooks and guardrails."""

from polos.middleware.guardrail import (
    GuardrailContext,
    GuardrailResult,
    guardrail,
    limit_tool_calls,
)
from polos.middleware.hook import HookAction, HookContext, HookResult, hook

__all__ = [
    "GuardrailContext",
    "GuardrailResult",
    "HookAction",
    "HookContext",
    "HookResult",
    "guardrail",
    "hook",
    "limit_tool_calls",
]
