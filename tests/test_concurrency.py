"""Global concurrency: queues with limits, concurrency keys and fairness, on KV leases.

Every run records when its one step really started and ended (in this process, one clock);
the proofs are computed from those intervals, never from timings of the test itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import nats
import orjson
import pytest

from polos import Queue, WorkflowContext, workflow
from polos import history as ev
from polos._private import limits
from polos._private.store import read_subject
from polos.config import Settings
from polos.errors import RunNotFoundError
from polos.queues import configure_queue
from polos.testing import PolosEnvironment, as_role

LEASE = 2.0


@pytest.fixture
async def settings(make_settings: Any) -> Settings:
    # Tiny leases, so a lost slot comes back within the test.
    return await make_settings(slot_lease=LEASE)


async def _work(ms: float) -> list[float]:
    t0 = time.time()
    await asyncio.sleep(ms / 1000.0)
    return [t0, time.time()]


Q5 = Queue("q5", concurrency=5)


@workflow(queue=Q5)
async def cc_limited5(ctx: WorkflowContext, ms: float) -> list[float]:
    return await ctx.step.run("work", _work, ms)


SHARED2 = Queue("shared2", concurrency=2)


@workflow(queue=SHARED2)
async def cc_shared2(ctx: WorkflowContext, ms: float) -> list[float]:
    return await ctx.step.run("work", _work, ms)


PERKEY = Queue("perkey", per_key=2)


@workflow(queue=PERKEY)
async def cc_perkey(ctx: WorkflowContext, ms: float) -> list[float]:
    return await ctx.step.run("work", _work, ms)


@workflow
async def cc_unlimited(ctx: WorkflowContext, ms: float) -> list[float]:
    return await ctx.step.run("work", _work, ms)


BIG = Queue("big", concurrency=10_000)


@workflow(queue=BIG)
async def cc_roomy(ctx: WorkflowContext, ms: float) -> list[float]:
    return await ctx.step.run("work", _work, ms)


ONE = Queue("one", concurrency=1)


@workflow(queue=ONE)
async def cc_single(ctx: WorkflowContext, ms: float) -> list[float]:
    return await ctx.step.run("work", _work, ms)


def max_overlap(intervals: list[list[float]]) -> int:
    """The most intervals open at one instant (an end at t closes before a start at t)."""
    points = sorted(
        [(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda p: (p[0], p[1])
    )
    cur = best = 0
    for _, d in points:
        cur += d
        best = max(best, cur)
    return best


async def _held(env: Any) -> list[limits.Entry]:
    store = limits.store_for(env.client.nc, env.client.js, env.client.names)
    return await store.entries("q.>")


async def test_200_runs_through_a_queue_of_5_with_two_orchestrators_and_two_workers(
    env_factory: Any,
) -> None:
    a = await env_factory([cc_limited5])
    b = await env_factory([cc_limited5])  # a second orchestrator, scheduler and worker
    t0 = time.perf_counter()
    handles = await asyncio.gather(
        *((a if i % 2 else b).client.start(cc_limited5, 20.0) for i in range(200))
    )
    # While they wait, a waiting run says so, in the log and in the run index.
    waiting_seen = None
    deadline = time.monotonic() + 20
    # Commands are handled concurrently, so any run may be among the first five admitted:
    # look at several of the last ones started.
    while waiting_seen is None and time.monotonic() < deadline:
        for h in handles[-10:]:
            with contextlib.suppress(RunNotFoundError):  # the start is not processed yet
                info = await a.client.get(h.run_id)
                if info.status == "suspended" and (info.waiting or {}).get("kind") == "slot":
                    waiting_seen = info
                    break
        await asyncio.sleep(0.01)
    assert waiting_seen is not None, "no run was seen waiting for a slot"
    assert waiting_seen.waiting["data"]["queue"] == "q5"  # type: ignore[index]
    # The index follows the log (the orchestrator folds control events as they come).
    listed_waiting = False
    deadline = time.monotonic() + 10
    while not listed_waiting and time.monotonic() < deadline:
        listed = await a.client.list_runs(status="suspended", limit=500)
        listed_waiting = any((r.waiting or {}).get("kind") == "slot" for r in listed)
        await asyncio.sleep(0.02)
    assert listed_waiting
    stats = await limits.queue_stats(a.client.nc, a.client.js, a.client.names)
    print(f"\nwhile running: {stats}")

    results = await asyncio.gather(*(h.result(timeout=120) for h in handles))
    elapsed = time.perf_counter() - t0
    assert len(results) == 200
    peak = max_overlap(results)
    print(
        f"200 runs, limit 5, 2 orchestrators + 2 workers: {elapsed:.2f}s "
        f"({200 / elapsed:.0f} runs/s); most active at once: {peak}"
    )
    workers = {e.worker_id for h in handles[:50] for e in [await a.client.get(h.run_id)]}
    print(f"workers that executed runs: {len(workers)}")
    adm = [x.orchestrator.admission for x in (a, b)]
    print("admission: " + "; ".join(str(x.stats()) for x in adm))
    assert peak <= 5
    assert peak >= 2  # the limit was what held them back, not a lack of work
    # Every slot comes back once the runs are over.
    deadline = time.monotonic() + 10
    while await _held(a) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert await _held(a) == []


async def test_round_robin_across_keys_one_busy_key_does_not_starve_others(
    env_factory: Any,
) -> None:
    env = await env_factory([cc_shared2])
    busy = [await env.client.start(cc_shared2, 20.0, concurrency_key="tenant-a") for _ in range(30)]
    # Tenant A fills the queue first; B and C arrive behind 30 of A's runs.
    while len(await _held(env)) < 2:
        await asyncio.sleep(0.01)
    others = [
        await env.client.start(cc_shared2, 20.0, concurrency_key=k)
        for k in ("tenant-b", "tenant-c")
        for _ in range(3)
    ]
    other_results = await asyncio.gather(*(h.result(timeout=60) for h in others))
    last_other_end = max(e for _, e in other_results)
    busy_results = await asyncio.gather(*(h.result(timeout=60) for h in busy))
    a_after = sum(1 for _, e in busy_results if e > last_other_end)
    peak = max_overlap(busy_results + other_results)
    print(
        f"\nB and C (6 runs, behind 30 of A's) all finished with {a_after} of A's 30 "
        f"still to finish; most active at once: {peak}"
    )
    assert peak <= 2
    # FIFO across keys would have run all 30 of A's first: round robin lets B and C through.
    assert a_after >= 10


async def test_per_key_limit_applies_to_each_key_separately(env_factory: Any) -> None:
    env = await env_factory([cc_perkey])
    hs = {
        k: [await env.client.start(cc_perkey, 15.0, concurrency_key=k) for _ in range(n)]
        for k, n in (("alice@example.com", 12), ("bob", 4))
    }
    res = {k: await asyncio.gather(*(h.result(timeout=60) for h in v)) for k, v in hs.items()}
    peaks = {k: max_overlap(v) for k, v in res.items()}
    total_peak = max_overlap([iv for v in res.values() for iv in v])
    bob_done = max(e for _, e in res["bob"])
    alice_after = sum(1 for _, e in res["alice@example.com"] if e > bob_done)
    print(
        f"\nper-key peaks {peaks}, together {total_peak}; bob finished with "
        f"{alice_after} of alice's 12 still to finish"
    )
    assert all(p <= 2 for p in peaks.values())
    assert alice_after >= 4  # bob never waited behind alice's backlog


async def test_bad_queue_definitions_are_refused() -> None:
    with pytest.raises(ValueError, match="queue name"):
        Queue("has space", concurrency=1)
    with pytest.raises(ValueError, match="positive int"):
        Queue("q", concurrency=0)
    with pytest.raises(ValueError, match="positive int"):
        Queue("q", per_key=True)  # type: ignore[arg-type]


async def test_admission_overhead_per_run(env_factory: Any) -> None:
    """Figures only: the cost admission adds to one run, on the fast path (a slot is free)
    and on the wait path (the run parks and is admitted when a slot frees)."""
    env = await env_factory([cc_unlimited, cc_roomy, cc_single])
    n = 40

    async def sequential(wf: Any) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            await (await env.client.start(wf, 0.0)).result(timeout=30)
        return (time.perf_counter() - t0) / n * 1000

    await sequential(cc_unlimited)  # warm up
    base = await sequential(cc_unlimited)
    fast = await sequential(cc_roomy)
    base2 = await sequential(cc_unlimited)
    t0 = time.perf_counter()
    hs = [await env.client.start(cc_single, 0.0) for _ in range(n)]
    await asyncio.gather(*(h.result(timeout=60) for h in hs))
    one = (time.perf_counter() - t0) / n * 1000
    base_ms = (base + base2) / 2
    print(
        f"\nper run, sequential start->result: unlimited {base_ms:.2f} ms, limited queue "
        f"with a free slot {fast:.2f} ms (admission +{fast - base_ms:.2f} ms); "
        f"limit 1 with {n} queued: {one:.2f} ms per run (park + admit + hand-over)"
    )
    stats = env.orchestrator.admission.stats()
    print(f"admission stats: {stats}")
    assert stats["fast_admits"] >= n


async def test_admission_races_and_a_dead_admitter_neither_leak_nor_double_grant(
    env_factory: Any,
) -> None:
    """Two orchestrators admit the same waiting run at once, and an orchestrator dies right
    after taking a slot: one admission, one task, one slot, and the orphan slot expires."""
    a = await env_factory([], with_worker=False)
    b = await env_factory([], with_worker=False)
    queue = Queue("cc_crash", concurrency=2)  # the default queue of workflow "cc_crash"
    await configure_queue(a.client, queue)
    # The test plays admitters: slots are the orchestrators' to take (service role).
    store = limits.store_for(a.orchestrator.nc, a.orchestrator.js, a.orchestrator.names)
    pools = limits.pool_names(queue, limits.DEFAULT_KEY)
    # Fill the queue with two long leases, so the run we start has to wait.
    for i in range(2):
        assert (
            await store.put(
                f"{pools[0][0]}.{i}", {"run": f"other{i}", "adm": 0}, expected=0, ttl=60
            )
            is not None
        )
    h = await a.client.start("cc_crash", None)
    entries: list[Any] = []
    deadline = time.monotonic() + 10
    while not entries:
        assert time.monotonic() < deadline, "the run never got in line"
        entries = await read_subject(
            a.client.nc, a.client.names.admit_stream, a.client.names.admit_filter("cc_crash")
        )
        await asyncio.sleep(0.01)
    adm_a, adm_b = a.orchestrator.admission, b.orchestrator.admission
    for adm in (adm_a, adm_b):
        adm._stopping = True  # from here on this test drives admission by hand
    for e in await store.entries(f"{pools[0][0]}.*"):
        assert await store.delete(e.revision)
    pending = entries[0]
    entry = orjson.loads(pending.data)

    # An admitter that dies right after taking a slot: the slot is the run's but nobody
    # renews it, so it runs out; the run is still in line.
    orphan, _ = await store.acquire_all(pools, h.run_id, entry["wait_seq"], LEASE)
    assert orphan is not None
    t0 = time.monotonic()
    while await store.entries(f"{pools[0][0]}.*"):
        assert time.monotonic() - t0 < LEASE * 5, "the orphan slot never expired"
        await asyncio.sleep(0.02)
    print(
        f"\norphan slot of a dead admitter expired after {time.monotonic() - t0:.2f}s "
        f"(lease {LEASE}s)"
    )

    # Two live admitters race for the same entry.
    outcomes = await asyncio.gather(
        adm_a._admit(queue, pending.seq, entry), adm_b._admit(queue, pending.seq, entry)
    )
    assert sorted(outcomes) == ["admitted", "gone"], outcomes
    history = await a.client.history(h.run_id)
    assert sum(isinstance(e, ev.RunAdmitted) for _, e in history) == 1
    held = [e for e in await store.entries(f"{pools[0][0]}.*") if e.value["run"] == h.run_id]
    assert len(held) == 1
    subject = a.client.names.task_subject("cc_crash")
    tasks = await a.client.js.stream_info(a.client.names.tasks_stream, subjects_filter=subject)
    assert (tasks.state.subjects or {}).get(subject) == 1  # one task, for this one run
    left = await read_subject(
        a.client.nc, a.client.names.admit_stream, a.client.names.admit_filter("cc_crash")
    )
    assert left == []
    info = await a.client.get(h.run_id)
    assert info.status == "queued"  # admitted, waiting for a worker


SOLO = Queue("solo", concurrency=1)


@workflow(queue=SOLO)
async def cc_approval(ctx: WorkflowContext, ms: float) -> list[float]:
    first = await ctx.step.run("before", _work, ms)
    decision = await ctx.step.suspend("approve")
    second = await ctx.step.run("after", _work, ms)
    assert decision.data == {"ok": True}
    return [first[0], second[0]]  # when the first step started, when the second started


@workflow(queue=SOLO)
async def cc_quick(ctx: WorkflowContext, ms: float) -> list[float]:
    return await ctx.step.run("work", _work, ms)


async def test_a_suspended_run_gives_its_slot_back_and_queues_again_when_woken(
    env_factory: Any,
) -> None:
    env = await env_factory([cc_approval, cc_quick])
    waiting = await env.client.start(cc_approval, 5.0)
    deadline = time.monotonic() + 20
    while True:
        with contextlib.suppress(RunNotFoundError):
            info = await env.client.get(waiting.run_id)
            if info.status == "suspended" and (info.waiting or {}).get("kind") == "suspend":
                break
        assert time.monotonic() < deadline, "the run never suspended"
        await asyncio.sleep(0.01)
    # The queue's one slot is free while it waits: another run goes through.
    other = await (await env.client.start(cc_quick, 5.0)).result(timeout=20)
    assert other[1] > other[0]
    # Occupy the slot, then wake the waiting run: it must queue for the slot, not run over it.
    blocker = await env.client.start(cc_quick, 300.0)
    # The blocker's own lease: the slot of ``other`` can still be there (its release follows
    # its end), and the woken run would then take the slot before the blocker does.
    while not any(e.value.get("run") == blocker.run_id for e in await _held(env)):
        await asyncio.sleep(0.01)
    await env.client.resume(waiting.run_id, "approve", {"ok": True})
    kinds = []
    result = None
    while result is None:
        info = await env.client.get(waiting.run_id)
        kinds.append((info.waiting or {}).get("kind"))
        if info.status == "completed":
            result = await waiting.result(timeout=5)
        await asyncio.sleep(0.01)
    blocked = await blocker.result(timeout=20)
    assert "slot" in kinds, f"the woken run never waited for the slot: {kinds}"
    # It started its second step only after the blocker had ended: never two at once.
    assert result[1] >= blocked[1]
    print(
        f"\nwoken run waited for the slot ({kinds.count('slot')} looks), then went on "
        f"{(result[1] - blocked[1]) * 1000:.1f} ms after the blocker ended"
    )


async def test_polos_queues_and_polos_runs_show_waiting_runs(
    env_factory: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from polos import cli

    env = await env_factory([], with_worker=False)  # no worker: admitted runs stay queued
    await configure_queue(env.client, Queue("cc_shown", concurrency=1))
    handles = [await env.client.start("cc_shown", None, concurrency_key="acme") for _ in range(3)]
    deadline = time.monotonic() + 20
    while True:
        rows = await limits.queue_stats(env.client.nc, env.client.js, env.client.names)
        if sum(r["waiting"] for r in rows) == 2 and sum(r["active"] for r in rows) == 1:
            break
        assert time.monotonic() < deadline, rows
        await asyncio.sleep(0.02)
    base = ["--nats-url", env.settings.nats_url, "--prefix", env.settings.prefix]
    parser = cli.build_parser()
    assert await cli.COMMANDS["queues"][1](parser.parse_args([*base, "queues"])) == 0
    out = capsys.readouterr().out
    assert "cc_shown" in out and "acme" in out
    assert await cli.COMMANDS["queues"][1](parser.parse_args([*base, "queues", "--json"])) == 0
    data = orjson.loads(capsys.readouterr().out)
    assert {(r["key"], r["waiting"], r["active"], r["limit"]) for r in data} == {
        ("*", 0, 1, 1),
        ("acme", 2, 0, 1),
    }
    while True:  # the index (a projection) follows the log
        listed = {r.run_id: r for r in await env.client.list_runs()}
        if (
            sum(
                1
                for h in handles
                if (listed.get(h.run_id) and (listed[h.run_id].waiting or {}).get("kind") == "slot")
            )
            == 2
        ):
            break
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    assert await cli.COMMANDS["runs"][1](parser.parse_args([*base, "runs"])) == 0
    out = capsys.readouterr().out
    assert out.count("slot 'admission'") == 2, out


async def test_an_admission_whose_task_was_never_published_is_repaired_from_the_log(
    env_factory: Any,
) -> None:
    """An orchestrator that dies between appending RunAdmitted and publishing the task: the
    control hook publishes the task from the event (same message id, so never twice)."""
    a = await env_factory([], with_worker=False)
    queue = Queue("cc_repair", concurrency=1)
    await configure_queue(a.client, queue)
    # The test plays the admitter: slots are the orchestrator's to take (service role).
    store = limits.store_for(a.orchestrator.nc, a.orchestrator.js, a.orchestrator.names)
    pool = limits.pool_names(queue, limits.DEFAULT_KEY)
    assert await store.put(f"{pool[0][0]}.0", {"run": "other", "adm": 0}, expected=0, ttl=60)
    h = await a.client.start("cc_repair", None)
    entries: list[Any] = []
    deadline = time.monotonic() + 10
    while not entries:
        assert time.monotonic() < deadline, "the run never got in line"
        entries = await read_subject(
            a.client.nc, a.client.names.admit_stream, a.client.names.admit_filter("cc_repair")
        )
        await asyncio.sleep(0.01)
    adm = a.orchestrator.admission
    adm._stopping = True  # no passes: this test plays the admitter that dies
    entry = orjson.loads(entries[0].data)
    for e in await store.entries(f"{pool[0][0]}.*"):
        await store.delete(e.revision)
    slots, _ = await store.acquire_all(pool, h.run_id, entry["wait_seq"], LEASE)
    assert slots is not None
    await adm._append_fenced(
        h.run_id,
        ev.RunAdmitted(
            run_id=h.run_id,
            step="admission",
            reason="admitted",
            queue="cc_repair",
            slots=slots,
            lease=LEASE,
        ),
        entry["wait_seq"],
        f"{h.run_id}/adm/{entry['wait_seq']}",
    )
    # ... and dies here. The control event alone brings the task.
    subject = a.client.names.task_subject("cc_repair")
    deadline = time.monotonic() + 10
    while True:
        info = await a.client.js.stream_info(a.client.names.tasks_stream, subjects_filter=subject)
        if (info.state.subjects or {}).get(subject):
            break
        assert time.monotonic() < deadline, "the task was never published"
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)  # a repeated repair must not add a second task
    info = await a.client.js.stream_info(a.client.names.tasks_stream, subjects_filter=subject)
    assert (info.state.subjects or {}).get(subject) == 1


# --------------------------------------------------------------------------- the limit holds from
# the first second: whatever the orchestrator knew when it dispatched a run, a worker executes a
# run of a limited queue only under an admission of that queue.

EARLY = Queue("early3", concurrency=3)


@workflow(queue=EARLY)
async def cc_early(ctx: WorkflowContext, ms: float) -> list[float]:
    return await ctx.step.run("work", _work, ms)


async def _two_workers(settings: Settings, *workflows: Any) -> list[Any]:
    from polos.worker import Worker

    workers = [Worker(list(workflows), settings=as_role(settings, "worker")) for _ in range(2)]
    await asyncio.gather(*(w.start() for w in workers))
    return workers


async def _stop_all(workers: list[Any]) -> None:
    await asyncio.gather(*(w.stop() for w in workers))


async def test_runs_started_before_any_worker_registered_the_queue_keep_its_limit(
    env_factory: Any, settings: Settings
) -> None:
    """40 runs started while no worker has registered the workflow (so no orchestrator can
    know its queue), then two workers: at most 3 at once, as the workflow declares."""
    env = await env_factory([], with_worker=False)
    handles = [await env.client.start(cc_early, 30.0) for _ in range(40)]
    deadline = time.monotonic() + 20
    while True:  # every run dispatched, under the only queue the orchestrator could know of
        listed = await env.client.list_runs(limit=100)
        if sum(1 for r in listed if r.status == "queued") == 40:
            break
        assert time.monotonic() < deadline, "the runs were never dispatched"
        await asyncio.sleep(0.02)
    workers = await _two_workers(settings, cc_early)
    try:
        results = await asyncio.gather(*(h.result(timeout=60) for h in handles))
    finally:
        await _stop_all(workers)
    peak = max_overlap(results)
    sent_back = 0
    for h in handles:
        history = await env.client.history(h.run_id)
        sent_back += any(isinstance(e, ev.RunSuspended) and e.kind == "slot" for _, e in history)
    print(
        f"\n40 runs started before any worker registered queue early3 (limit 3): most active "
        f"at once {peak}; {sent_back} sent back to admission by a worker"
    )
    assert peak <= 3
    assert peak >= 2


async def test_runs_started_right_after_two_workers_start_keep_the_limit(
    env_factory: Any, settings: Settings
) -> None:
    """The issue's case: two workers start and 40 runs are started at the same moment; the
    orchestrator had looked the workflow up a moment before (its cache says: no queue)."""
    env = await env_factory([], with_worker=False)
    adm = env.orchestrator.admission
    # What runs started a moment before the deploy leave in the orchestrator's cache: the
    # workflow is unknown (so it has its default queue, unlimited), and so is queue early3
    # (a start that named it, before any worker registered it).
    assert await adm.config.queue(await adm.config.workflow_queue("cc_early")) is None
    assert await adm.config.queue("early3") is None
    starts = [env.client.start(cc_early, 30.0) for _ in range(40)]
    workers, *handles = await asyncio.gather(_two_workers(settings, cc_early), *starts)
    try:
        results = await asyncio.gather(*(h.result(timeout=60) for h in handles))
    finally:
        await _stop_all(workers)
    peak = max_overlap(results)
    print(f"\n40 runs started with two workers starting (stale cache): most active at once {peak}")
    assert peak <= 3


async def test_two_orchestrators_that_never_saw_the_queue_keep_the_limit(
    env_factory: Any, settings: Settings
) -> None:
    a = await env_factory([], with_worker=False)
    b = await env_factory([], with_worker=False)
    handles = [await (a if i % 2 else b).client.start(cc_early, 30.0) for i in range(40)]
    workers = await _two_workers(settings, cc_early)
    try:
        results = await asyncio.gather(*(h.result(timeout=60) for h in handles))
    finally:
        await _stop_all(workers)
    assert max_overlap(results) <= 3


@workflow(name="cc_versioned")
async def cc_versioned_v1(ctx: WorkflowContext, ms: float) -> list[float]:
    return await ctx.step.run("work", _work, ms)


@workflow(name="cc_versioned", queue=Queue("versioned2", concurrency=2))
async def cc_versioned_v2(ctx: WorkflowContext, ms: float) -> list[float]:
    return await ctx.step.run("work", _work, ms)


async def test_a_queue_registered_by_a_newer_worker_version_holds_at_once(
    env_factory: Any, settings: Settings
) -> None:
    """Version 1 of a workflow has no queue; version 2 declares one with a limit of 2. Runs
    started as version 2's workers come up (the orchestrators still know version 1's
    registration) run under version 2's limit."""
    from polos.worker import Worker

    env = await env_factory([], with_worker=False)
    v1 = Worker([cc_versioned_v1], settings=as_role(settings, "worker"))
    await v1.start()
    await (await env.client.start("cc_versioned", 1.0)).result(timeout=20)  # v1 known, cached
    await v1.stop()
    starts = [env.client.start("cc_versioned", 30.0) for _ in range(30)]
    workers, *handles = await asyncio.gather(_two_workers(settings, cc_versioned_v2), *starts)
    try:
        results = await asyncio.gather(*(h.result(timeout=60) for h in handles))
    finally:
        await _stop_all(workers)
    peak = max_overlap([list(r) for r in results])
    print(f"\n30 runs as version 2 (limit 2) came up over version 1 (no queue): peak {peak}")
    assert peak <= 2


