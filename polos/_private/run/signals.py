"""Control-flow signals between a workflow's code and the worker executing it."""

from __future__ import annotations

from polos import history as ev


class Suspend(BaseException):
    """The run must stop executing and wait (for a resume, an event, a timer, a child).

    A BaseException so that a workflow's ``except Exception`` cannot swallow it. The worker
    records ``event`` (fenced) and releases the task; the run holds no worker while it waits.
    """

    def __init__(self, event: ev.RunSuspended, msg_id: str) -> None:
        super().__init__(f"run {event.run_id} suspends at {event.step!r} ({event.kind})")
        self.event = event
        self.msg_id = msg_id
