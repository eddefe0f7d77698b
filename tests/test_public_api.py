"""The public API is what polos.__all__ lists: adding or removing a name is a decision."""

from __future__ import annotations

import polos

PUBLIC = [
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
    "GuardrailViolation",
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
    "SerializationError",
    "Settings",
    "Step",
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
    "current_step",
    "tool",
    "workflow",
]


def test_public_names_are_pinned() -> None:
    assert sorted(polos.__all__) == sorted(PUBLIC)


def test_every_public_name_resolves_and_internals_stay_private() -> None:
    for name in polos.__all__:
        assert getattr(polos, name) is not None
    assert not [n for n in polos.__all__ if n.startswith("_")]


def test_the_design_cards_example_imports() -> None:
    from polos import Agent, WorkflowContext, workflow  # noqa: F401
    from polos.workflow import Step

    for method in ("run", "suspend", "wait_for_event", "agent_invoke_and_wait", "sleep",
                   "sleep_until", "invoke", "invoke_and_wait", "batch_invoke_and_wait",
                   "now", "uuid", "random"):
        assert callable(getattr(Step, method)), method