# --------------------------------------------------------------------------- JetStream unavailable
# during admission (a leader election, a reconnect): admission's writes are retried like every
# other append and task publish, so nothing is lost and no slot is left behind.


class Unavailable:
    """An orchestrator's connection, for its first ``n`` publishes that ``match``, meets a
    JetStream that cannot take them, the way a client does during a leader election or a
    reconnect: ``refused``, the request is answered with status 503 (no responders) and
    nothing is stored; ``answer_lost``, the message is stored but its ack never comes back."""

    def __init__(self, nc: Any, match: Any, n: int, mode: str) -> None:
        self.nc, self.match, self.left, self.mode = nc, match, n, mode
        self.real = nc.publish
        self.hits: list[str] = []
        nc.publish = self.publish

    async def publish(
        self,
        subject: str,
        payload: bytes = b"",
        reply: str = "",
        headers: dict[str, str] | None = None,
    ) -> None:
        if reply and self.left > 0 and self.match(subject, payload):
            self.left -= 1
            self.hits.append(subject)
            if self.mode == "refused":
                await self.real(reply, b"", headers={"Status": "503"})
                return
            reply = self.nc.new_inbox()  # nobody listens there: the ack is lost
        await self.real(subject, payload, reply=reply, headers=headers)


EXECUTED: dict[str, int] = {}


