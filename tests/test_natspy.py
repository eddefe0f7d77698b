"""What Polos relies on in nats-py's private attributes, all of it in one module
(``polos._private.store.natspy``): these fail when a nats-py release changes it."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import nats
import nats.errors
import pytest
from nats.aio.client import Client

from polos._private.store import natspy


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
