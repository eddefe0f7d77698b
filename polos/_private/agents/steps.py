"""The step path agents use for LLM and tool calls: inside a run through the run's own step
machinery (``RunExecution.recorded / check_new_step / record``), so a replay returns the
recorded outcome and calls nothing; outside a run (``Agent.run`` in plain code) it just runs."""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from polos import history as ev
from polos.errors import StepFailedError

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS
    from nats.js import JetStreamContext

    from polos._private.run.execution import RunExecution


# --------------------------------------------------------------------------- the step path


@dataclass
class StepDone:
    """What a step produced: recorded as one StepCompleted."""

    output: Any
    meta: dict[str, Any]
    attempts: int = 1


class StepError(Exception):
    """A step failed for good: recorded as StepFailed; raised as StepFailedError."""

    def __init__(self, error_type: str, message: str, meta: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message
        self.meta = meta or {}


@dataclass
class Recorded:
    output: Any
    meta: dict[str, Any]
    key: str
    replayed: bool


class StepRunner:
    """Runs an agent's steps outside a run: no history, nothing replayed."""

    def __init__(
        self, nc: NATS | None = None, prefix: str | None = None, js: JetStreamContext | None = None
    ) -> None:
        self.run_id = f"local-{uuid.uuid4().hex[:12]}"
        # Streams are published under the root run (the one a client started), so a client
        # follows every agent of the tree, children included, on one subject.
        self.root_run_id = self.run_id
        self.nc = nc
        self.js = js
        self.prefix = prefix
        self.execution: RunExecution | None = None

    @property
    def is_replaying(self) -> bool:
        return False

    async def step(
        self,
        key: str,
        kind: ev.StepKind,
        name: str | None,
        fn: Callable[[str], Awaitable[StepDone]],
    ) -> Recorded:
        try:
            done = await fn(key)
        except StepError as exc:
            raise StepFailedError(key, exc.error_type, exc.message, 1) from exc
        return Recorded(done.output, done.meta, key, False)


class DurableRunner(StepRunner):
    """Runs steps through the run's history: recorded outcomes are returned, new ones appended
    as one fenced event each."""

    def __init__(self, execution: RunExecution) -> None:
        super().__init__(execution.nc, execution.names.prefix, execution.js)
        self.run_id = execution.run_id
        requested = execution.state.requested
        self.root_run_id = (requested.root_run_id if requested else None) or execution.run_id
        self.execution = execution

    @property
    def is_replaying(self) -> bool:
        assert self.execution is not None
        return self.execution.is_replaying

    async def step(
        self,
        key: str,
        kind: ev.StepKind,
        name: str | None,
        fn: Callable[[str], Awaitable[StepDone]],
    ) -> Recorded:
        exe = self.execution
        assert exe is not None
        step_id = exe.step_id(key, kind)
        # An llm step is named by its model, but a model upgrade while runs are in flight is
        # not a code change that breaks replay: the recorded answer stands, so only the kind
        # is checked. (A tool's name is part of its key already.)
        found = exe.recorded(step_id, kind, None if kind == "llm" else name)
        if isinstance(found, ev.StepCompleted):
            return Recorded(found.output, dict(found.meta or {}), step_id, True)
        if isinstance(found, ev.StepFailed):
            raise StepFailedError(
                step_id,
                str(found.error.get("type")),
                str(found.error.get("message")),
                found.attempts,
            )
        await exe.check_new_step(step_id)
        started = time.time()
        t0 = time.perf_counter()
        try:
            done = await fn(step_id)
        except StepError as exc:
            await exe.record(
                ev.StepFailed(
                    key=step_id,
                    kind=kind,
                    name=name,
                    error={
                        "type": exc.error_type,
                        "message": exc.message,
                        "step": step_id,
                        "retryable": False,
                        "details": exc.meta or None,
                    },
                ),
                msg_id=f"{exe.run_id}/s/{step_id}",
            )
            raise StepFailedError(step_id, exc.error_type, exc.message, 1) from exc
        await exe.record(
            ev.StepCompleted(
                key=step_id,
                kind=kind,
                name=name,
                output=done.output,
                attempts=done.attempts,
                started_at=started,
                duration_ms=round((time.perf_counter() - t0) * 1000, 3),
                meta=done.meta,
            ),
            msg_id=f"{exe.run_id}/s/{step_id}",
        )
        return Recorded(done.output, done.meta, step_id, False)


__all__ = ["DurableRunner", "Recorded", "StepDone", "StepError", "StepRunner"]