async def _count(tag: str) -> list[float]:
    EXECUTED[tag] = EXECUTED.get(tag, 0) + 1
    return await _work(5.0)


@workflow(queue=Queue("fault1", concurrency=1))
async def cc_fault(ctx: WorkflowContext, tag: str) -> list[float]:
    return await ctx.step.run("work", _count, tag)


@pytest.mark.parametrize("mode", ["refused", "answer_lost"])
async def test_jetstream_unavailable_during_admission_loses_no_run_and_no_slot(
    settings: Settings, mode: str
) -> None:
    # A slot left behind would block this queue of one for a minute: far longer than the runs
    # take, so a leak shows as runs that never finish.
    async with PolosEnvironment(
        settings.with_(slot_lease=60.0, request_timeout=0.5), [cc_fault]
    ) as env:
        await _faults_during_admission(env, mode)


async def _faults_during_admission(env: PolosEnvironment, mode: str) -> None:
    orch = env.orchestrator
    tasks = Unavailable(orch.nc, lambda s, p: ".task." in s, 6, mode)
    admits = Unavailable(orch.nc, lambda s, p: ".run." in s and b'"RunAdmitted"' in p, 6, mode)
    tags = [f"{mode}-{i}" for i in range(4)]
    handles = [await env.client.start(cc_fault, t) for t in tags]
    results = await asyncio.gather(*(h.result(timeout=30) for h in handles))
    assert tasks.hits and admits.hits, "the faults never hit admission"
    print(
        f"\n[{mode}] {len(tasks.hits)} task publishes and {len(admits.hits)} RunAdmitted "
        f"appends failed; all {len(results)} runs finished; admission {orch.admission.stats()}"
    )
    assert [EXECUTED[t] for t in tags] == [1] * len(tags)  # each run executed once
    assert max_overlap(results) == 1
    assert orch.dead_lettered == 0
    for h in handles:  # one admission per run that waited, never two
        history = await env.client.history(h.run_id)
        assert sum(isinstance(e, ev.RunAdmitted) for _, e in history) <= 1
    deadline = time.monotonic() + 10
    while await _held(env):
        assert time.monotonic() < deadline, f"slots left behind: {await _held(env)}"
        await asyncio.sleep(0.05)


