"""Polos: durable execution for AI agents on NATS JetStream.

The public API is what ``__all__`` lists; ``tests/test_public_api.py`` pins it.
"""

from polos._private.execution import current_step
from polos.client import PolosClient, RunHandle, RunInfo
from polos.config import Settings
from polos.errors import (
    InputValidationError,
    NonDeterminismError,
    PolosError,
    RunNotFoundError,
    SerializationError,
    StepFailedError,
    WorkflowCancelledError,
    WorkflowFailedError,
    WorkflowNotFoundError,
)
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
    "InputValidationError",
    "NonDeterminismError",
    "PolosClient",
    "PolosError",
    "RetryPolicy",
    "RunHandle",
    "RunInfo",
    "RunNotFoundError",
    "SerializationError",
    "Settings",
    "Step",
    "StepFailedError",
    "StepInfo",
    "Worker",
    "WorkflowCancelledError",
    "WorkflowContext",
    "WorkflowDefinition",
    "WorkflowFailedError",
    "WorkflowNotFoundError",
    "current_step",
    "workflow",
]
