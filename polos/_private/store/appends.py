"""The fenced append: the one way anything is written into a run's history."""

from __future__ import annotations

import nats.js.errors
import orjson
from nats.js import JetStreamContext

from polos import history as ev
from polos._private.store import payloads
from polos._private.store.names import Names
from polos._private.store.natspy import connection_of
from polos._private.store.read import leader_last, leader_next
from polos._private.store.writes import (
    EXPECTED_LAST_SUBJECT_SEQ,
    EXPECTED_LAST_SUBJECT_SEQ_SUBJECT,
    MSG_ID,
    WRONG_LAST_SEQUENCE,
    is_transient,
    publish,
    retry_transient,
)


class FencedOut(Exception):
    """An append found the run's history moved on: another writer owns the run now."""

    def __init__(self, run_id: str, expected: int) -> None:
        super().__init__(f"run {run_id}: history moved past seq {expected}")
        self.run_id = run_id
        self.expected = expected


async def append(
    js: JetStreamContext,
    names: Names,
    run_id: str,
    event: ev.Event,
    *,
    expected_last_seq: int,
    msg_id: str,
    timeout: float = 5.0,
) -> int:
    """Append ``event`` to the run's history iff the history still ends at ``expected_last_seq``.

    The fence covers all of the run's subjects. A retried append (its ack was lost) must not
    write twice: the message id de-duplicates it, but the server checks the fence before the
    id, so a retry whose first try was stored is refused as fenced. That refusal is recognised
    by finding our own message id at the end of the subject, and returns its sequence.
    """
    headers = {
        EXPECTED_LAST_SUBJECT_SEQ: str(expected_last_seq),
        EXPECTED_LAST_SUBJECT_SEQ_SUBJECT: names.run_filter(run_id),
        MSG_ID: msg_id,
    }
    subject = names.run_subject(run_id, event.KIND)
    payload = ev.encode(event)
    limit = payloads.inline_limit(connection_of(js))
    if len(payload) > limit:
        # Too big for one message: large fields go to the Object Store, the event to a stub.
        payload = await payloads.offload(js, names, run_id, orjson.loads(payload), limit)
        headers[payloads.HEADER] = "refs"

    async def once(attempt: int) -> int:
        try:
            ack = await publish(
                connection_of(js), subject, payload, timeout=timeout, headers=headers
            )
        except nats.js.errors.APIError as exc:
            if exc.err_code != WRONG_LAST_SEQUENCE:
                raise
            if attempt:
                mine = await _stored_by_us(js, names, subject, msg_id, payload)
                if mine is not None:
                    return mine
            raise FencedOut(run_id, expected_last_seq) from exc
        if ack.duplicate and not await _is_stored_at(js, names, subject, ack.seq, payload):
            # A clustered stream's leader answers a known message id before it checks the
            # fence: "duplicate" then means an earlier execution of the run wrote this record
            # (a stale task, a lost ack), not that this append landed.
            raise FencedOut(run_id, expected_last_seq)
        return ack.seq

    try:
        return await once(0)
    except Exception as exc:
        if not is_transient(exc):
            raise
    return await retry_transient(once, timeout=timeout, what=f"append to run {run_id}", tried=True)


async def _is_stored_at(
    js: JetStreamContext, names: Names, subject: str, seq: int, payload: bytes
) -> bool:
    """Whether the message at ``seq`` is this very append (same bytes: another writer's
    record of the same fact has another timestamp). Asked of the leader, which has just
    answered with ``seq``: a replica behind it would say "not there", and the append would
    take itself for fenced out."""
    m = await leader_next(connection_of(js), names.runs_stream, subject, seq)
    return m is not None and m.seq == seq and m.data == payload


async def _stored_by_us(
    js: JetStreamContext, names: Names, subject: str, msg_id: str, payload: bytes
) -> int | None:
    """The sequence of the last message on ``subject`` if it is this very append: same id and
    same bytes (another writer's record of the same fact has another timestamp). Asked of the
    leader, which has just refused the retry for the message it holds there."""
    last = await leader_last(connection_of(js), names.runs_stream, subject)
    if last is not None and (last.headers or {}).get(MSG_ID) == msg_id and last.data == payload:
        return last.seq
    return None


__all__ = ["FencedOut", "append"]
