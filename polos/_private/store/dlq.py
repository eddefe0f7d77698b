"""Dead letters: a message that cannot be acted on is kept, with why, never dropped."""

from __future__ import annotations

import base64
import logging
import time
from typing import Any, Literal, get_args

import orjson
from nats.js import JetStreamContext

from polos._private.store.names import Names

log = logging.getLogger("polos.dlq")


# Who dead-letters, one subject each (``<p>.dlq.<source>``): a command the orchestrator cannot
# act on, a control-subject message that is not an event, a run input that fails its
# annotation, a task that is not a task, an external event that is not JSON (or whose payload
# object is missing), a timer firing or cron schedule the scheduler cannot use, an admission
# entry that is not JSON. docs/architecture.md lists the same; tests/test_docs.py compares.
DlqSource = Literal["cmd", "ctl", "input", "task", "event", "timer", "schedule", "admit"]
DLQ_SOURCES: tuple[DlqSource, ...] = get_args(DlqSource)


async def dead_letter(
    js: JetStreamContext,
    names: Names,
    *,
    source: DlqSource,
    reason: str,
    subject: str,
    data: bytes,
    headers: dict[str, str] | None = None,
    details: Any = None,
) -> None:
    """Keep a message we cannot process, with why, instead of dropping it."""
    if source not in DLQ_SOURCES:  # the type says so too; this is for untyped callers
        raise ValueError(f"dead-letter source {source!r} is not one of {', '.join(DLQ_SOURCES)}")
    try:
        text: str | None = data.decode("utf-8")
        encoded_b64 = None
    except UnicodeDecodeError:
        text, encoded_b64 = None, base64.b64encode(data).decode()
    body = {
        "source": source,
        "reason": reason,
        "details": details,
        "subject": subject,
        "data": text,
        "data_b64": encoded_b64,
        "headers": headers or {},
        "at": time.time(),
    }
    try:
        await js.publish(names.dlq_subject(source), orjson.dumps(body, default=str))
    except Exception:  # the dead-letter path must never take a service down with it
        log.exception("could not dead-letter a message from %s: %s", subject, reason)


__all__ = ["DLQ_SOURCES", "DlqSource", "dead_letter"]
