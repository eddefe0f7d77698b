"""What Polos relies on in nats-py's private attributes, all of it in one module
(``polos._private.store.natspy``): these fail when a nats-py release changes it."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import nats
import nats.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from polos._private.store import natspy, stream_seq, writes
from polos._private.store.connection import connect
from polos._private.store.names import Names
from tests.helpers import until

_T = TypeVar("_T")


async def test_connection_of_is_the_connection_a_jetstream_context_was_made_from(
    plain_nats_server: Any,
) -> None:
    nc = await nats.connect(plain_nats_server.url)
    try:
        assert natspy.connection_of(nc.jetstream()) is nc
        assert natspy.connection_of(nc.jetstream(timeout=1.0)) is nc
    finally:
        await nc.close()


@pytest.mark.skipif(os.environ.get("POLOS_FAST_HEADERS") == "0", reason="turned off")
def test_the_fast_header_parser_replaces_nats_pys_own_and_gives_its_results() -> None:
    # nats-py still parses header blocks with this static method (else nothing is replaced:
    # Polos keeps working, only slower, and this test says so).
    assert callable(getattr(Client, "_parse_header_lines", None))
    assert natspy.NATS_HEADER_PARSER is not None, "nats-py's parser gave other results"
    assert Client._parse_header_lines is natspy.parse_header_lines
    for sample in natspy.HEADER_SAMPLES:
        assert natspy.parse_header_lines(sample) == natspy.NATS_HEADER_PARSER(sample)
    with natspy.nats_own_header_parser():
        assert Client._parse_header_lines is not natspy.parse_header_lines
    assert Client._parse_header_lines is natspy.parse_header_lines


async def test_sent_returns_once_a_request_made_just_before_is_on_the_socket(
    plain_nats_server: Any,
) -> None:
    # nats-py buffers a publish and writes it from its flusher task: a request started right
    # before a stretch of work that holds the loop waits for the work unless ``sent`` lets the
    # flusher run first. The reply is what shows it went out: it arrives while the loop is held.
    nc = await nats.connect(plain_nats_server.url)
    try:
        await nc.flush()
        assert nc._pending_data_size == 0
        # Nobody listens on the subject: the server itself answers (no responders), so the
        # answer comes while this process's loop is held.
        out = nc.stats["out_msgs"]
        reply = asyncio.ensure_future(nc.request("polos.test.nobody", b"x", timeout=5))
        await natspy.sent(nc)
        # Published (the request's task ran) and out of nats-py's buffer: on the socket.
        assert nc.stats["out_msgs"] == out + 1
        assert nc._pending_data_size == 0, "the request is still in nats-py's buffer"
        time.sleep(0.2)  # the loop held, as by a long re-walk: the request is out meanwhile
        t0 = time.perf_counter()
        with pytest.raises(nats.errors.NoRespondersError):
            await reply
        # Its answer was waiting in the socket: no round trip after the loop was let go.
        assert time.perf_counter() - t0 < 0.1
    finally:
        await nc.close()


# --------------------------------------------------------------------------- write coalescing


def test_the_coalescing_flusher_replaces_nats_pys_own_which_it_copies() -> None:
    # nats-py's flusher still refers to exactly what ours copies (else it stays in place:
    # every write goes out at once, as before, and this test says so).
    assert natspy.COALESCING, "nats-py's Client._flusher changed: the copy no longer matches"
    assert natspy.NATS_FLUSHER is not None
    assert frozenset(natspy.NATS_FLUSHER.__code__.co_names) == natspy.FLUSHER_NAMES
    assert Client._flusher is natspy._coalescing_flusher


def _count_writes(nc: Client) -> list[int]:
    writes = [0]
    transport = nc._transport
    assert transport is not None
    real = transport.writelines

    def counted(data: Any) -> None:
        writes[0] += 1
        real(data)

    transport.writelines = counted  # type: ignore[method-assign]
    return writes


async def _after_turns(turns: int, publish: Callable[[], Awaitable[_T]]) -> _T:
    # Tasks a loop turn apart: without a hold, the flusher writes each one's publish on its own.
    for _ in range(turns):
        await asyncio.sleep(0)
    return await publish()


async def test_a_busy_connection_sends_what_its_tasks_publish_meanwhile_in_one_write(
    settings: Any,
) -> None:
    got: list[bytes] = []
    for hold, busy in ((0.2, True), (0.2, False), (0.0, True)):
        # The service role (the orchestrator's): it may publish on inboxes, and listen there.
        nc = await connect(settings.service.with_(write_coalesce=hold), "coalesce")
        try:
            subject = f"_INBOX.coalesce.{settings.prefix}"

            async def heard(msg: Any) -> None:
                got.append(msg.data)

            sub = await nc.subscribe(subject, cb=heard)
            await nc.flush()
            natspy.busy_when(nc, lambda b=busy: b)
            made = _count_writes(nc)
            got.clear()
            publish = functools.partial(nc.publish, subject, b"x")
            await asyncio.gather(*(_after_turns(i, publish) for i in range(10)))
            await asyncio.sleep(0.3)  # past the hold: everything is out
            await nc.flush()
            assert len(got) == 10  # nothing lost, whatever the hold
            if hold and busy:
                assert made[0] <= 2, made  # the ten publishes, then the flush's PING
            else:
                assert made[0] >= 10, (hold, busy, made)
            await sub.unsubscribe()
        finally:
            await nc.close()


async def test_a_connection_writes_every_batch_of_messages_without_waiting_for_its_flusher(
    settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # write_batch: many publishes in one turn of the loop (a worker's runs resumed by their
    # acks) go out in writes of that many as they are made, not in one write after the turn;
    # 0 leaves everything to the flusher, as does a socket with a backlog (the flusher waits
    # for it to drain). In order and nothing lost, either way.
    for batch, backlogged in ((4, False), (0, False), (4, True)):
        nc = await connect(settings.service.with_(write_batch=batch), "batches")
        try:
            subject = f"_INBOX.batches.{settings.prefix}"
            got: list[bytes] = []

            async def heard(msg: Any, got: list[bytes] = got) -> None:
                got.append(msg.data)

            sub = await nc.subscribe(subject, cb=heard)
            await nc.flush()
            if backlogged:
                monkeypatch.setattr(natspy, "_WRITE_NOW_MAX_BACKLOG", -1)
            made = _count_writes(nc)
            sent = [str(i).encode() for i in range(10)]
            for data in sent:  # one turn of the loop: the flusher cannot run in between
                await nc.publish(subject, data)
            if batch and not backlogged:
                assert (made[0], len(nc._pending)) == (2, 2)  # 4 + 4 written, 2 left
            else:
                assert (made[0], len(nc._pending)) == (0, 10)
            await nc.flush()

            def all_in(got: list[bytes] = got) -> bool:
                return len(got) >= 10

            await until(all_in, 5, "the ten messages")
            assert got == sent
            await sub.unsubscribe()
        finally:
            monkeypatch.undo()
            await nc.close()


async def test_a_connection_with_few_requests_in_flight_never_holds_them(settings: Any) -> None:
    # A hold far longer than the request timeout: an append of a sequential run (one request
    # in flight) that waited for it would fail. Then, busy: eight appends at once are all
    # acknowledged, in fewer writes than without a hold.
    counts = {}
    for hold in (30.0, 0.05, 0.0):
        nc = await connect(settings.with_(write_coalesce=hold, request_timeout=2.0), "coalesce")
        try:
            subject = Names(settings.prefix).start_subject("coalesce_test")  # a stored command
            if hold == 30.0:
                for _ in range(3):
                    assert (await writes.publish(nc, subject, b"{}", timeout=2.0)).seq > 0
                continue
            async with contextlib.AsyncExitStack() as waiting:
                # Answers awaited (as commands wait for the orchestrator's): the connection is
                # busy. Acks alone come back within a turn or two of the loop, too soon to
                # keep four requests in flight here.
                for _ in range(writes.BUSY_REQUESTS):
                    await waiting.enter_async_context(writes.requester(nc).answer())
                writes_made = _count_writes(nc)
                append = functools.partial(writes.publish, nc, subject, b"{}", timeout=2.0)
                acks = await asyncio.gather(*(_after_turns(i, append) for i in range(8)))
                assert len({a.seq for a in acks}) == 8
                counts[hold] = writes_made[0]
        finally:
            await nc.close()
    assert counts[0.05] < counts[0.0], counts


# --------------------------------------------------------------------------- handing over


async def test_a_handed_over_subscription_gets_every_message_in_the_read_loop_in_order(
    plain_nats_server: Any,
) -> None:
    # Through the slot nats-py keeps for a one-reply request's future: each message reaches
    # the function from nats-py's read loop, as it is parsed (no queue, no task of its own);
    # nats-py keeps the subscription after the first message; a function that raises costs
    # that one message, not the connection.
    nc = await nats.connect(plain_nats_server.url)
    try:
        got: list[bytes] = []
        tasks: set[Any] = set()

        def on_msg(msg: Any) -> None:
            tasks.add(asyncio.current_task())
            if msg.data == b"bad":
                raise ValueError("a handler that fails")
            got.append(msg.data)

        sub = await natspy.subscribe_handing_over(nc, "polos.test.handover", on_msg)
        sent = [str(i).encode() for i in range(500)]
        for i, data in enumerate(sent):
            await nc.publish("polos.test.handover", data)
            if i == 250:
                await nc.publish("polos.test.handover", b"bad")
        await nc.flush()
        await until(lambda: len(got) >= len(sent), 5, "the 500 messages")
        assert got == sent
        assert tasks == {nc._reading_task}
        assert nc.is_connected
        assert sub._pending_queue.qsize() == 0  # nothing queued for a task
        await sub.unsubscribe()
        await nc.publish("polos.test.handover", b"after")
        await nc.flush()
        await asyncio.sleep(0.05)
        assert got == sent
    finally:
        await nc.close()


# --------------------------------------------------------------------------- fast publish


@pytest.mark.skipif(os.environ.get("POLOS_FAST_PUBLISH") == "0", reason="turned off")
def test_the_fast_publish_replaces_nats_pys_own_and_buffers_its_bytes() -> None:
    # nats-py's publish still checks exactly what ours repeats, and its _send_publish still
    # buffers the same bytes for every sample (else nats-py's stays: slower, and this says so).
    assert natspy.FAST_PUBLISH, "nats-py's Client.publish or _send_publish changed"
    assert natspy.NATS_PUBLISH is not None
    assert frozenset(natspy.NATS_PUBLISH.__code__.co_names) == natspy.PUBLISH_NAMES
    assert Client.publish is natspy._publish
    for sample in natspy.PUBLISH_SAMPLES:
        assert natspy.publish_command(*sample) == natspy._nats_py_command(*sample), sample


@pytest.mark.skipif(os.environ.get("POLOS_FAST_PUBLISH") == "0", reason="turned off")
async def test_a_fast_publish_arrives_as_nats_py_would_send_it_and_refuses_what_it_refuses(
    plain_nats_server: Any,
) -> None:
    nc = await nats.connect(plain_nats_server.url)
    try:
        got: list[Any] = []
        arrived = asyncio.Event()

        async def on_msg(msg: Any) -> None:
            got.append(msg)
            if len(got) == 3:
                arrived.set()

        await nc.subscribe("polos.test.fast.>", cb=on_msg)
        await nc.flush()
        headers = {
            writes.EXPECTED_LAST_SUBJECT_SEQ: "12",
            writes.MSG_ID: "r1/s/step-3",
            " Padded ": "  v  ",
            "Lines": "a\r\nb",
            "Uni": "\u00e9",
        }
        # No flush: the publish itself wakes the flusher, as nats-py's does.
        await nc.publish("polos.test.fast.a", b"\x00one", headers=headers)
        await nc.publish("polos.test.fast.b", b"two", reply="polos.test.reply.1")
        await nc.publish("polos.test.fast.c")
        await asyncio.wait_for(arrived.wait(), 5)
        first, second, third = got
        assert first.data == b"\x00one"
        assert first.headers == {
            writes.EXPECTED_LAST_SUBJECT_SEQ: "12",
            writes.MSG_ID: "r1/s/step-3",
            "Padded": "v",
            "Lines": "a  b",
            "Uni": "\u00e9",
        }
        assert (second.data, second.reply, second.headers) == (b"two", "polos.test.reply.1", None)
        assert (third.subject, third.data) == ("polos.test.fast.c", b"")
        assert nc.stats["out_msgs"] >= 3
        # What nats-py refuses, refused the same way, and nothing of it buffered.
        pending = nc._pending_data_size
        for bad in ("polos.test fast", "polos.test.\r\nPUB x 1", ""):
            with pytest.raises(nats.errors.BadSubjectError):
                await nc.publish(bad, b"x")
        with pytest.raises(nats.errors.BadSubjectError):
            await nc.publish("polos.test.fast.d", b"x", reply="bad reply")
        with pytest.raises(nats.errors.BadHeaderError):
            await nc.publish("polos.test.fast.d", b"x", headers={"Bad Name": "v"})
        with pytest.raises(nats.errors.MaxPayloadError):
            await nc.publish("polos.test.fast.d", b"x" * (nc.max_payload + 1))
        assert nc._pending_data_size == pending
        await nc.drain()
        with pytest.raises(nats.errors.ConnectionClosedError):
            await nc.publish("polos.test.fast.e", b"x")
    finally:
        await nc.close()


# --------------------------------------------------------------------------- request timeouts


async def test_requests_time_out_on_time_with_one_sweep_and_leave_nothing_behind(
    plain_nats_server: Any,
) -> None:
    # The requester bounds its requests with one sweep instead of a timer each: a request
    # nobody answers fails with nats-py's TimeoutError after its timeout (at most a tenth of it
    # late); answered ones never do; a shorter timeout sent after a longer one is not held up
    # by it; and once nothing is waited on, no sweep is left on the loop.
    nc = await nats.connect(plain_nats_server.url)
    try:

        async def answer(msg: Any) -> None:
            await nc.publish(msg.reply, b'{"seq": 7}')

        async def ignore(msg: Any) -> None:
            pass

        await nc.subscribe("polos.test.hole", cb=ignore)  # a listener that never answers
        await nc.subscribe("polos.test.answered", cb=answer)
        await nc.flush()
        req = writes.requester(nc)

        async def timed(subject: str, timeout: float) -> tuple[str, float]:
            t0 = time.perf_counter()
            try:
                ack = await writes.publish(nc, subject, b"x", timeout=timeout)
            except nats.errors.TimeoutError:
                return "timeout", time.perf_counter() - t0
            return f"seq {ack.seq}", time.perf_counter() - t0

        long = asyncio.ensure_future(timed("polos.test.hole", 1.0))
        await asyncio.sleep(0.05)
        short, answered = await asyncio.gather(
            timed("polos.test.hole", 0.2),
            asyncio.gather(*(timed("polos.test.answered", 0.2) for _ in range(50))),
        )
        # Not before its time, and not held up by the longer one (loose: a loaded CI machine).
        assert short[0] == "timeout" and 0.2 <= short[1] < 0.8, short
        assert {outcome for outcome, _ in answered} == {"seq 7"}
        assert not long.done()
        outcome, took = await long
        assert outcome == "timeout" and 1.0 <= took < 2.0, took
        # Nothing awaited any more: no deadline and no sweep left on the loop.
        assert req._open == {} and req._deadlines == {} and req._sweep is None
        # A request cancelled while it waits is dropped too.
        waiting = asyncio.ensure_future(timed("polos.test.hole", 0.3))
        await asyncio.sleep(0.05)
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
        assert req._open == {} and req._deadlines == {} and req._sweep is None
    finally:
        await nc.close()


# --------------------------------------------------------------------------- stream sequence


async def test_a_deliverys_stream_sequence_is_read_from_its_reply_as_nats_py_reads_it(
    plain_nats_server: Any,
) -> None:
    # The orchestrator reads every command's and control event's sequence with ``stream_seq``
    # rather than nats-py's whole metadata: the same number for every delivery, a redelivered
    # one included, in either reply form; nats-py's own error for what is no delivery.
    nc = await nats.connect(plain_nats_server.url)
    try:
        js = nc.jetstream()
        stream = f"SEQ{uuid.uuid4().hex[:8]}"
        await js.add_stream(name=stream, subjects=[f"{stream}.>"])
        for i in range(40):  # interleaved subjects: stream and consumer sequences differ
            await js.publish(f"{stream}.{'a' if i % 3 else 'b'}", str(i).encode())
        sub = await js.pull_subscribe(f"{stream}.a", durable="d", stream=stream)
        msgs = await sub.fetch(40, timeout=2)
        assert len(msgs) == 26
        assert [stream_seq(m) for m in msgs] == [m.metadata.sequence.stream for m in msgs]
        assert [stream_seq(m) for m in msgs] != [m.metadata.sequence.consumer for m in msgs]
        await msgs[0].nak()
        again = (await sub.fetch(1, timeout=2))[0]
        assert again.metadata.num_delivered == 2
        assert (
            stream_seq(again) == again.metadata.sequence.stream == msgs[0].metadata.sequence.stream
        )
    finally:
        await nc.close()
    # The form with a domain and an account hash (a leaf node's, or a newer server's).
    v2 = Msg(nc, subject="s", reply="$JS.ACK.hub.AHASH.S.d.1.4711.3.1700000000000000000.0.rnd")
    assert stream_seq(v2) == v2.metadata.sequence.stream == 4711
    for reply in ("", "_INBOX.abc", "$JS.ACK.S.d.1"):
        with pytest.raises(nats.errors.NotJSMessageError):
            stream_seq(Msg(nc, subject="s", reply=reply))
