"""Polos: durable execution for AI agents on NATS JetStream.

The public API is what ``__all__`` lists; ``tests/test_public_api.py`` pins it.
"""

from polos._private.run.execution import current_step
from polos._private.run.waits import ChildHandle, ReceivedEvent, Resumed
from polos.agent import (
    Agent,
    AgentConfigError,
    AgentError,
    AgentGuardrailError,
    AgentOutputError,
    AgentResult,
    AgentRun,
    GuardrailViolation,
    ProviderError,
)
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
from polos.client import PolosClient, RunHandle, RunInfo
from polos.config import Settings
from polos.errors import (
    ChildWorkflowError,
    CommandRejectedError,
    ConnectionFailedError,
    InputValidationError,
    NonDeterminismError,
    PolosError,
    RunNotFoundError,
    SerializationError,
    StepExecutionError,
    StepFailedError,
    WaitTimeoutError,
    WorkflowCancelledError,
    WorkflowFailedError,
    WorkflowNotFoundError,
)
from polos.middleware import (
    GuardrailContext,
    GuardrailResult,
    HookAction,
    HookContext,
    HookResult,
    guardrail,
    hook,
)
from polos.queues import Queue, RateLimit
from polos.tools import Tool, tool
from polos.worker import Worker
from polos.workflow import (
    NO_RETRY,
    RetryPolicy,
    Step,
    StepInfo,
    WorkflowContext,
    WorkflowDefinition,
    workflow,
)

__version__ = "0.1.0"

__all__ = [
    "NO_RETRY",
    "Agent",
    "AgentConfigError",
    "AgentError",
    "AgentGuardrailError",
    "AgentOutputError",
    "AgentResult",
    "AgentRun",
    "ChildHandle",
    "ChildWorkflowError",
    "CommandRejectedError",
    "ConnectionFailedError",
    "ExecutedToolConfig",
    "GuardrailContext",
    "GuardrailResult",
    "GuardrailViolation",
    "HasTextConfig",
    "HookAction",
    "HookContext",
    "HookResult",
    "InputValidationError",
    "MaxStepsConfig",
    "MaxTokensConfig",
    "NonDeterminismError",
    "PolosClient",
    "PolosError",
    "ProviderError",
    "Queue",
    "RateLimit",
    "ReceivedEvent",
    "Resumed",
    "RetryPolicy",
    "RunHandle",
    "RunInfo",
    "RunNotFoundError",
    "SerializationError",
    "Settings",
    "Step",
    "StepExecutionError",
    "StepFailedError",
    "StepInfo",
    "StopConditionContext",
    "Tool",
    "WaitTimeoutError",
    "Worker",
    "WorkflowCancelledError",
    "WorkflowContext",
    "WorkflowDefinition",
    "WorkflowFailedError",
    "WorkflowNotFoundError",
    "current_step",
    "executed_tool",
    "guardrail",
    "has_text",
    "hook",
    "max_steps",
    "max_tokens",
    "stop_condition",
    "tool",
    "workflow",
]
