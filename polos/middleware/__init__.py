"""What user code puts around workflows, agents and tools: hooks (and guardrails)."""

from polos.middleware.hook import HookAction, HookContext, HookResult, hook

__all__ = ["HookAction", "HookContext", "HookResult", "hook"]
