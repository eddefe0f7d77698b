"""Sending a command and waiting for the orchestrator's answer (its ``Polos-Reply`` inbox)."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from polos._private.store import (
    MSG_ID,
    REPLY_HEADER,
)

if TYPE_CHECKING:
    pass



async def send_command(
    nc: NATS,
    js: JetStreamContext,
    subject: str,
    body: dict[str, Any],
    *,
    msg_id: str,
    timeout: float,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Store a command and wait for the orchestrator's answer (on the ``Polos-Reply`` inbox).

    Raises ``CommandRejectedError`` with the orchestrator's reason when it refused the command,
    and ``TimeoutError`` when no orchestrator answered (the command is stored all the same and
    will be processed when one runs).
    """
    from polos.errors import CommandRejectedError

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, max_msgs=1)
    try:
        await js.publish(
            subject,
            orjson.dumps(body),
            headers={MSG_ID: msg_id, REPLY_HEADER: inbox, "Polos-Client": "python",
                     **(headers or {})},
        )
        try:
            msg = await sub.next_msg(timeout)
        except nats.errors.TimeoutError as exc:
            raise TimeoutError(
                f"no orchestrator answered within {timeout}s; the command is stored on "
                f"{subject} and will be processed when one runs"
            ) from exc
        answer: dict[str, Any] = orjson.loads(msg.data)
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    if not answer.get("ok"):
        raise CommandRejectedError(str(answer.get("error")), answer)
    return answer


__all__ = ["send_command"]
