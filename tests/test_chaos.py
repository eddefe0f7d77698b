"""Chaos: a mixed load (steps, retries, suspends with resumes, events, durable sleeps, child runs)
while a driver SIGKILLs and restarts workers, orchestrators and schedulers at random and restarts
nats-server. At the end every run has finished with the right output, every step ran at most
twice (twice only if it was in flight at a kill) and at least once, nothing waits forever.

    pytest tests/test_chaos.py                 # the short version (CI)
    pytest -m chaos tests/test_chaos.py -s     # the long versions: 500 runs and a minute of
                                               # chaos; 300 runs under orchestrator kills
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import random
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from polos import PolosClient
from polos import history as ev
from polos._private.ops.runtime import terminate_all
from polos._private.store import load_state
from polos.testing import SecuredServer, create_topology
from tests.helpers import ROOT, marks, spawn
from tests.workflows.chaos import ChaosJob, expected

WORKER = ["-m", "polos_services.worker", "tests.workflows.chaos"]
SERVICES = {
    "orchestrator": ["-m", "polos_services.orchestrator"],
    "scheduler": ["-m", "polos_services.scheduler"],
}


@dataclass
class Tally:
    kills: collections.Counter[str] = field(default_factory=collections.Counter)
    resumes: int = 0
    resumes_refused: int = 0
    events: int = 0
    starts_retried: int = 0


class Cluster:
    """The processes under test: a nats-server (auth on), workers, an orchestrator and a
    scheduler, each process as its role. ``start()`` creates the topology first, as `polos up`
    does, and spawns them."""

    def __init__(self, tmp: Path, workers: int) -> None:
        self.tmp = tmp
        self.server = SecuredServer(tmp / "nats", port=0, pool=1)
        self.server.start()
        self.settings = self.server.namespace()
        self.log = tmp / "marks.log"
        self.env = dict(os.environ)
        self.env.update(self.settings.to_env())
        self.env.update(
            POLOS_TEST_LOG=str(self.log),
            PYTHONPATH=os.pathsep.join([str(ROOT), self.env.get("PYTHONPATH", "")]),
            PYTHONUNBUFFERED="1",
        )
        self.commands = {**SERVICES, **{f"worker{i}": WORKER for i in range(workers)}}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.killed_pids: set[int] = set()
        self.server_restarts: list[float] = []

    async def start(self) -> None:
        await create_topology(self.settings)
        for name in self.commands:
            self.spawn(name)

    def spawn(self, name: str) -> None:
        role = "worker" if name.startswith("worker") else "service"
        env = {**self.env, "POLOS_NATS_URL": self.settings.as_role(role).nats_url}
        self.procs[name] = spawn(self.commands[name], env, self.tmp / f"{name}.out")

    def sigkill(self, name: str) -> None:
        proc = self.procs[name]
        proc.kill()  # SIGKILL: no cleanup
        proc.wait()
        self.killed_pids.add(proc.pid)
        self.spawn(name)

    def restart_server(self) -> None:
        self.server_restarts.append(time.time())
        self.server.kill()
        self.server.start()

    def alive(self) -> list[str]:
        return [n for n, p in self.procs.items() if p.poll() is None]

    def stop(self) -> None:
        terminate_all(self.procs.values())
        self.server.stop()


def _job(i: int) -> ChaosJob:
    return ChaosJob(
        steps=3,
        step_seconds=0.1,  # long enough that kills land inside steps
        flaky=i % 4 == 0,
        suspend=i % 3 == 0,
        event=i % 5 == 0,
        sleep=0.3 if i % 7 == 0 else 0.0,
        child=i % 6 == 0,
    )


async def _retry(what: Any, tally: Tally) -> Any:
    """Client calls during a server restart fail; the caller retries (starts are idempotent)."""
    for attempt in range(200):
        try:
            return await what()
        except Exception:
            if attempt == 199:
                raise
            tally.starts_retried += 1
            await asyncio.sleep(0.1)


async def _wake(client: PolosClient, tally: Tally, stop: asyncio.Event) -> None:
    """Resume suspended runs and publish the events waiting runs wait for, as they appear."""
    resumed: set[str] = set()
    while not stop.is_set():
        with contextlib.suppress(Exception):
            for run in await client.list_runs(status="suspended", limit=100_000):
                waiting = run.waiting or {}
                if waiting.get("kind") == "suspend":
                    try:
                        await client.resume(run.run_id, "approval", {"add": 1})
                        tally.resumes += 1
                    except Exception:
                        # Already resumed (a stale index) or refused: must change nothing.
                        if run.run_id in resumed:
                            tally.resumes_refused += 1
                    resumed.add(run.run_id)
                elif waiting.get("kind") == "event" and waiting.get("topic"):
                    await client.publish_event(waiting["topic"], {"add": 1})
                    tally.events += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.2)


def _orchestrator_job(i: int) -> ChaosJob:
    # Short runs, half of them parents: an orchestrator dies with children's events in hand.
    return ChaosJob(
        steps=1,
        step_seconds=0.02,
        suspend=i % 3 == 0,
        event=i % 5 == 0,
        sleep=0.2 if i % 7 == 0 else 0.0,
        child=i % 2 == 0,
    )


async def _chaos(
    cluster: Cluster,
    tally: Tally,
    seconds: float,
    rng: random.Random,
    victims: list[str] | None = None,
    pause: tuple[float, float] = (0.3, 0.9),
) -> None:
    end = time.monotonic() + seconds
    workers = [n for n in cluster.commands if n.startswith("worker")]
    # Workers are where steps are in flight: kill them most.
    victims = victims or [*workers, *workers, *SERVICES, "nats"]
    while time.monotonic() < end:
        await asyncio.sleep(rng.uniform(*pause))
        victim = rng.choice(victims)
        if victim == "nats":
            await asyncio.to_thread(cluster.restart_server)
        else:
            await asyncio.to_thread(cluster.sigkill, victim)
        tally.kills["nats-server" if victim == "nats" else victim.rstrip("0123456789")] += 1


async def _explain(client: PolosClient, cluster: Cluster, run_ids: list[str]) -> None:
    """Print what a stuck run's history and the task consumers say (for the failure report)."""
    todo = [(run_id, "STUCK") for run_id in run_ids]
    while todo:
        run_id, label = todo.pop(0)
        history = await client.history(run_id)
        print(f"\n{label} {run_id}:")
        for seq, e in history:
            print(
                f"  {seq} {type(e).__name__} {getattr(e, 'key', '')} "
                f"{getattr(e, 'worker_id', '')} {getattr(e, 'kind', '')}"
            )
        # A run waiting for children: theirs too (the one that did not end is the story).
        last = history[-1][1] if history else None
        if isinstance(last, ev.RunSuspended) and last.kind == "child" and label == "STUCK":
            todo[:0] = [(child, f"  CHILD of {run_id}") for child in last.children or []]
    for durable in ("wf_chaos_mix", "wf_chaos_child"):
        with contextlib.suppress(Exception):
            info = await client.js.consumer_info(client.names.tasks_stream, durable)
            print(
                f"consumer {durable}: pending {info.num_pending} ack_pending "
                f"{info.num_ack_pending} redelivered {info.num_redelivered} "
                f"waiting {info.num_waiting}"
            )
    print(
        "workers alive:",
        cluster.alive(),
        "registered:",
        [w.get("id") for w in await client.workers()],
    )


