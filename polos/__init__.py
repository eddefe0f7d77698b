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
from polos.middleware import HookAction, HookContext, HookResult, hook
from polos.queues import Queue, RateLimit, queue
from polos.tools import Tool, tool
from polos.worker import Worker
from polos.workflow import (
    NO_RETRY,
    BatchEventPayload,
    BatchStepResult,
    BatchWorkflowInput,
    EventPayload,
    RetryPolicy,
    SchedulePayload,
    Step,
    StepInfo,
    WorkflowContext,
    WorkflowDefinition,
    WorkflowState,
    get_all_workflows,
    get_workflow,
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
    "BatchEventPayload",
    "BatchStepResult",
    "BatchWorkflowInput",
    "ChildHandle",
    "ChildWorkflowError",
    "CommandRejectedError",
    "ConnectionFailedError",
    "EventPayload",
    "GuardrailViolation",
    "HookAction",
    "HookContext",
    "HookResult",
    "InputValidationError",
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
    "SchedulePayload",
    "SerializationError",
    "Settings",
    "Step",
    "StepExecutionError",
    "StepFailedError",
    "StepInfo",
    "Tool",
    "WaitTimeoutError",
    "Worker",
    "WorkflowCancelledError",
    "WorkflowContext",
    "WorkflowDefinition",
    "WorkflowFailedError",
    "WorkflowNotFoundError",
    "WorkflowState",
    "current_step",
    "get_all_workflows",
    "get_workflow",
    "hook",
    "queue",
    "tool",
    "workflow",
]
