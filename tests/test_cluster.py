"""The distributed engine: a 3-node JetStream cluster on loopback with R3 streams and buckets.

The leader of the run-history stream is SIGKILLed under load; after the election the work goes
on, every run completes and every completed step ran exactly once.
"""

from __future__ import annotations

import asyncio
import collections
import time
from pathlib import Path

import nats
import pytest

from polos import WorkflowContext, workflow
from polos._private.ops.cluster import CONFIG_DIR, DEFAULT_PORTS, LocalCluster, render_config
from polos._private.store import kv_stream, last_for_subject, leader_last, load_state
from polos._private.store.namespace import connection
from polos.testing import PolosEnvironment, fast_settings

pytestmark = pytest.mark.slow

STARTED: collections.Counter[str] = collections.Counter()
DONE: collections.Counter[str] = collections.Counter()
TIMES: list[float] = []


async def counted(key: str) -> str:
    STARTED[key] += 1
    await asyncio.sleep(0.01)
    DONE[key] += 1
    TIMES.append(time.perf_counter())
    return key


@workflow
async def clustered(ctx: WorkflowContext, steps: int) -> int:
    for i in range(steps):
        await ctx.step.run(f"s{i}", counted, f"{ctx.run_id}/s{i}")
    return steps


@workflow(name="cl_square")
async def cl_square(ctx: WorkflowContext, n: int) -> int:
    return await ctx.step.run("sq", lambda: n * n)


@workflow(name="cl_fan")
async def cl_fan(ctx: WorkflowContext, n: int) -> int:
    # The orchestrator wakes the parent when its last child ends, from reads any replica may
    # answer: a replica behind the child's end must not leave the parent waiting.
    return sum(await ctx.step.batch_invoke_and_wait("fan", [(cl_square, i) for i in range(n)]))


def test_shipped_cluster_configs_are_current() -> None:
    for i in range(1, 4):
        assert (CONFIG_DIR / f"nats-cluster-{i}.conf").read_text() == render_config(
            i, DEFAULT_PORTS
        )


async def test_stream_leader_killed_under_load_work_continues(tmp_path: Path) -> None:
    STARTED.clear()
    DONE.clear()
    cluster = LocalCluster(tmp_path / "cluster")
    cluster.start()
    env: PolosEnvironment | None = None
    try:
        t0 = time.perf_counter()
        await cluster.wait_ready()
        ready = time.perf_counter() - t0
        # Without auth: the three nodes run the shipped cluster configs (docs/operations.md),
        # which have no users; what is tested here is failover, not permissions.
        settings = fast_settings(cluster.url, replicas=3, request_timeout=2.0)
        env = PolosEnvironment(settings, [clustered, cl_fan, cl_square])
        await env.start()
        names = env.client.names
        info = await env.client.js.stream_info(names.runs_stream)
        assert info.config.num_replicas == 3 and info.cluster is not None
        assert len(info.cluster.replicas or []) == 2
        runs, steps = 60, 5
        handles = [await env.client.start(clustered, steps) for _ in range(runs)]
        # Let part of the load complete, then kill the leader of the history stream.
        while sum(DONE.values()) < runs * steps // 4:
            await asyncio.sleep(0.02)
        leader = (await env.client.js.stream_info(names.runs_stream)).cluster.leader
        done_before = sum(DONE.values())
        cluster.node(leader).server.kill()
        t_kill = time.perf_counter()
        # Wait on the log itself: a RunHandle.result() whose connection moved to another node
        # during the election may miss the end event and re-check only after its 30 s cap.
        pending = {h.run_id for h in handles}
        deadline = time.monotonic() + 90
        while pending and time.monotonic() < deadline:
            for run_id in list(pending):
                state = await load_state(env.client.nc, names, run_id)
                if state.done:
                    assert state.status == "completed" and state.output == steps, state.error
                    pending.discard(run_id)
            await asyncio.sleep(0.2)
        assert not pending, f"{len(pending)} runs did not finish"
        recovered = time.perf_counter() - t_kill
        after = [t - t_kill for t in TIMES if t > t_kill]
        per_second = sorted(collections.Counter(int(t) for t in after).items())
        new_info = await env.client.js.stream_info(names.runs_stream)
        new_leader = new_info.cluster.leader
        assert new_leader and new_leader != leader
        expected = {f"{h.run_id}/s{i}" for h in handles for i in range(steps)}
        assert set(DONE) == expected
        assert all(DONE[k] == 1 for k in expected), [k for k in expected if DONE[k] != 1]
        twice = [k for k in expected if STARTED[k] > 1]
        assert all(STARTED[k] <= 2 for k in expected)
        # Every run's history is whole on the surviving replicas.
        for h in handles[:5]:
            state = await load_state(env.client.nc, names, h.run_id)
            assert state.status == "completed" and len(state.steps) == steps
        # The killed node comes back and catches up from the new leader.
        t_back = time.perf_counter()
        cluster.node(leader).server.start()
        while True:
            info = await env.client.js.stream_info(names.runs_stream)
            peers = {p.name: p for p in info.cluster.replicas or []}
            if leader in peers and peers[leader].current:
                break
            assert time.perf_counter() - t_back < 60, f"{leader} never caught up: {peers}"
            await asyncio.sleep(0.2)
        caught_up = time.perf_counter() - t_back
        # Parents waiting on children, with every node up: each is woken by its last child's end.
        t_fan = time.perf_counter()
        fans = [await env.client.start(cl_fan, 3) for _ in range(20)]
        outputs = await asyncio.gather(*(h.result(timeout=60) for h in fans))
        assert outputs == [0 + 1 + 4] * len(fans)
        fanned = time.perf_counter() - t_fan
        # A write acknowledged by the leader, then read at once from a follower's node: the
        # leader's answer always holds it; a direct get there may not yet (counted, not required).
        kv_info = await env.client.js.stream_info(kv_stream(names.waits_bucket))
        follower = next(p.name for p in kv_info.cluster.replicas or [] if p.current)
        writer = await nats.connect(cluster.node(kv_info.cluster.leader).url)
        reader = await nats.connect(cluster.node(follower).url)
        direct_behind = 0
        try:
            for i in range(200):
                subject = f"$KV.{names.waits_bucket}.probe.k{i % 7}"
                ack = await writer.jetstream().publish(subject, b"x")
                last = await leader_last(reader, kv_stream(names.waits_bucket), subject)
                assert last is not None and last.seq == ack.seq
                direct = await last_for_subject(reader, kv_stream(names.waits_bucket), subject)
                direct_behind += direct is None or direct.seq < ack.seq
            # An R3 stream: those reads were the leader's (STREAM.MSG.GET), not direct gets.
            assert connection(reader).replicas[kv_stream(names.waits_bucket)][0] is True
        finally:
            await writer.close()
            await reader.close()
        print(
            f"\ncluster ready in {ready:.1f}s; {runs} runs x {steps} steps; killed stream leader "
            f"{leader} after {done_before} steps; new leader {new_leader}; all runs finished "
            f"{recovered:.1f}s after the kill; steps re-run (in flight at the kill): {len(twice)}; "
            f"lost 0; steps completed per second after the kill: {per_second}; "
            f"{leader} restarted and current again after {caught_up:.1f}s; "
            f"{len(fans)} parents of 3 children each completed in {fanned:.1f}s; "
            f"a follower's direct get behind the leader's ack {direct_behind} times in 200"
        )
    finally:
        if env is not None:
            await env.stop()
        cluster.stop()
