"""The exceptions Polos raises to users. Internal control-flow signals live in _private.

The original Polos's names are the classes to catch: ``StepExecutionError`` (a step, a hook, an
event wait or a child could not complete; ours that say more are its subclasses:
``StepFailedError``, ``WaitTimeoutError``, ``ChildWorkflowError``) and ``WorkflowTimeoutError``
(waiting for a run's result took too long; also a ``TimeoutError``). A failed run's
``WorkflowFailedError`` is also a ``RuntimeError``, which the original raised there.
"""

from __future__ import annotations

from typing import Any


class PolosError(Exception):
    """Base of every Polos error."""


class NonDeterminismError(PolosError):
    """The workflow's code asked for a different step than its history holds at that point.

    Raised during replay; the run fails with it instead of silently diverging.
    """


class StepExecutionError(PolosError):
    """A step, a hook or a child could not complete; the run fails with it (no retry at the
    workflow level). The original Polos name: user code catches this one. ``reason`` says why."""

    def __init__(self, reason: str | None = None) -> None:
        super().__init__(reason or "step execution failed")
        self.reason = reason


class StepFailedError(StepExecutionError):
    """A step ran out of attempts. The same exception is raised live and on replay.

    The original exception object cannot be rebuilt from the log, so its type name and message
    are kept as data: ``error_type``, ``message``.
    """

    def __init__(self, key: str, error_type: str, message: str, attempts: int = 1) -> None:
        super().__init__(
            f"step {key!r} failed after {attempts} attempt(s): {error_type}: {message}"
        )
        self.key = key
        self.error_type = error_type
        self.message = message
        self.attempts = attempts


class SerializationError(PolosError):
    """A value could not be turned into JSON (a step output, a workflow input or output)."""


class InputValidationError(PolosError):
    """A workflow's input does not match its annotation. ``errors`` lists field and reason."""

    def __init__(self, workflow: str, errors: list[dict[str, Any]]) -> None:
        lines = "; ".join(f"{e['field']}: {e['reason']}" for e in errors)
        super().__init__(f"invalid input for workflow {workflow!r}: {lines}")
        self.workflow = workflow
        self.errors = errors


class WorkflowFailedError(PolosError, RuntimeError):
    """Raised by ``RunHandle.result()`` when the run failed. A ``RuntimeError`` too: the
    original Polos raised ``RuntimeError("Workflow execution failed: ...")`` there."""

    def __init__(self, run_id: str, error: dict[str, Any]) -> None:
        super().__init__(
            f"run {run_id} failed: {error.get('type', 'Error')}: {error.get('message', '')}"
        )
        self.run_id = run_id
        self.error = error
        self.error_type: str = str(error.get("type", "Error"))


class WorkflowCancelledError(PolosError):
    """Raised by ``RunHandle.result()`` when the run was cancelled."""


class WorkflowTimeoutError(PolosError, TimeoutError):
    """Waiting for a run's result (``RunHandle.result(timeout=...)``, ``polos result``) took
    longer than ``timeout_seconds``; the run itself goes on. The original Polos's class, with
    its attributes and message; a ``TimeoutError`` too, so ``except TimeoutError`` catches it.
    ``status`` is the run's status when the wait gave up, when known."""

    def __init__(
        self,
        execution_id: str | None = None,
        timeout_seconds: float | None = None,
        *,
        status: str | None = None,
    ) -> None:
        message = f"Execution timed out after {timeout_seconds} seconds"
        if execution_id:
            message += f" (execution_id: {execution_id})"
        super().__init__(message)
        self.execution_id = execution_id
        self.timeout_seconds = timeout_seconds
        self.status = status

    @property
    def run_id(self) -> str | None:
        """``execution_id``, in this SDK's words."""
        return self.execution_id


class WaitTimeoutError(StepExecutionError):
    """A ``ctx.step.suspend`` or ``ctx.step.wait_for_event`` reached its ``timeout``.

    Raised inside the workflow (live and on replay alike); catch it to take another path. A
    ``StepExecutionError``, which the original Polos raised for an expired wait.
    """

    def __init__(self, key: str, kind: str, timeout_at: float | None = None) -> None:
        super().__init__(f"{kind} step {key!r} timed out")
        self.key = key
        self.kind = kind
        self.timeout_at = timeout_at


class ChildWorkflowError(StepExecutionError):
    """A child run (``ctx.step.invoke_and_wait`` / ``batch_invoke_and_wait``) failed or was
    cancelled. ``children`` lists every child's outcome: run_id, status, output, error. A
    ``StepExecutionError``, which the original Polos raised for a failed child."""

    def __init__(self, key: str, children: list[dict[str, Any]]) -> None:
        bad = [c for c in children if c.get("status") != "completed"]
        first = bad[0] if bad else {}
        err = first.get("error") or {}
        super().__init__(
            f"step {key!r}: {len(bad)} of {len(children)} child run(s) did not complete; "
            f"{first.get('run_id')} {first.get('status')}: {err.get('type', '')} {err.get('message', '')}".rstrip()
        )
        self.key = key
        self.children = children
        self.child_run_id: str | None = first.get("run_id")
        self.status: str | None = first.get("status")
        self.error: dict[str, Any] = err


class CommandRejectedError(PolosError):
    """The orchestrator refused a command (resume, cancel, ...); ``reason`` says why.

    The command changed nothing; it is kept in the dead-letter stream.
    """

    def __init__(self, reason: str, answer: dict[str, Any] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.answer = answer or {}


class ConnectionFailedError(PolosError):
    """Polos could not connect to NATS, or lost the connection for good.

    ``url`` is the server (or cluster) URL without its password; ``reason`` is one of
    ``refused``, ``timeout``, ``unreachable``, ``authorization``, ``tls`` or ``error``, and the
    message is one line saying which, with what to do about it. ``retryable`` is False for
    ``authorization`` and ``tls``: trying again with the same settings cannot succeed.
    """

    def __init__(self, url: str, reason: str, detail: str) -> None:
        super().__init__(f"cannot connect to {url}: {detail}")
        self.url = url
        self.reason = reason
        self.detail = detail

    @property
    def retryable(self) -> bool:
        return self.reason not in ("authorization", "tls")


class RunNotFoundError(PolosError):
    """No run with this id exists in the namespace."""


class WorkflowNotFoundError(PolosError):
    """No workflow of this name is registered with this worker or client."""


class TopologyMissingError(PolosError):
    """A stream, KV bucket or object store of the namespace is not on the server.

    Only the service role creates them (``polos up``, any Polos service, ``polos init``);
    the message names what is missing and how to create it.
    """


__all__ = [
    "ChildWorkflowError",
    "CommandRejectedError",
    "ConnectionFailedError",
    "InputValidationError",
    "NonDeterminismError",
    "PolosError",
    "RunNotFoundError",
    "SerializationError",
    "StepExecutionError",
    "StepFailedError",
    "TopologyMissingError",
    "WaitTimeoutError",
    "WorkflowCancelledError",
    "WorkflowFailedError",
    "WorkflowNotFoundError",
    "WorkflowTimeoutError",
]
