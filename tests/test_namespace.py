"""The ``Namespace`` handle: one per (connection, prefix), holding what the store and the
features above it cache, and gone with its connection."""

from __future__ import annotations

import gc
import weakref

from polos._private.limits import TokenLimiter, store_for
from polos._private.store import (
    Names,
    check_topology,
    connect,
    namespace,
    payloads,
    publish,
    read_subject,
)
from polos._private.store.namespace import connection
from tests.conftest import MakeSettings


async def test_one_namespace_per_connection_and_prefix_shared_by_every_caller(
    make_settings: MakeSettings,
) -> None:
    settings = await make_settings()
    names = Names(settings.prefix)
    nc = await connect(settings, name="test-namespace")
    try:
        js = nc.jetstream()
        ns = namespace(js, names)
        # Another JetStream context of the same connection finds the same namespace; another
        # prefix is another namespace; another connection has its own.
        assert namespace(nc.jetstream(timeout=1.0), names) is ns
        assert namespace(js, Names(settings.prefix + "-other")) is not ns
        assert ns.nc is nc and ns.js is js and ns.names == names

        await check_topology(js, names)
        assert ns.topology_checked

        obs = await payloads.store(js, names)
        assert ns.payloads is obs
        assert await payloads.store(nc.jetstream(), names) is obs  # no second lookup

        slots = store_for(nc, js, names)
        assert store_for(nc, nc.jetstream(), names) is slots
        limiter = TokenLimiter.shared(nc, js, names, settings)
        assert TokenLimiter.shared(nc, js, names, settings) is limiter
        assert ns.settings is settings  # kept from the first caller that had them

        ack = await publish(nc, names.event_subject("namespace.test"), b'{"n": 1}')
        got = await read_subject(nc, names.events_stream, names.event_subject("namespace.test"))
        assert [m.seq for m in got] == [ack.seq]
        conn = connection(nc)
        assert conn.requester is not None and conn.reader is not None
        assert conn.namespaces[settings.prefix] is ns

        other = await connect(settings, name="test-namespace-2")
        try:
            assert namespace(other.jetstream(), names) is not ns
            assert store_for(other, other.jetstream(), names) is not slots
        finally:
            await other.close()
    finally:
        await nc.close()


async def test_a_closed_connection_goes_with_everything_cached_for_it(
    make_settings: MakeSettings,
) -> None:
    # A registry keyed by the connection kept every connection alive: its values (an inbox,
    # a bucket handle, a slot store) hold the connection.
    settings = await make_settings()
    names = Names(settings.prefix)
    nc = await connect(settings, name="test-namespace-gc")
    js = nc.jetstream()
    await check_topology(js, names)
    await payloads.store(js, names)
    store_for(nc, js, names)
    TokenLimiter.shared(nc, js, names, settings)
    await publish(nc, names.event_subject("namespace.gc"), b"{}")
    await read_subject(nc, names.events_stream, names.event_subject("namespace.gc"))
    gone = weakref.ref(nc)
    await nc.close()
    del nc, js
    gc.collect()
    assert gone() is None, gc.get_referrers(gone())