# --------------------------------------------------------------------------- fairness, pinned:
# each test fails when its rule is taken out of the admission pass.

GATES: dict[str, asyncio.Event] = {}


async def _until_open(gate: str) -> list[float]:
    t0 = time.time()
    await GATES.setdefault(gate, asyncio.Event()).wait()
    return [t0, time.time()]


RR1 = Queue("rr1", concurrency=1)


@workflow(queue=RR1)
async def cc_rr_gate(ctx: WorkflowContext, gate: str) -> list[float]:
    return await ctx.step.run("hold", _until_open, gate)


@workflow(queue=RR1)
async def cc_rr(ctx: WorkflowContext, ms: float) -> list[float]:
    return await ctx.step.run("work", _work, ms)


async def _waiting(env: Any, queue: str) -> int:
    rows = await limits.queue_stats(env.client.nc, env.client.js, env.client.names)
    return sum(r["waiting"] for r in rows if r["queue"] == queue)


async def _until_waiting(env: Any, queue: str, n: int) -> None:
    deadline = time.monotonic() + 20
    while await _waiting(env, queue) < n:
        assert time.monotonic() < deadline, f"never {n} runs waiting in {queue}"
        await asyncio.sleep(0.02)


async def test_each_pass_starts_after_the_key_admitted_last(env_factory: Any) -> None:
    """A queue of one, keys ka (5 runs), kb and kc (2 each) all waiting: each pass admits one
    run and the next pass starts after its key, so the keys take turns. A pass that always
    started at the first key would run all of ka's before kb's first."""
    env = await env_factory([cc_rr_gate, cc_rr])
    gate = f"rr-{time.time()}"
    blocker = await env.client.start(cc_rr_gate, gate)
    while not await _held(env):
        await asyncio.sleep(0.01)
    keyed = [
        (k, await env.client.start(cc_rr, 1.0, concurrency_key=k))
        for k, n in (("ka", 5), ("kb", 2), ("kc", 2))
        for _ in range(n)
    ]
    await _until_waiting(env, "rr1", len(keyed))
    GATES[gate].set()
    await blocker.result(timeout=20)
    results = await asyncio.gather(*(h.result(timeout=30) for _, h in keyed))
    ran = sorted((r[0], k) for (k, _), r in zip(keyed, results, strict=True))
    order = [k for _, k in ran]
    print(f"\nadmission order with a queue of one: {' '.join(order)}")
    assert order == ["ka", "kb", "kc", "ka", "kb", "kc", "ka", "ka", "ka"]


