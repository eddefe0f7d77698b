"""Commands: the body of each command (one typed envelope per verb, for every writer and the
orchestrator, which refuses any other field), and sending one and waiting for the
orchestrator's answer (its ``Polos-Reply`` inbox).

On ``<p>.cmd.<verb>.…`` (stream ``<P>_CMD``), one JSON object each:

- start ``<p>.cmd.start.<workflow>``: ``StartCommand``;
- resume ``<p>.cmd.resume.<run_id>.<key token>``: ``ResumeCommand`` (``data`` or ``data_ref``);
- cancel ``<p>.cmd.cancel.<run_id>``: ``CancelCommand``;
- child ``<p>.cmd.child.<parent>.<child>`` (a parent's worker): ``ChildCommand``.
"""

from __future__ import annotations

import asyncio
from typing import Any, TypedDict

import orjson
from nats.aio.client import Client as NATS

from polos._private.store.writes import MSG_ID, REPLY_HEADER, publish, requester


class StartCommand(TypedDict, total=False):
    input: Any
    input_ref: str  # instead of input: the run's payload object ``<run_id>/<sha256>``
    run_id: str
    queue: str
    concurrency_key: str
    session_id: str
    user_id: str
    initial_state: Any


class ResumeCommand(TypedDict, total=False):
    data: Any
    data_ref: str  # instead of data: the run's payload object ``<run_id>/<name>``


class CancelCommand(TypedDict, total=False):
    reason: str


class ChildCommand(TypedDict, total=False):
    workflow: str
    input: Any
    input_ref: str
    parent_run_id: str
    parent_step: str
    root_run_id: str
    root_workflow: str
    queue: str
    concurrency_key: str
    session_id: str
    user_id: str
    initial_state: Any


START_FIELDS = frozenset(StartCommand.__annotations__)
RESUME_FIELDS = frozenset(ResumeCommand.__annotations__)
CANCEL_FIELDS = frozenset(CancelCommand.__annotations__)
CHILD_FIELDS = frozenset(ChildCommand.__annotations__)


async def send_command(
    nc: NATS,
    subject: str,
    body: ResumeCommand | CancelCommand,
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

    async with requester(nc).answer() as (inbox, answered):
        # The stored ack first (a command the stream refused raises here), then the answer.
        await publish(
            nc,
            subject,
            orjson.dumps(body),
            headers={
                MSG_ID: msg_id,
                REPLY_HEADER: inbox,
                "Polos-Client": "python",
                **(headers or {}),
            },
            timeout=timeout,
        )
        try:
            msg = await asyncio.wait_for(answered, timeout)
        except TimeoutError as exc:
            raise TimeoutError(
                f"no orchestrator answered within {timeout}s; the command is stored on "
                f"{subject} and will be processed when one runs"
            ) from exc
    answer: dict[str, Any] = orjson.loads(msg.data)
    if not answer.get("ok"):
        raise CommandRejectedError(str(answer.get("error")), answer)
    return answer


__all__ = [
    "CANCEL_FIELDS",
    "CHILD_FIELDS",
    "RESUME_FIELDS",
    "START_FIELDS",
    "CancelCommand",
    "ChildCommand",
    "ResumeCommand",
    "StartCommand",
    "send_command",
]
