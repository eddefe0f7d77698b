"""``RunHandle.result()`` takes a run's outcome from the stored copy of its ending.

- The runs stream republishes each stored control event on ``<p>.stored.<run>.ctl``; the
  client learns the ending there, with no read after it (one read only: the first, in case
  the run ended before the subscription).
- A run that ended before ``result()`` subscribed is read from the log.
- An ending the stream refused (a fenced-out writer's) reaches ``<p>.run.<id>.ctl``
  subscribers but never ``<p>.stored...``: it is not taken for the outcome.
- A large output (in the Object Store) is fetched from the ending's reference.
- Against a runs stream made without the republish (services of an earlier version),
  ``result()`` listens on the control subject and reads, as before; the services' next
  ``ensure_topology`` adds the republish to the stream's config as it is.
- A ``result()`` waiting across a server restart still gets the outcome.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest

import polos.client
from polos import WorkflowContext, workflow
from polos import history as ev
from polos._private.store import FencedOut, Names, append, ensure_topology, load_state
from polos.client import PolosClient
from polos.config import Settings
from polos.errors import WorkflowFailedError
from polos.testing import PolosEnvironment, SecuredServer, create_topology


@workflow
async def rp_steps(ctx: WorkflowContext, n: int) -> int:
    total = 0
    for i in range(n):
        total += await ctx.step.run(f"s{i}", lambda: 1)
    return total


@workflow
async def rp_gate(ctx: WorkflowContext, tag: str) -> str:
    data = await ctx.step.suspend("approve")
    return f"{tag}:{data.data['ok']}"


@workflow
async def rp_fails(ctx: WorkflowContext, tag: str) -> None:
    await ctx.step.run("boom", _boom, tag)


def _boom(tag: str) -> None:
    raise ValueError(f"no {tag}")


@workflow
async def rp_big(ctx: WorkflowContext, n: int) -> str:
    return "z" * n


class CountingReads:
    """Wraps the client's ``load_state`` (its reads of a run's control events)."""

    def __init__(self) -> None:
        self._real = polos.client.load_state
        self.runs: list[str] = []

    async def __call__(self, nc: Any, names: Any, run_id: str, **kw: Any) -> ev.RunState:
        self.runs.append(run_id)
        return await self._real(nc, names, run_id, **kw)


async def _until_suspended(client: PolosClient, run_id: str) -> ev.RunState:
    for _ in range(500):
        state = await load_state(client.nc, client.names, run_id)
        if state.status == "suspended":
            return state
        await asyncio.sleep(0.02)
    raise AssertionError(f"run {run_id} never suspended")


async def test_the_stored_ending_is_the_outcome_without_a_read_after_it(
    env_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = await env_factory([rp_steps, rp_fails])
    reads = CountingReads()
    monkeypatch.setattr(polos.client, "load_state", reads)
    for _ in range(5):
        handle = await env.client.start(rp_steps, 3)
        assert await handle.result(timeout=10) == 3
        assert reads.runs.count(handle.run_id) <= 1  # the first read, before the ending
    failing = await env.client.start(rp_fails, "luck")
    with pytest.raises(WorkflowFailedError, match="no luck"):
        await failing.result(timeout=10)
    # Whatever the stored ending said, the log says the same.
    assert (await env.client.get(failing.run_id)).status == "failed"


async def test_a_run_that_ended_before_result_subscribed_is_read(env_factory: Any) -> None:
    env = await env_factory([rp_steps])
    handle = await env.client.start(rp_steps, 2)
    assert await handle.result(timeout=10) == 2
    # A handle made later (another process, say): the ending is long past.
    again = env.client.get_handle(handle.run_id, "rp_steps")
    assert await again.result(timeout=10) == 2


async def test_an_ending_the_stream_refused_is_not_the_outcome(
    env_factory: Any, settings: Settings
) -> None:
    env = await env_factory([rp_gate])
    handle = await env.client.start(rp_gate, "real")
    waiting = asyncio.create_task(handle.result(timeout=20))
    state = await _until_suspended(env.client, handle.run_id)
    # A zombie worker's ending, fenced on a sequence long gone: the stream refuses it, yet core
    # subscribers of the run's control subject receive it.
    nc = await nats.connect(settings.worker.nats_url)
    heard: list[bytes] = []
    try:
        names = Names(settings.prefix)
        spy = await nc.subscribe(names.run_subject(handle.run_id, "ctl"), cb=_collect(heard))
        with pytest.raises(FencedOut):
            await append(
                nc.jetstream(),
                names,
                handle.run_id,
                ev.RunCompleted(run_id=handle.run_id, output="zombie"),
                expected_last_seq=1,
                msg_id=f"{handle.run_id}/zombie",
            )
        await nc.flush()
        await spy.unsubscribe()
    finally:
        await nc.close()
    assert any(b"zombie" in m for m in heard)  # it did reach the control subject
    await asyncio.sleep(0.1)
    assert not waiting.done()  # and result() did not take it
    await env.client.resume(handle.run_id, "approve", {"ok": 1})
    assert await waiting == "real:1"
    assert (await load_state(env.client.nc, env.client.names, handle.run_id)).last_seq > (
        state.last_seq
    )


def _collect(into: list[bytes]) -> Any:
    async def cb(msg: Any) -> None:
        into.append(msg.data)

    return cb


async def test_a_large_output_is_fetched_from_the_stored_endings_reference(
    env_factory: Any,
) -> None:
    env = await env_factory([rp_big])
    n = env.client.nc.max_payload + 1000
    handle = await env.client.start(rp_big, n)
    assert await handle.result(timeout=30) == "z" * n


async def test_without_the_republish_result_reads_and_the_services_add_it(
    env_factory: Any, settings: Settings
) -> None:
    env = await env_factory([rp_steps])
    names = Names(settings.prefix)
    js = env.orchestrator.js
    # As services of an earlier version made it: no republish.
    info = await js.stream_info(names.runs_stream)
    cfg = info.config
    cfg.republish = None
    cfg.max_msgs = 1_000_000  # and an operator's edit, which the services keep
    await js.update_stream(cfg)
    old = await PolosClient.connect(settings=settings)
    try:
        handle = await old.start(rp_steps, 4)
        assert await handle.result(timeout=10) == 4
        assert not polos.client.namespace(old.js, old.names, nc=old.nc).stored_ctl
    finally:
        await old.close()
    # A service's start (ensure_topology) puts it back; a new client then listens there.
    await ensure_topology(js, names, settings.service)
    info = await js.stream_info(names.runs_stream)
    assert info.config.republish is not None
    assert info.config.republish.dest == names.stored_ctl_subject("{{wildcard(1)}}")
    assert info.config.max_msgs == 1_000_000
    new = await PolosClient.connect(settings=settings)
    try:
        assert polos.client.namespace(new.js, new.names, nc=new.nc).stored_ctl
        handle = await new.start(rp_steps, 2)
        assert await handle.result(timeout=10) == 2
    finally:
        await new.close()


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[SecuredServer]:
    """A server with authentication on that the test may kill and restart on its port."""
    server = SecuredServer(tmp_path / "srv", port=0, pool=2)
    server.start()
    yield server
    server.stop()


async def test_result_waiting_across_a_server_restart_gets_the_outcome(
    own_server: SecuredServer,
) -> None:
    settings = own_server.namespace()
    await create_topology(settings)
    env = PolosEnvironment(settings, [rp_gate])
    await env.start()
    client = await PolosClient.connect(settings=settings)
    try:
        handle = await client.start(rp_gate, "again")
        waiting = asyncio.create_task(handle.result(timeout=60))
        await _until_suspended(client, handle.run_id)
        own_server.kill()
        await asyncio.sleep(0.5)
        own_server.start()  # same port, same store
        # The resume goes in as soon as the server answers: the run may end before the waiting
        # client is back, and then only its read after the reconnect can tell it.
        resumer = None
        for _ in range(200):
            try:
                resumer = await PolosClient.connect(settings=settings)
                break
            except Exception:
                await asyncio.sleep(0.05)
        assert resumer is not None
        try:
            for _ in range(200):
                try:
                    await resumer.resume(handle.run_id, "approve", {"ok": 2})
                    break
                except Exception:  # the orchestrator may still be reconnecting
                    await asyncio.sleep(0.05)
        finally:
            await resumer.close()
        assert await waiting == "again:2"
    finally:
        await client.close()
        await env.stop()
