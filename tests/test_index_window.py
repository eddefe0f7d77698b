"""The orchestrator holds a run's RunRequested and RunClaimed for the run's next control event
and writes the run index once for them all (``Settings.index_window``), without giving up what
the index promises:

- a fast run's request, claim and end make one index write (three with the window at 0), and
  the entry says the same as when written event by event;
- a held event is acknowledged only once the write that holds it is stored: after an
  orchestrator holding one is SIGKILLed, the next orchestrator gets it again and the index has
  the run;
- a held event with no next event is written when the window ends (a run waiting for a
  worker shows as queued), or when its orchestrator stops;
- a child whose request and claim died held with their orchestrator, and which ends before
  they come back, still wakes its parent: the next orchestrator folds its end into an entry
  that does not say whose child it is yet;
- a wake the orchestrator dispatched itself (a resume) waits with the claim for the run's next
  event (one write for the three); a wake it did not dispatch (a timer's, whose task its hook
  puts out) is never held, so the window does not delay the run.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from polos import WorkflowContext, workflow
from polos._private.store import load_state
from polos.client import ExecutionHandle, PolosClient
from polos.testing import PolosEnvironment
from polos.worker import Worker
from tests.helpers import kill, spawn, stop

ROOT = Path(__file__).resolve().parents[1]
ORCHESTRATOR = ["-m", "polos_services.orchestrator"]
_VOLATILE = ("run_id", "created_at", "updated_at", "started_at", "ended_at", "worker_id")


@workflow
async def iw_quick(ctx: WorkflowContext, n: int) -> int:
    return n + 1


# The child's step waits for the test: it ends only once the orchestrator that held its request
# and claim is dead and another one runs.
_GATE: dict[str, asyncio.Event] = {}


async def _gated(run_id: str) -> int:
    await _GATE[run_id].wait()
    return 1


@workflow
async def iw_child(ctx: WorkflowContext, n: int) -> int:
    return await ctx.step.run("gated", _gated, ctx.parent_run_id or "") + n


@workflow
async def iw_parent(ctx: WorkflowContext, n: int) -> int:
    return await ctx.step.invoke_and_wait("kid", iw_child, n) + 1


@workflow
async def iw_approval(ctx: WorkflowContext, n: int) -> int:
    got = await ctx.step.suspend("approve")
    return n + int(got.data["add"])


@workflow
async def iw_nap(ctx: WorkflowContext, n: int) -> int:
    await ctx.step.sleep("nap", 0.05)
    return n + 1


def _service_env(settings: Any) -> dict[str, str]:
    """The environment of an orchestrator process of the namespace, as the service role."""
    env = dict(os.environ)
    env.update(settings.service.to_env())
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    return env


async def _until_listed(client: PolosClient, run_id: str, status: str) -> None:
    for _ in range(800):
        if any(r.run_id == run_id and r.status == status for r in await client.list_runs()):
            return
        await asyncio.sleep(0.025)
    raise AssertionError(f"the run index never showed run {run_id} {status}")


async def _one_write_with_the_window(
    make_settings: Any,
    wf: Any,
    before: Callable[[PolosClient], Awaitable[ExecutionHandle[Any] | None]],
    counted: Callable[[PolosClient, ExecutionHandle[Any] | None], Awaitable[ExecutionHandle[Any]]],
) -> None:
    """The index writes ``counted`` makes for one run: one with a 30 s window, three with the
    window at 0, and the same entry either way (``before`` sets the run up, uncounted)."""
    entries = {}
    for window in (30.0, 0.0):
        settings = await make_settings(index_window=window)
        env = PolosEnvironment(settings, [wf])
        await env.start()
        try:
            index = env.orchestrator.index
            ready = await before(env.client)
            writes = index.writes
            handle = await counted(env.client, ready)
            await _until_listed(env.client, handle.run_id, "completed")
            assert index.writes - writes == (1 if window else 3), window
            assert index._held == {}
            entry = await index.read(handle.run_id)
            assert entry is not None
            entries[window] = {k: v for k, v in entry.items() if k not in _VOLATILE}
        finally:
            await env.stop()
    assert entries[30.0] == entries[0.0]


async def test_a_fast_runs_index_entry_is_one_write(make_settings: Any) -> None:
    async def nothing(client: PolosClient) -> None:
        return None

    async def run(client: PolosClient, _: ExecutionHandle[Any] | None) -> ExecutionHandle[Any]:
        handle = await client.start(iw_quick, 1)
        assert await handle.result(timeout=20) == 2
        # Far longer than the run: the request and the claim waited for its end.
        return handle

    await _one_write_with_the_window(make_settings, iw_quick, nothing, run)


async def test_a_resumed_runs_wake_claim_and_end_are_one_write(make_settings: Any) -> None:
    async def suspended(client: PolosClient) -> ExecutionHandle[Any]:
        handle = await client.start(iw_approval, 1)
        await _until_listed(client, handle.run_id, "suspended")
        return handle

    async def resume(
        client: PolosClient, handle: ExecutionHandle[Any] | None
    ) -> ExecutionHandle[Any]:
        assert handle is not None
        answer = await client.resume(handle.run_id, "approve", {"add": 2})
        assert answer["status"] == "resumed"
        # The wake was this orchestrator's own: it waited with the claim for the end.
        assert await handle.result(timeout=20) == 3
        return handle

    await _one_write_with_the_window(make_settings, iw_approval, suspended, resume)


async def test_a_timers_wake_is_not_held(make_settings: Any) -> None:
    # The scheduler's wake is dispatched by the orchestrator's hook, which runs only once the
    # wake is in the index: held for the window, the run would sleep 30 s instead of 0.05.
    settings = await make_settings(index_window=30.0)
    env = PolosEnvironment(settings, [iw_nap])
    await env.start()
    try:
        index = env.orchestrator.index
        handle = await env.client.start(iw_nap, 1)
        assert await handle.result(timeout=10) == 2
        await _until_listed(env.client, handle.run_id, "completed")
        assert index._held == {}
    finally:
        await env.stop()


async def test_a_held_event_is_written_when_the_window_ends(make_settings: Any) -> None:
    settings = await make_settings(index_window=0.2)
    env = PolosEnvironment(settings, [iw_quick], with_worker=False)
    await env.start()
    try:
        handle = await env.client.start(iw_quick, 1)  # no worker: nothing follows the request
        await _until_listed(env.client, handle.run_id, "queued")
        async with Worker([iw_quick], settings=settings.worker):
            assert await handle.result(timeout=20) == 2
        await _until_listed(env.client, handle.run_id, "completed")
    finally:
        await env.stop()


async def test_a_held_event_survives_a_sigkilled_orchestrator(
    make_settings: Any, tmp_path: Path
) -> None:
    settings = await make_settings(index_window=600.0)
    env = _service_env(settings)
    orch = spawn(ORCHESTRATOR, env, tmp_path / "o1.out")
    client = await PolosClient.connect(settings=settings)
    try:
        handle = await client.start(iw_quick, 5)
        for _ in range(800):  # the orchestrator created the run: its RunRequested is stored
            if (await load_state(client.nc, client.names, handle.run_id)).requested:
                break
            await asyncio.sleep(0.025)
        else:
            raise AssertionError("the orchestrator never created the run")
        # It holds the request for its next event (none comes: no worker) and has not acked it.
        assert handle.run_id not in {r.run_id for r in await client.list_runs()}
        kill(orch)
        orch = spawn(ORCHESTRATOR, {**env, "POLOS_INDEX_WINDOW": "0"}, tmp_path / "o2.out")
        # Unacknowledged, the request comes back to the next orchestrator (service_ack_wait).
        await _until_listed(client, handle.run_id, "queued")
        async with Worker([iw_quick], settings=settings.worker):
            assert await handle.result(timeout=20) == 6
        await _until_listed(client, handle.run_id, "completed")
    finally:
        stop(orch)
        await client.close()


async def test_an_orchestrator_that_stops_writes_what_it_holds(make_settings: Any) -> None:
    settings = await make_settings(index_window=600.0)
    env = PolosEnvironment(settings, [iw_quick], with_worker=False)
    await env.start()
    client = await PolosClient.connect(settings=settings)
    stopped = False
    try:
        handle = await env.client.start(iw_quick, 1)
        for _ in range(800):
            if env.orchestrator.index._held:
                break
            await asyncio.sleep(0.025)
        else:
            raise AssertionError("the orchestrator never held the run's request")
        await env.stop()  # long before the window ends
        stopped = True
        await _until_listed(client, handle.run_id, "queued")
    finally:
        await client.close()
        if not stopped:
            await env.stop()


async def test_a_child_ending_before_its_held_request_returns_wakes_its_parent(
    make_settings: Any, tmp_path: Path
) -> None:
    # The request and claim come back only after the consumer's ack wait (30 s here): the
    # parent must be woken long before, by the child's end alone.
    settings = await make_settings(index_window=600.0, service_ack_wait=30.0)
    env = _service_env(settings)
    orch = spawn(ORCHESTRATOR, env, tmp_path / "o1.out")
    client = await PolosClient.connect(settings=settings)
    try:
        async with Worker([iw_parent, iw_child], settings=settings.worker):
            parent = await client.start(iw_parent, 1, run_id="iw-parent")
            _GATE[parent.run_id] = asyncio.Event()
            await _until_listed(client, parent.run_id, "suspended")  # waits for its child
            sus = (await load_state(client.nc, client.names, parent.run_id)).suspended
            assert sus is not None and sus.children
            (child,) = sus.children
            for _ in range(800):  # claimed, its step waiting at the gate
                if (await load_state(client.nc, client.names, child)).status == "running":
                    break
                await asyncio.sleep(0.025)
            else:
                raise AssertionError("the child never ran")
            # Its request and claim are held: not in the index, not acknowledged.
            assert child not in {r.run_id for r in await client.list_runs()}
            kill(orch)
            orch = spawn(ORCHESTRATOR, env, tmp_path / "o2.out")
            _GATE[parent.run_id].set()
            assert await parent.result(timeout=15) == 3
    finally:
        stop(orch)
        await client.close()
