"""What Polos relies on in nats-py's private attributes, all of it in one module
(``polos._private.store.natspy``): these fail when a nats-py release changes it."""

from __future__ import annotations

import os
from typing import Any

import nats
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
