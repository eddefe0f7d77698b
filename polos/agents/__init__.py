"""Agent building blocks user code names: stop conditions (``polos.agents.stop_conditions``)."""

from polos.agents.stop_conditions import (
    ExecutedToolConfig,
    HasTextConfig,
    MaxStepsConfig,
    MaxTokensConfig,
    StopConditionContext,
    executed_tool,
    has_text,
    max_steps,
    max_tokens,
    stop_condition,
)

__all__ = [
    "ExecutedToolConfig",
    "HasTextConfig",
    "MaxStepsConfig",
    "MaxTokensConfig",
    "StopConditionContext",
    "executed_tool",
    "has_text",
    "max_steps",
    "max_tokens",
    "stop_condition",
]
