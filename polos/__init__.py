"""Polos: durable execution for AI agents on NATS JetStream.

The public API is what ``__all__`` lists; ``tests/test_public_api.py`` pins it.
"""

from polos import events, schedules
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
from polos.client import ExecutionHandle, PolosClient, RunHandle, RunInfo, batch_invoke
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
from polos.events import BatchEventPayload, EventPayload
from polos.middleware import HookAction, HookContext, HookResult, hook
from polos.polos import Polos
from polos.queues import Queue, RateLimit
from polos.schedules import SchedulePayload
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
    "BatchEventPayload",
    "ChildHandle",
    "ChildWorkflowError",
    "CommandRejectedError",
    "ConnectionFailedError",
    "EventPayload",
    "ExecutionHandle",
    "GuardrailViolation",
    "HookAction",
    "HookContext",
    "HookResult",
    "InputValidationError",
    "NonDeterminismError",
    "Polos",
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
    "batch_invoke",
    "current_step",
    "events",
    "hook",
    "schedules",
    "tool",
    "workflow",
]
