"""What every command handler of the orchestrator shares: the refusal it raises, the run id a
command derives, and the JSON object a command's body must be. The bodies themselves are
``polos._private.store.commands``' typed envelopes."""

from __future__ import annotations

import uuid
from typing import Any

import orjson
from nats.aio.msg import Msg

_RUN_NS = uuid.UUID("6f1d0b52-4b8e-4a4e-9a55-0c1f5b3f7d10")


class CommandError(ValueError):
    """A command we cannot act on; the reason goes to the sender and the dead-letter stream."""

    def __init__(self, reason: str, field: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.field = field


class RunNotYetKnown(CommandError):
    """A command names a run that does not exist (yet).

    Commands are handled concurrently, so a resume or cancel sent right after its start can be
    handled before the start. While commands older than this one are still unacknowledged the
    command is retried shortly; once they are all done and the run still does not exist, the
    answer is final.
    """


def derive_run_id(prefix: str, key: str) -> str:
    """A run id that is the same every time the same command is processed."""
    return uuid.uuid5(_RUN_NS, f"{prefix}/{key}").hex


def parse_object(msg: Msg) -> dict[str, Any]:
    try:
        body = orjson.loads(msg.data) if msg.data else {}
    except orjson.JSONDecodeError as exc:
        raise CommandError(f"malformed JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise CommandError(f"the payload must be a JSON object, got {type(body).__name__}")
    return body


__all__ = ["CommandError", "RunNotYetKnown", "derive_run_id", "parse_object"]