PK1 = Queue("pk1", per_key=1)


@workflow(queue=PK1)
async def cc_pk_gate(ctx: WorkflowContext, gate: str) -> list[float]:
    return await ctx.step.run("hold", _until_open, gate)


async def test_a_key_at_its_limit_does_not_stop_the_pass(env_factory: Any) -> None:
    """One run per key: ka and kb each hold their slot, and one more run of each waits. When
    kb's slot frees, the pass meets ka first (the first key, still at its limit) and must go on
    to kb: kb's run finishes while ka's slot is still held."""
    env = await env_factory([cc_pk_gate])
    tag = f"pk-{time.time()}"
    holders = {
        k: await env.client.start(cc_pk_gate, f"{tag}-{k}", concurrency_key=k) for k in ("ka", "kb")
    }
    deadline = time.monotonic() + 20
    while len(await _held(env)) < 2:
        assert time.monotonic() < deadline, "the holders never ran"
        await asyncio.sleep(0.01)
    waiting = {
        k: await env.client.start(cc_pk_gate, f"{tag}-{k}-2", concurrency_key=k)
        for k in ("ka", "kb")
    }
    await _until_waiting(env, "pk1", 2)
    GATES.setdefault(f"{tag}-kb-2", asyncio.Event()).set()
    GATES.setdefault(f"{tag}-kb", asyncio.Event()).set()  # kb's slot frees
    await holders["kb"].result(timeout=20)
    await waiting["kb"].result(timeout=20)
    info = await env.client.get(waiting["ka"].run_id)
    assert info.status == "suspended"  # ka still at its limit: its run still waits
    GATES.setdefault(f"{tag}-ka", asyncio.Event()).set()
    GATES.setdefault(f"{tag}-ka-2", asyncio.Event()).set()
    await asyncio.gather(holders["ka"].result(timeout=20), waiting["ka"].result(timeout=20))