async def run_chaos(
    tmp: Path,
    *,
    runs: int,
    seconds: float,
    workers: int,
    seed: int,
    make_job: Callable[[int], ChaosJob] = _job,
    victims: list[str] | None = None,
    pause: tuple[float, float] = (0.3, 0.9),
) -> None:
    rng = random.Random(seed)
    cluster = Cluster(tmp, workers)
    await cluster.start()
    tally = Tally()
    client = await PolosClient.connect(settings=cluster.settings)
    stop = asyncio.Event()
    waker = asyncio.create_task(_wake(client, tally, stop))
    t0 = time.perf_counter()
    try:
        jobs = {f"chaos{i:04d}x{seed}": make_job(i) for i in range(runs)}
        items = list(jobs.items())
        first, rest = items[: runs // 2], items[runs // 2 :]
        for run_id, job in first:
            await _retry(lambda r=run_id, j=job: client.start("chaos_mix", j, run_id=r), tally)
        chaos = asyncio.create_task(_chaos(cluster, tally, seconds, rng, victims, pause))
        for run_id, job in rest:  # the second half starts while things die
            await _retry(lambda r=run_id, j=job: client.start("chaos_mix", j, run_id=r), tally)
            await asyncio.sleep(seconds / max(len(rest), 1) / 2)
        await chaos
        t_calm = time.perf_counter()
        assert sorted(cluster.alive()) == sorted(cluster.commands)

        # Everything must finish now that the chaos has stopped.
        pending = set(jobs)
        deadline = time.monotonic() + max(60.0, seconds * 2)
        outputs: dict[str, Any] = {}
        done_at: dict[str, float] = {}
        while pending and time.monotonic() < deadline:
            for run_id in list(pending):
                with contextlib.suppress(Exception):
                    state = await load_state(client.nc, client.names, run_id)
                    if state.done:
                        outputs[run_id] = (state.status, state.output, state.error)
                        pending.discard(run_id)
                        done_at[run_id] = time.perf_counter() - t_calm
            await asyncio.sleep(0.2)
        finished = time.perf_counter() - t_calm
        if pending:
            await _explain(client, cluster, sorted(pending)[:5])
        stuck = {r: (await client.get(r)).status for r in list(pending)[:10]}
        assert not pending, f"{len(pending)} runs never finished, e.g. {stuck}"
        wrong = {r: o for r, o in outputs.items() if o[:2] != ("completed", expected(jobs[r]))}
        assert not wrong, f"{len(wrong)} runs ended wrong, e.g. {list(wrong.items())[:3]}"

        # Nothing else waits forever: every run of the namespace (children too) is terminal in
        # its history, and the run index (a projection) converges to say so.
        all_runs = await client.list_runs(limit=100_000)
        for r in all_runs:
            truth = await client.get(r.run_id)
            assert truth.status == "completed", (r.run_id, truth.status, truth.error)
        t_index = time.perf_counter()
        while True:
            live = await client.list_runs(status=["queued", "running", "suspended"], limit=100_000)
            if not live or time.perf_counter() - t_index > 60:
                break
            await asyncio.sleep(0.2)
        assert not live, f"index still shows {[(r.run_id, r.status) for r in live[:5]]}"
        index_lag = time.perf_counter() - t_index

        # Step executions, from the marks the step functions left on disk.
        lines = marks(cluster.log)
        starts = collections.Counter(ln.split()[1] for ln in lines if ln.startswith("start"))
        dones = collections.Counter(ln.split()[1] for ln in lines if ln.startswith("done"))
        keys = set(starts)
        parents = [k for k in keys if not k.endswith("/c")]
        expected_keys = {f"{r}/s{i}" for r, j in jobs.items() for i in range(j.steps)} | {
            f"{r}/flaky" for r, j in jobs.items() if j.flaky
        }
        assert expected_keys <= set(parents)
        assert all(dones[k] >= 1 for k in keys), [k for k in keys if not dones[k]]
        # A step runs again only if the attempt before was interrupted: its process was
        # SIGKILLed or nats-server restarted after it began. (The flaky step fails on purpose.)
        attempts: dict[str, list[tuple[float, int]]] = collections.defaultdict(list)
        for ln in lines:
            what, key, pid, at = ln.split()
            # The flaky step's first attempt fails on purpose: count its successes instead.
            if what == ("done" if key.endswith("/flaky") else "start"):
                attempts[key].append((float(at), int(pid)))
        unexplained = []
        for key, tries in attempts.items():
            tries.sort()
            for at, pid in tries[:-1]:
                if pid not in cluster.killed_pids and not any(
                    t > at for t in cluster.server_restarts
                ):
                    unexplained.append((key, tries))
        assert not unexplained, f"steps re-run without a kill: {unexplained[:3]}"
        reruns = collections.Counter(len(t) for t in attempts.values())
        twice = sorted(k for k in keys if dones[k] == 2)
        dead = await client.dead_letters(limit=100_000)
        letters = collections.Counter(
            f"{d['source']}: {re.sub(r'run [0-9a-zx]+: ', '', d['reason'])[:60]}" for d in dead
        )
        slowest = sorted(done_at.items(), key=lambda kv: -kv[1])[:3]
        print("\nslowest after the chaos:", [(r, round(t, 1), jobs[r]) for r, t in slowest])
        total = time.perf_counter() - t0
        print(
            f"\nchaos: {runs} runs ({sum(j.suspend for j in jobs.values())} suspends, "
            f"{sum(j.event for j in jobs.values())} event waits, "
            f"{sum(bool(j.sleep) for j in jobs.values())} sleeps, "
            f"{sum(j.child for j in jobs.values())} children, "
            f"{sum(j.flaky for j in jobs.values())} retried steps) in {total:.1f}s; "
            f"{seconds:.0f}s of chaos: kills {dict(tally.kills)}; "
            f"resumes sent {tally.resumes} (duplicates refused {tally.resumes_refused}), "
            f"events published {tally.events}, client retries during restarts "
            f"{tally.starts_retried}; all finished {finished:.1f}s after the chaos; "
            f"step executions {sum(dones.values())} for {len(keys)} steps, "
            f"{len(twice)} finished twice; started n times: {dict(sorted(reruns.items()))} "
            "(every re-run follows a kill of the process running it or a server restart); "
            f"dead letters {dict(letters)}; run index converged {index_lag:.1f}s after; "
            "lost 0, stuck 0"
        )
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await waker
        await client.close()
        cluster.stop()


@pytest.mark.slow
async def test_chaos_short(tmp_path: Path) -> None:
    await run_chaos(tmp_path, runs=40, seconds=6.0, workers=2, seed=7)


@pytest.mark.chaos
async def test_chaos_long(tmp_path: Path) -> None:
    seed = int(os.environ.get("POLOS_CHAOS_SEED", "1"))
    runs = int(os.environ.get("POLOS_CHAOS_RUNS", "500"))
    seconds = float(os.environ.get("POLOS_CHAOS_SECONDS", "60"))
    await run_chaos(tmp_path, runs=runs, seconds=seconds, workers=3, seed=seed)


@pytest.mark.chaos
async def test_chaos_orchestrator_kills(tmp_path: Path) -> None:
    # The orchestrator SIGKILLed every 0.2-0.6 s, 150 parents waiting for children: a run's
    # events reach the next orchestrator in any order (what the dead one held comes back after
    # the ack wait). Before the fix of a child ending ahead of its held request, seed 3 left
    # two parents waiting forever.
    seed = int(os.environ.get("POLOS_CHAOS_SEED", "3"))
    await run_chaos(
        tmp_path,
        runs=300,
        seconds=40.0,
        workers=2,
        seed=seed,
        make_job=_orchestrator_job,
        victims=["orchestrator", "orchestrator", "orchestrator", "worker0", "scheduler"],
        pause=(0.2, 0.6),
    )
