"""Steps that send something out once for the run: ``publish_event``,
``publish_workflow_event`` and ``resume`` (of another run's suspend).

Each publishes with a message id derived from (run, step), then records a ``publish`` step.
A crash between the two replays to the same message id, which the stream's duplicate window
drops (two minutes by default): the event is stored once, the step recorded once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from polos import history as ev
from polos._private.model.values import EVENT_TYPE_HEADER
from polos._private.store import MSG_ID, payloads, valid_token
from polos._private.store.tokens import event_subject, resume_subject, topic_tokens
from polos.converter import to_json

if TYPE_CHECKING:
    from polos._private.run.execution import RunExecution


def workflow_topic(x: RunExecution) -> str:
    """The run tree's own topic, as the original SDK names it:
    ``workflow/<root workflow>/<root run id>``."""
    req = x.state.requested
    root_wf = (req.root_workflow if req else None) or x.workflow.name
    root_run = (req.root_run_id if req else None) or x.run_id
    return f"workflow/{root_wf}/{root_run}"


async def _begin(x: RunExecution, key: str) -> str | None:
    """The step's id, or None when it is recorded already (replay: nothing to send)."""
    step_id = x.step_id(key, "publish")
    if x.recorded(step_id, "publish", None) is not None:
        return None
    await x.check_new_step(step_id)
    return step_id


async def publish_step(
    x: RunExecution, key: str, topic: str, data: Any, event_type: str | None
) -> None:
    topic_tokens(topic)  # a bad topic fails here, before anything is sent
    if event_type is not None and not isinstance(event_type, str):
        raise TypeError(f"publish_event({key!r}): event_type must be a string")
    step_id = await _begin(x, key)
    if step_id is None:
        return
    encoded = orjson.dumps(to_json(data, what=f"the data of event step {step_id!r}"))
    headers = {MSG_ID: f"{x.run_id}/pub/{step_id}"}
    if event_type:
        headers[EVENT_TYPE_HEADER] = event_type
    if len(encoded) > payloads.inline_limit(x.nc):
        headers[payloads.EVENT_REF] = await payloads.put_event_value(x.js, x.names, encoded)
        encoded = b""
    ack = await x.js.publish(
        event_subject(x.names, topic), encoded, headers=headers, timeout=x.settings.request_timeout
    )
    await x.record(
        ev.StepCompleted(
            key=step_id,
            kind="publish",
            output={"topic": topic, "event_type": event_type, "sequence_id": int(ack.seq)},
        ),
        msg_id=f"{x.run_id}/s/{step_id}",
    )


async def resume_step(x: RunExecution, key: str, run_id: str, step_key: str, data: Any) -> None:
    if not isinstance(run_id, str) or not valid_token(run_id):
        raise ValueError(f"resume({key!r}): {run_id!r} is not a run id")
    step_id = await _begin(x, key)
    if step_id is None:
        return
    body = orjson.dumps({"data": to_json(data, what=f"the data of resume step {step_id!r}")})
    # The orchestrator applies it (or keeps it until that run suspends there); like a client's
    # resume, it is not waited for.
    await x.js.publish(
        resume_subject(x.names, run_id, step_key),
        body,
        headers={MSG_ID: f"{x.run_id}/resume/{step_id}"},
        timeout=x.settings.request_timeout,
    )
    await x.record(
        ev.StepCompleted(key=step_id, kind="publish", output={"resumed": run_id, "step": step_key}),
        msg_id=f"{x.run_id}/s/{step_id}",
    )


__all__ = ["publish_step", "resume_step", "workflow_topic"]