async def test_a_limit_read_after_it_expires_is_one_read_for_every_lookup_waiting(
    env_factory: Any, settings: Settings
) -> None:
    """The orchestrator's view of a queue's limit, as the service role reads it: when the
    cached limit expires under load, the lookups at that moment share one read (not one read
    each), a changed limit is seen once the cache expires, and a forgotten one is read again."""
    env = await env_factory([], with_worker=False)
    await configure_queue(env.client, Queue("cc_once", concurrency=2))
    nc = await nats.connect(as_role(settings, "service").nats_url)
    try:
        cfg = limits.LimitsConfig(nc.jetstream(), env.client.names, ttl=0.2)
        first = await asyncio.gather(*(cfg.queue("cc_once") for _ in range(200)))
        assert {q.concurrency for q in first if q is not None} == {2} and None not in first
        assert cfg.reads == 1
        await configure_queue(env.client, Queue("cc_once", concurrency=4))
        assert (await cfg.queue("cc_once")) == first[0]  # still within the cache's ttl
        await asyncio.sleep(0.25)
        again = await asyncio.gather(*(cfg.queue("cc_once") for _ in range(200)))
        assert {q.concurrency for q in again if q is not None} == {4} and None not in again
        assert cfg.reads == 2
        cfg.forget(queue="cc_once")
        await cfg.queue("cc_once")
        assert cfg.reads == 3
        # A read that fails is the error of the lookups that asked, none is left waiting, and
        # nothing is cached from it.
        await nc.close()
        cfg.forget(queue="cc_once")
        results = await asyncio.gather(
            *(cfg.queue("cc_once") for _ in range(20)), return_exceptions=True
        )
        assert all(isinstance(r, Exception) for r in results)
        assert not len(cfg._reads) and not any(k.endswith("/queue.cc_once") for k in cfg._cache)
    finally:
        if not nc.is_closed:
            await nc.close()
