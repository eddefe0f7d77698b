"""The raw protocol as a plain nats-py client on the client's user sees it: what a repeated
command (same ``Nats-Msg-Id``) gets, and how to get an answer anyway (README, *Repeated
commands*)."""

from __future__ import annotations

from typing import Any

import nats
import orjson

from polos import WorkflowContext, workflow
from polos import history as ev
from polos._private.store import MSG_ID, REPLY_HEADER
from polos.testing import PolosEnvironment as Stack


@workflow
async def echo(ctx: WorkflowContext, value: int) -> int:
    return value


async def test_a_repeated_start_is_acked_as_duplicate_and_answered_only_when_stored(
    stack: Stack,
) -> None:
    await stack.add_worker([echo])
    nc = await nats.connect(stack.as_role("client").nats_url)
    js = nc.jetstream()
    subject = f"{stack.prefix}.cmd.start.echo"
    cmd_stream = stack.client.names.cmd_stream
    try:
        inboxes = [nc.new_inbox() for _ in range(3)]
        subs = [await nc.subscribe(i) for i in inboxes]

        def start(value: int, msg_id: str, inbox: str) -> Any:
            return js.publish(
                subject,
                orjson.dumps({"input": value, "run_id": "job-7"}),
                headers={MSG_ID: msg_id, REPLY_HEADER: inbox},
            )

        first = await start(1, "try-1", inboxes[0])
        assert not first.duplicate
        answer = orjson.loads((await subs[0].next_msg(10)).data)
        assert answer == {"ok": True, "run_id": "job-7", "existing": False, "status": "queued"}
        stored = (await js.stream_info(cmd_stream)).state.last_seq

        # The same message id again: the stream drops it and says so in its ack, with the
        # sequence of the command it kept. Nothing is stored, so no orchestrator ever sees it
        # and nothing will be sent to its Polos-Reply inbox.
        again = await start(2, "try-1", inboxes[1])
        assert again.duplicate is True and again.seq == first.seq
        assert (await js.stream_info(cmd_stream)).state.last_seq == stored

        # What the README says to do: the same run_id under a new message id is stored and
        # answered, and still makes no second run.
        retry = await start(3, "try-2", inboxes[2])
        assert not retry.duplicate
        answer = orjson.loads((await subs[2].next_msg(10)).data)
        assert answer["ok"] and answer["run_id"] == "job-7" and answer["existing"] is True
        assert await stack.client.get_handle("job-7").result(timeout=10) == 1
        history = await stack.client.history("job-7")
        assert [e.input for _, e in history if isinstance(e, ev.RunRequested)] == [1]
        assert subs[1].pending_msgs == 0
    finally:
        await nc.close()
