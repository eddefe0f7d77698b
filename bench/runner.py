"""The benchmark: every figure of BENCHMARKS.md, measured against one embedded nats-server.

Each figure is printed next to the awaited JetStream publish p50 measured in the same run, as a
ratio: a durable step cannot be cheaper than one awaited publish, so the ratio says how much
Polos adds on top of the physical limit of this machine, whatever the machine.

Services run where each figure needs them: in this process when the figure is about the worker's
own work (step overhead, replay), as separate processes when it is about a deployment
(end-to-end latency, throughput with one or two worker processes, failover after SIGKILL).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from nats.js.api import DeliverPolicy, StorageType, StreamConfig

from polos import history as ev
from polos._private.ops.cluster import LocalCluster
from polos._private.ops.runtime import terminate_all
from polos._private.ops.server import EmbeddedServer, default_config, sync_config, with_sync
from polos._private.store import (
    MSG_ID,
    Names,
    connect,
    disconnect,
    ensure_topology,
    kv_entry,
    last_for_subject,
    publish,
    read_history,
    read_run,
    read_subject,
)
from polos.client import PolosClient
from polos.config import Settings

# --------------------------------------------------------------------------- sizes


@dataclass(frozen=True)
class Sizes:
    """How much work each figure does. ``quick()`` is the CI smoke size: it checks the
    benchmark runs end to end, not how fast anything is."""

    publishes: int = 2000
    overhead_steps: int = 500
    overhead_runs: int = 3
    e2e_runs: int = 50
    first_step_runs: int = 50
    ops_runs: int = 20
    # Two sizes: 200 is what the peers were measured with (BENCHMARKS.md); a 200-run round lasts
    # half a second here, so its ramp-up and tail weigh on it. 1,000 shows the steady state.
    throughput_runs: tuple[int, ...] = (200, 1000)
    throughput_steps: int = 10
    worker_counts: tuple[int, ...] = (1, 2)
    throughput_rounds: int = 3
    # Far longer than it takes a standby worker to start: the kill always lands mid-run.
    failover_steps: int = 200
    failover_step_seconds: float = 0.3
    failover_settings: tuple[str, ...] = ("default", "tuned")
    replay_steps: int = 1000
    replay_repeats: int = 5
    export_runs: int = 2000
    read_sizes: tuple[int, ...] = (1, 100, 1000)
    read_repeats: int = 30
    suspended_runs: int = 10_000
    # How many of them go through the services (None: all); the rest are copies (see _prefill).
    started_runs: int | None = None
    long_steps: int = 10_000
    long_repeats: int = 5

    @classmethod
    def quick(cls) -> Sizes:
        return cls(
            publishes=200,
            overhead_steps=50,
            overhead_runs=1,
            e2e_runs=5,
            first_step_runs=5,
            ops_runs=3,
            throughput_runs=(20,),
            worker_counts=(1,),
            throughput_rounds=1,
            failover_step_seconds=0.2,
            failover_settings=("tuned",),
            replay_steps=100,
            replay_repeats=2,
            export_runs=50,
            read_sizes=(1, 100),
            read_repeats=5,
            suspended_runs=50,
            long_steps=100,
            long_repeats=1,
        )


# Failover timings: the defaults of Settings, and a tuned setting that trades more heartbeat
# traffic for a faster takeover.
FAILOVER_SETTINGS: dict[str, dict[str, float]] = {
    "default": {},
    "tuned": {"task_ack_wait": 1.0, "heartbeat_interval": 0.25},
}

# The sequential run, cut at its events (see fig_e2e); each with what happens in it.
_E2E_PARTS: dict[str, str] = {
    "client start -> orchestrator builds RunRequested": "client publish, command delivery",
    "RunRequested -> worker builds RunClaimed": "append, task publish, delivery (no read: new run)",
    "RunClaimed -> first step recorded": "claim append, input decode, step 1 runs",
    "per further step": "the previous step's fenced append, the next step runs",
    "last step -> RunCompleted built": "the last step's append, workflow returns",
    "RunCompleted -> client has the result": "append, the stored event reaches the client",
}

# The sequential path of a 10-step run, message by message: what it cannot do with less. Its
# floor is that many awaited publishes back to back plus that many one-way messages between
# two connections, measured beside each run (fig_e2e). The client's first read of the run's
# control events (in case it ended before result() subscribed) runs while the run does.
_E2E_PATH: tuple[tuple[str, str], ...] = (
    ("round trip", "client: the start command's publish"),
    ("one way", "the command delivered to the orchestrator"),
    ("round trip", "orchestrator: the RunRequested append"),
    ("round trip", "orchestrator: the task's publish"),
    ("one way", "the task delivered to the worker"),
    ("round trip", "worker: the RunClaimed append"),
    *(("round trip", f"worker: step {i + 1}'s append") for i in range(10)),
    ("round trip", "worker: the RunCompleted append"),
    ("one way", "the stored RunCompleted delivered to the client"),
)
_E2E_ROUND_TRIPS = sum(1 for kind, _ in _E2E_PATH if kind == "round trip")
_E2E_ONE_WAY = len(_E2E_PATH) - _E2E_ROUND_TRIPS

FIGURES = (
    "publish",
    "overhead",
    "reads",
    "e2e",
    "first_step",
    "throughput",
    "failover",
    "replay",
    "long",
    "suspend",
    "export",
)


# --------------------------------------------------------------------------- results


@dataclass
class Figure:
    name: str
    value: float | None
    unit: str
    # "latency": ratio = value / publish p50; "rate": ratio = value / (1 / publish p50)
    kind: str = "latency"
    note: str = ""


@dataclass
class Report:
    started: float = field(default_factory=time.time)
    # The server's durability: what every figure of the run, the floor included, paid for.
    mode: str = ""
    publish_p50_ms: float | None = None
    figures: list[Figure] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def add(self, fig: Figure, echo: bool = True) -> None:
        self.figures.append(fig)
        if echo:
            print(self.line(fig), flush=True)

    def ratio(self, fig: Figure) -> str:
        """The figure in units of the awaited publish measured in the same run."""
        p = self.publish_p50_ms
        if fig.value is None or not p:
            return ""
        if fig.kind == "latency" and fig.unit == "ms":
            return f"{fig.value / p:,.1f}x publish p50"
        if fig.kind == "rate" and fig.value > 0:
            per_publish = fig.value / (1000.0 / p)
            if fig.unit == "wf/s":
                # Wall time per workflow, counted in awaited publishes: with many in flight,
                # below 10 means the ten step appends overlap.
                return f"{1000.0 / fig.value / p:,.1f}x publish p50 per wf"
            return f"{per_publish:,.2f}x awaited pub/s"
        return ""

    def line(self, fig: Figure) -> str:
        value = "-" if fig.value is None else f"{fig.value:,.2f}"
        return f"{fig.name:<60} {value:>12} {fig.unit:<6} {self.ratio(fig):<22} {fig.note}"

    def table(self) -> str:
        head = f"{'figure':<60} {'value':>12} {'unit':<6} {'ratio':<22} note"
        return "\n".join([head, "-" * len(head), *(self.line(f) for f in self.figures)])

    def as_dict(self) -> dict[str, Any]:
        return {
            "started": self.started,
            "mode": self.mode,
            "load_average_at_end": _loadavg(),
            "publish_p50_ms": self.publish_p50_ms,
            "figures": [f.__dict__ for f in self.figures],
            "pending": self.pending,
            "failed": self.failed,
        }


def _loadavg() -> str:
    """The 1, 5 and 15 minute load averages: what else ran on the cores during the figures."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), nearest rank: no interpolation between samples."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(q / 100 * (len(s) - 1))))
    return s[k]


# --------------------------------------------------------------------------- processes


class Processes:
    """Service subprocesses of one figure; all are stopped when the figure ends."""

    def __init__(self, settings: Settings, log_dir: Path) -> None:
        self.settings = settings
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def env(self) -> dict[str, str]:
        s = self.settings
        env = dict(os.environ)
        env.update(s.to_env())
        env.update(PYTHONUNBUFFERED="1")
        return env

    def spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        out = open(self.log_dir / f"{self.settings.prefix}-{name}.log", "ab")
        proc = subprocess.Popen(
            [sys.executable, *args],
            env=self.env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=str(self.log_dir),
        )
        out.close()
        self.procs[name] = proc
        return proc

    def orchestrator(self) -> None:
        self.spawn("orchestrator", "-m", "polos_services.orchestrator")

    def worker(self, name: str, max_runs: int = 200) -> None:
        self.spawn(
            name,
            "-m",
            "polos_services.worker",
            "polos_bench.workflows",
            "--worker-id",
            name,
            "--max-concurrent-runs",
            str(max_runs),
        )

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def stop(self, name: str) -> None:
        terminate_all([self.procs.pop(name)])

    def stop_all(self) -> None:
        terminate_all(self.procs.values())
        self.procs.clear()


async def _pool(
    items: list[str],
    fn: Callable[[str], Awaitable[None]],
    what: str,
    progress: Callable[[], int],
    width: int = 128,
) -> None:
    """Call ``fn`` on every item with ``width`` calls in flight: a fixed set of tasks, not one per
    item (a million pending tasks would cost the benchmark's process more than the services).
    A line every 30 s on stderr says how far it is (a million runs take minutes)."""
    it = iter(items)
    t0 = time.perf_counter()

    async def lane() -> None:
        for item in it:
            await fn(item)

    async def report() -> None:
        while True:
            await asyncio.sleep(30)
            took = time.perf_counter() - t0
            print(
                f"  ... {progress():,} of {len(items):,} {what} after {took:.0f} s; load {_loadavg()}",
                file=sys.stderr,
                flush=True,
            )

    reporter = asyncio.create_task(report()) if len(items) >= 50_000 else None
    try:
        await asyncio.gather(*(lane() for _ in range(width)))
    finally:
        if reporter is not None:
            reporter.cancel()


async def until(cond: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await cond():
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"benchmark: timed out after {timeout}s waiting for {what}")


async def wait_workers(client: PolosClient, names: set[str], timeout: float = 30.0) -> None:
    async def ready() -> bool:
        return names <= {w["id"] for w in await client.workers()}

    await until(ready, timeout, f"workers {sorted(names)}")


class _Floor:
    """The floor of the sequential run: ``_E2E_ROUND_TRIPS`` awaited JetStream publishes (as
    the raw publish figure makes them) and ``_E2E_ONE_WAY`` core messages from one connection
    to another, back to back."""

    def __init__(self, a: Any, b: Any, stream: str, subject: str) -> None:
        self.a, self.b, self.stream, self.subject = a, b, stream, subject
        self.js = a.jetstream()
        self.n = 0
        self.payload = orjson.dumps({"t": "StepCompleted", "key": "s1", "kind": "run", "output": 1})

    @classmethod
    async def open(cls, s: Settings) -> _Floor:
        a = await connect(s, "polos-bench-floor-a")
        b = await connect(s, "polos-bench-floor-b")
        stream, subject = f"{s.prefix.upper()}_BENCHFLOOR", f"{s.prefix}.benchfloor"
        await a.jetstream().add_stream(
            StreamConfig(
                name=stream, subjects=[subject], storage=StorageType.FILE, num_replicas=s.replicas
            )
        )
        return cls(a, b, stream, subject)

    async def once(self) -> float:
        loop = asyncio.get_running_loop()
        got: asyncio.Future[None] = loop.create_future()

        async def heard(msg: Any) -> None:
            if not got.done():
                got.set_result(None)

        sub = await self.b.subscribe(f"{self.subject}.hop", cb=heard)
        await self.b.flush()
        t0 = time.perf_counter()
        for _ in range(_E2E_ROUND_TRIPS):
            self.n += 1
            await self.js.publish(self.subject, self.payload, headers={MSG_ID: f"f{self.n}"})
        for _ in range(_E2E_ONE_WAY):
            await self.a.publish(f"{self.subject}.hop", self.payload)
            await got
            got = loop.create_future()
        took = (time.perf_counter() - t0) * 1000
        await sub.unsubscribe()
        return took

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.js.delete_stream(self.stream)
        for nc in (self.a, self.b):
            await disconnect(nc)


async def _count_ops(client: PolosClient, s: Settings, runs: int) -> tuple[float, str]:
    """JetStream operations per 10-step run, counted by a ``>`` subscriber over ``runs``
    sequential runs: writes (publishes to a stream subject), deliveries (messages a consumer
    hands out: they carry a ``$JS.ACK`` reply), acks, reads (direct gets) and other API
    requests (pulls). What the server republishes for listeners is counted apart."""
    from collections import Counter

    from . import workflows as w

    p = s.prefix
    kv = f"$KV.{p}_"
    counts: Counter[str] = Counter()

    def stored_as(subject: str) -> str | None:
        t = subject.split(".")
        if subject.startswith(kv):
            return "index" if t[1] == f"{p}_runs" else f"kv {t[1][len(p) + 1 :]}"
        if t[0] != p or len(t) < 2:
            return None
        if t[1] == "run":
            return t[-1]  # ctl | step
        return {"cmd": "command", "task": "task", "stored": None}.get(t[1], t[1])

    async def on_msg(msg: Any) -> None:
        subject, reply = msg.subject, msg.reply or ""
        if subject.startswith("$JS.ACK."):
            body = bytes(msg.data or b"")
            counts[
                "progress" if body == b"+WPI" else "nak" if body.startswith(b"-NAK") else "ack"
            ] += 1
        elif subject.startswith("$JS.API.DIRECT.GET."):
            counts["read"] += 1
        elif subject.startswith("$JS.API."):
            counts["api " + subject.split(".")[3].lower()] += 1
        elif reply.startswith("$JS.ACK."):
            counts["delivered " + (stored_as(subject) or "?")] += 1
        elif subject.startswith(f"{p}.stored."):
            counts["republished"] += 1
        else:
            kind = stored_as(subject)
            if kind is not None:
                counts["write " + kind] += 1

    spy = await connect(s, "polos-bench-ops")
    try:
        await spy.subscribe(">", cb=on_msg)
        await spy.flush()
        for _ in range(runs):
            await (await client.start(w.bench_steps, w.Steps(steps=10))).result(timeout=30)
        await asyncio.sleep(0.5)  # the last acks (not awaited by their senders)
        await spy.flush()
    finally:
        await disconnect(spy)
    ops = {k: v for k, v in counts.items() if k != "republished"}
    total = sum(ops.values()) / runs

    def group(prefix: str, label: str) -> str:
        items = sorted((k[len(prefix) :], v) for k, v in ops.items() if k.startswith(prefix))
        n = sum(v for _, v in items) / runs
        return f"{n:g} {label} (" + ", ".join(f"{k} {v / runs:g}" for k, v in items) + ")"

    rest = {k: v for k, v in ops.items() if not k.startswith(("write ", "delivered "))}
    detail = "; ".join(
        [
            group("write ", "writes"),
            group("delivered ", "deliveries"),
            ", ".join(f"{k} {v / runs:g}" for k, v in sorted(rest.items())),
            f"republished {counts['republished'] / runs:g} (not an operation)",
        ]
    )
    return total, f"over {runs} runs: {detail}"


# --------------------------------------------------------------------------- the benchmark


class Bench:
    def __init__(
        self,
        sizes: Sizes,
        *,
        nats_url: str | None = None,
        keep: bool = False,
        sync: str | None = None,
        cluster: bool = False,
    ) -> None:
        self.sizes = sizes
        self.nats_url = nats_url
        self.keep = keep
        self.sync = sync
        self.cluster = cluster
        self.report = Report()
        self.tmp = Path(tempfile.mkdtemp(prefix="polos-bench-"))
        self.server: EmbeddedServer | None = None
        self.nodes: LocalCluster | None = None

    def settings(self, **overrides: Any) -> Settings:
        base = Settings(
            nats_url=self.nats_url or "",
            prefix=f"b{uuid.uuid4().hex[:10]}",
            replicas=3 if self.cluster else 1,
        )
        return base.with_(**overrides) if overrides else base

    async def _start_servers(self) -> None:
        """One nats-server (the shipped nats.conf), or the 3-node loopback cluster with every
        stream R3; ``--sync`` rewrites their sync_interval as `polos up --sync` does."""
        if self.cluster:
            self.nodes = LocalCluster(self.tmp / "cluster")
            for n in self.nodes.nodes:
                if self.sync:
                    n.server.config.write_text(with_sync(n.server.config.read_text(), self.sync))
            self.nats_url = self.nodes.start()
            await self.nodes.wait_ready()
            sync = self.sync or "the server's default (2 min)"
            self.report.mode = f"3-node cluster, R3 (ack after a quorum stored it), sync {sync}"
            return
        config = sync_config(self.tmp / "nats", default_config(), self.sync) if self.sync else None
        self.server = EmbeddedServer(self.tmp / "nats", port=0, config=config)
        self.nats_url = self.server.start()
        self.report.mode = (
            "single node, sync_interval always (fsync before every ack)"
            if self.sync == "always"
            else "single node, sync_interval 10s"
        )

    async def run(self, only: set[str] | None = None) -> Report:
        if self.nats_url is None:
            await self._start_servers()
        else:
            self.report.mode = "external server"
        print(f"nats-server {self.nats_url}; logs in {self.tmp}", flush=True)
        print(f"durability: {self.report.mode}; load average {_loadavg()}", flush=True)
        try:
            # Every ratio needs the publish p50, so it is always measured.
            await self.fig_publish()
            steps: list[tuple[str, Callable[[], Awaitable[None]]]] = [
                ("overhead", self.fig_overhead),
                ("reads", self.fig_reads),
                ("replay", self.fig_replay),
                ("long", self.fig_long),
                ("e2e", self.fig_e2e),
                ("throughput", self.fig_throughput),
                ("failover", self.fig_failover),
                ("suspend", self.fig_suspend),
                ("export", self.fig_export),
            ]
            for name, fn in steps:
                if only and name not in only and not (name == "e2e" and "first_step" in only):
                    continue
                try:
                    await fn()
                except Exception as exc:
                    # One broken figure must not hide the others; the exit status says it.
                    self.report.failed.append(f"{name}: {type(exc).__name__}: {exc}")
                    print(f"FAILED figure {name}: {type(exc).__name__}: {exc}", flush=True)
        finally:
            if self.server is not None:
                self.server.stop()
            if self.nodes is not None:
                self.nodes.stop()
            if not self.keep:
                shutil.rmtree(self.tmp, ignore_errors=True)
        return self.report

    # ------------------------------------------------------------------ raw publish

    async def fig_publish(self) -> None:
        """Awaited publish to a file-backed stream: the floor under every durable step."""
        s = self.settings()
        nc = await connect(s, "polos-bench")
        js = nc.jetstream()
        stream = f"{s.prefix.upper()}_BENCHRAW"
        subject = f"{s.prefix}.benchraw"
        await js.add_stream(
            StreamConfig(
                name=stream, subjects=[subject], storage=StorageType.FILE, num_replicas=s.replicas
            )
        )
        payload = orjson.dumps({"t": "StepCompleted", "key": "s1", "kind": "run", "output": 1})
        try:
            for _ in range(50):  # warm-up
                await js.publish(subject, payload)
            times = []
            for i in range(self.sizes.publishes):
                t0 = time.perf_counter()
                await js.publish(subject, payload, headers={MSG_ID: f"m{i}"})
                times.append((time.perf_counter() - t0) * 1000)
            p50 = statistics.median(times)
            self.report.publish_p50_ms = p50
            self.report.add(Figure("raw awaited JetStream publish p50", p50, "ms", note="baseline"))
            self.report.add(Figure("raw awaited JetStream publish p99", pct(times, 99), "ms"))
            # Pipelined: what the server takes when the client does not wait for each ack.
            n = self.sizes.publishes
            t0 = time.perf_counter()
            futs = [await js.publish_async(subject, payload) for _ in range(n)]
            await asyncio.gather(*futs)
            rate = n / (time.perf_counter() - t0)
            self.report.add(Figure("raw pipelined JetStream publish", rate, "msg/s", kind="rate"))
        finally:
            with contextlib.suppress(Exception):
                await js.delete_stream(stream)
            await nc.close()

    # ------------------------------------------------------------------ in-process figures

    async def fig_overhead(self) -> None:
        """Per-step time of a no-op step, timed around ``ctx.step.run`` inside the workflow."""
        from polos.testing import PolosEnvironment

        from . import workflows as w

        n = self.sizes.overhead_steps
        s = self.settings()
        async with PolosEnvironment(s, [w.timed_steps]) as env:
            await (await env.client.start(w.timed_steps, w.Steps(steps=5))).result(timeout=30)
            w.STEP_TIMES.clear()
            for _ in range(self.sizes.overhead_runs):
                h = await env.client.start(w.timed_steps, w.Steps(steps=n))
                await h.result(timeout=60)
        times = [t * 1000 for t in w.STEP_TIMES]
        # "Minus nothing": the same call without Polos, to show it is negligible.
        t0 = time.perf_counter()
        for _ in range(10_000):
            await w.noop()
        bare = (time.perf_counter() - t0) / 10_000 * 1000
        note = f"{len(times)} steps; bare call {bare * 1000:.2f} us subtracted"
        self.report.add(
            Figure(
                "step overhead p50 (no-op step, in-process worker)",
                statistics.median(times) - bare,
                "ms",
                note=note,
            )
        )
        self.report.add(Figure("step overhead p99", pct(times, 99) - bare, "ms"))

    async def fig_replay(self) -> None:
        """Replay of a finished run with N recorded steps: read + fold + re-walk the code."""
        from polos._private.run.execution import RunExecution
        from polos.testing import PolosEnvironment
        from polos.workflow import WorkflowContext

        from . import workflows as w

        n = self.sizes.replay_steps
        s = self.settings()
        async with PolosEnvironment(s, [w.bench_steps]) as env:
            h = await env.client.start(w.bench_steps, w.Steps(steps=n))
            await h.result(timeout=120)
            names = Names(s.prefix)
            reads, folds, walks, totals = [], [], [], []
            for _ in range(self.sizes.replay_repeats):
                t0 = time.perf_counter()
                history = await read_history(env.client.nc, names, h.run_id)
                t1 = time.perf_counter()
                state = ev.RunState.fold(h.run_id, history)
                t2 = time.perf_counter()
                exe = RunExecution(
                    js=env.client.js,
                    nc=env.client.nc,
                    names=names,
                    settings=s,
                    workflow=w.bench_steps,
                    state=state,
                    worker_id="bench",
                )
                out = await w.bench_steps(WorkflowContext(exe), w.Steps(steps=n))
                exe.check_all_replayed()
                t3 = time.perf_counter()
                assert out == n and exe.appends == 0, "replay must not execute or append"
                reads.append((t1 - t0) * 1000)
                folds.append((t2 - t1) * 1000)
                walks.append((t3 - t2) * 1000)
                totals.append((t3 - t0) * 1000)
        note = (
            f"{len(history)} events; read {statistics.median(reads):.1f} + fold "
            f"{statistics.median(folds):.1f} + re-walk {statistics.median(walks):.1f} ms"
        )
        self.report.add(
            Figure(
                f"replay of a run with {n} completed steps",
                statistics.median(totals),
                "ms",
                note=note,
            )
        )

    async def fig_long(self) -> None:
        """A run with N completed steps suspended, then resumed on a worker that does not hold
        its state (an in-process ``Worker(state_cache=0)``; the orchestrator is a process):
        resume -> the next step runs, from the run's replay snapshot and, alternating, with
        the snapshot removed (the worker reads the whole log). Then the bare replay of the
        same suspended run both ways: load + re-walk, in the benchmark process."""
        from polos._private.run.execution import RunExecution
        from polos._private.run.signals import Suspend
        from polos._private.store import load_state, snapshots
        from polos.worker import Worker
        from polos.workflow import WorkflowContext

        from . import workflows as w

        n = self.sizes.long_steps
        s = self.settings()
        # The default interval for the long run; a quick run's is too short for it.
        s = s.with_(snapshot_events=min(s.snapshot_events, max(1, n // 2)))
        names = Names(s.prefix)
        nc = await connect(s, "polos-bench-init")
        try:
            await ensure_topology(nc.jetstream(), names, s)
        finally:
            await disconnect(nc)
        procs = Processes(s, self.tmp)
        procs.orchestrator()
        client = await PolosClient.connect(settings=s)
        worker = Worker([w.bench_long], settings=s, state_cache=0, worker_id="long")
        await worker.start()
        assert worker.snapshots is not None and worker._nc is not None and worker._js is not None
        wnc, wjs = worker._nc, worker._js
        lat: dict[str, list[float]] = {"snapshot": [], "log": []}
        acks: dict[str, list[float]] = {"snapshot": [], "log": []}
        bare: dict[str, list[tuple[float, float, float]]] = {"snapshot": [], "log": []}
        phases: dict[str, list[tuple[float, float, float]]] = {"snapshot": [], "log": []}
        sizes: list[int] = []
        suspended_at: dict[str, int] = {}

        async def rewalk(state: ev.RunState) -> float:
            t0 = time.perf_counter()
            exe = RunExecution(
                js=wjs, nc=wnc, names=names, settings=s, workflow=w.bench_long,
                state=state, worker_id="bench",
            )  # fmt: skip
            with contextlib.suppress(Suspend):  # it stops where the run waits: the suspend
                await w.bench_long(WorkflowContext(exe), w.Steps(steps=n))
            assert exe.appends == 0, "a replay must not append"
            return (time.perf_counter() - t0) * 1000

        try:
            for i in range(2 * self.sizes.long_repeats):
                mode = "snapshot" if i % 2 == 0 else "log"
                h = await client.start(w.bench_long, w.Steps(steps=n))

                async def waiting(run_id: str = h.run_id) -> bool:
                    # Its control events only: reading the whole run while it grows would
                    # take the worker's turns in this process.
                    state = await load_state(client.nc, names, run_id, kinds=("ctl",))
                    return state.status == "suspended"

                await until(waiting, 60 + n / 20, f"the {n}-step run to suspend")
                await worker.snapshots.idle()
                entry = await kv_entry(wnc, names.snapshots_bucket, h.run_id)
                assert entry is not None, "the suspended run has no snapshot"
                suspended_at[h.run_id] = snapshots.decode(h.run_id, entry.value).seq
                sizes.append(len(entry.value))
                # The bare replay, both ways, of the run as it waits.
                t0 = time.perf_counter()
                loaded, why = await snapshots.load(wnc, wjs, names, h.run_id)
                t1 = time.perf_counter()
                assert loaded is not None, why
                bare["snapshot"].append(((t1 - t0) * 1000, 0.0, await rewalk(loaded.state)))
                t0 = time.perf_counter()
                history = await read_history(wnc, names, h.run_id)
                t1 = time.perf_counter()
                state = ev.RunState.fold(h.run_id, history)
                t2 = time.perf_counter()
                bare["log"].append(((t1 - t0) * 1000, (t2 - t1) * 1000, await rewalk(state)))
                if mode == "log":
                    await snapshots.delete(wnc, wjs, names, h.run_id)
                # What the bare replays left must not be collected during the timed resume.
                del loaded, history, state
                gc.collect()
                before = dict(worker.history_reads)
                # The bare replays just ran in this process, holding its loop: the worker's
                # tasks they kept waiting (heartbeats, deliveries) run first, or the resume
                # is sent late (8-12 ms of the figure without this).
                await asyncio.sleep(0.5)
                t0 = time.time()
                await client.resume(h.run_id, "go", {"ok": True})
                acks[mode].append((time.time() - t0) * 1000)
                ran_at = float(await h.result(timeout=120))
                lat[mode].append((ran_at - t0) * 1000)
                # Where the time went, from the events' own clocks: the wake built by the
                # orchestrator, the claim built by the worker (after its load), the step.
                tail = await read_history(wnc, names, h.run_id, start_seq=suspended_at[h.run_id])
                woke = [e.at for _, e in tail if isinstance(e, ev.RunWoken)][-1]
                claimed = [e.at for _, e in tail if isinstance(e, ev.RunClaimed)][-1]
                phases[mode].append(
                    ((woke - t0) * 1000, (claimed - woke) * 1000, (ran_at - claimed) * 1000)
                )
                # Without a snapshot the worker reads the log, or (a run short enough) gets the
                # history the orchestrator read in the task.
                took = worker.history_reads["snapshot"] - before["snapshot"]
                assert took == (1 if mode == "snapshot" else 0), (
                    f"the resume did not replay from the {mode}: {worker.history_reads}"
                )
        finally:
            await worker.stop()
            await client.close()
            procs.stop_all()
        for mode, label in (("snapshot", "from its snapshot"), ("log", "from the log only")):
            self.report.add(
                Figure(
                    f"resume of a {n:,}-step run -> next step runs, {label}",
                    statistics.median(lat[mode]),
                    "ms",
                    note=f"{len(lat[mode])} runs; resume -> wake built "
                    f"{statistics.median(p[0] for p in phases[mode]):.1f}, -> claim built (task, "
                    f"load) {statistics.median(p[1] for p in phases[mode]):.1f}, -> step runs "
                    f"(claim append, re-walk) {statistics.median(p[2] for p in phases[mode]):.1f}"
                    " ms p50; worker without the run's state (in-process, state_cache=0)",
                )
            )
        for mode, label in (("snapshot", "snapshot + tail"), ("log", "whole log")):
            loads = statistics.median(b[0] for b in bare[mode])
            folds = statistics.median(b[1] for b in bare[mode])
            walks = statistics.median(b[2] for b in bare[mode])
            totals = statistics.median(sum(b) for b in bare[mode])
            note = (
                f"load {loads:.1f} (KV get, checks, tail, restore) + re-walk {walks:.1f} ms; "
                f"snapshot {statistics.median(sizes) / 1024:,.0f} KB"
                if mode == "snapshot"
                else f"read {loads:.1f} + fold {folds:.1f} + re-walk {walks:.1f} ms"
            )
            self.report.add(
                Figure(f"bare replay of the {n:,}-step run, {label}", totals, "ms", note=note)
            )

    async def fig_reads(self) -> None:
        """A run's history read, now (kind by kind, shared inbox, fast header parser) and as it
        was first written (wildcard filter, a subscription per read, nats-py's parser),
        interleaved in one run."""
        from polos.testing import PolosEnvironment

        from . import workflows as w
        from .baseline import original_header_parser, read_subject_per_sub

        s = self.settings()
        names = Names(s.prefix)
        async with PolosEnvironment(s, [w.bench_steps]) as env:
            nc = env.client.nc
            for n in self.sizes.read_sizes:
                h = await env.client.start(w.bench_steps, w.Steps(steps=n))
                await h.result(timeout=120)
                flt = names.run_filter(h.run_id)
                now: list[float] = []
                before: list[float] = []
                reps = max(3, self.sizes.read_repeats * 10 // max(10, n // 10))
                for _ in range(reps):
                    t0 = time.perf_counter()
                    msgs = await read_run(nc, names, h.run_id)
                    now.append((time.perf_counter() - t0) * 1000)
                    with original_header_parser():
                        t0 = time.perf_counter()
                        old = await read_subject_per_sub(nc, names.runs_stream, flt)
                        before.append((time.perf_counter() - t0) * 1000)
                    assert len(msgs) == len(old) == n + 3
                b, a = statistics.median(before), statistics.median(now)
                self.report.add(
                    Figure(
                        f"history read, {n + 3} events p50",
                        a,
                        "ms",
                        note=f"before: {b:.2f} ms ({b / a:.1f}x slower)",
                    )
                )

    # ------------------------------------------------------------------ deployed figures

    async def _deployment(self, s: Settings, workers: int) -> tuple[Processes, PolosClient]:
        # As `polos up` does before it says it is up: the topology exists before any worker
        # or client looks for it (they only check; the orchestrator may still be starting).
        nc = await connect(s, "polos-bench-init")
        try:
            await ensure_topology(nc.jetstream(), Names(s.prefix), s)
        finally:
            await disconnect(nc)
        procs = Processes(s, self.tmp)
        procs.orchestrator()
        for i in range(workers):
            procs.worker(f"w{i + 1}")
        client = await PolosClient.connect(settings=s)
        await wait_workers(client, {f"w{i + 1}" for i in range(workers)})
        return procs, client

    async def fig_e2e(self) -> None:
        """Sequential: start, wait for the result, next. Orchestrator and worker processes.

        Beside each run, its floor: the awaited publishes and one-way messages of its
        sequential path (``_E2E_PATH``) back to back, so the ratio is to the same moment's
        load. Then a few more runs with a ``>`` subscriber counting every JetStream operation.
        """
        from . import workflows as w

        s = self.settings()
        procs, client = await self._deployment(s, 1)
        floor = await _Floor.open(s)
        try:
            for _ in range(3):  # warm-up: imports, consumers, first-run caches
                await (await client.start(w.bench_steps, w.Steps(steps=10))).result(timeout=30)
                await floor.once()
            e2e: list[float] = []
            floors: list[float] = []
            parts: dict[str, list[float]] = {k: [] for k in _E2E_PARTS}
            for _ in range(self.sizes.e2e_runs):
                t_wall = time.time()
                t0 = time.perf_counter()
                h = await client.start(w.bench_steps, w.Steps(steps=10))
                await h.result(timeout=30)
                e2e.append((time.perf_counter() - t0) * 1000)
                floors.append(await floor.once())
                # Where the time went, from the events' own clocks (one machine, one clock):
                # an event's ``at`` is taken just before its append.
                hist = [e for _, e in await client.history(h.run_id)]
                t_end = t_wall + e2e[-1] / 1000
                marks = [
                    t_wall,
                    hist[0].at,
                    hist[1].at,
                    hist[2].at,
                    hist[-2].at,
                    hist[-1].at,
                    t_end,
                ]
                for i, k in enumerate(_E2E_PARTS):
                    d = (marks[i + 1] - marks[i]) * 1000
                    parts[k].append(d / 9 if k == "per further step" else d)
            e2e_p50, floor_p50 = statistics.median(e2e), statistics.median(floors)
            self.report.add(
                Figure(
                    "10-step workflow end to end, sequential p50",
                    e2e_p50,
                    "ms",
                    note=f"p99 {pct(e2e, 99):.1f} ms; "
                    f"{1000 / statistics.mean(e2e):.1f} wf/s sequential; "
                    f"{e2e_p50 / floor_p50:.2f}x its floor",
                )
            )
            self.report.add(
                Figure(
                    "  its floor: the run's sequential messages back to back p50",
                    floor_p50,
                    "ms",
                    note=f"{_E2E_ROUND_TRIPS} awaited publishes + {_E2E_ONE_WAY} one-way "
                    f"messages, beside each run; e2e p50 / floor p50 = {e2e_p50 / floor_p50:.2f}",
                )
            )
            for k, v in parts.items():
                self.report.add(
                    Figure(f"  e2e part: {k} p50", statistics.median(v), "ms", note=_E2E_PARTS[k])
                )
            ops, detail = await _count_ops(client, s, self.sizes.ops_runs)
            self.report.add(
                Figure(
                    "JetStream operations per 10-step run",
                    ops,
                    "ops",
                    kind="count",
                    note=detail,
                )
            )
            firsts = []
            for _ in range(self.sizes.first_step_runs):
                t0 = time.time()
                fh = await client.start(w.first_step)
                ran_at = float(await fh.result(timeout=30))
                firsts.append((ran_at - t0) * 1000)
            self.report.add(
                Figure(
                    "start -> first step runs p50",
                    statistics.median(firsts),
                    "ms",
                    note=f"p99 {pct(firsts, 99):.1f} ms",
                )
            )
        finally:
            await floor.close()
            await client.close()
            procs.stop_all()

    async def fig_throughput(self) -> None:
        """Many runs in flight: start them all, count completions from the control events."""

        for workers in self.sizes.worker_counts:
            await self._throughput(workers)

    async def _throughput(self, workers: int) -> None:
        from . import workflows as w

        s = self.settings()
        procs, client = await self._deployment(s, workers)
        try:
            steps = self.sizes.throughput_steps
            await (await client.start(w.bench_steps, w.Steps(steps=2))).result(timeout=30)
            for n in self.sizes.throughput_runs:
                rates: list[float] = []
                spent: dict[str, float] = {}
                for _ in range(self.sizes.throughput_rounds):
                    # CPU from the first start to the last end only: the reads that check the
                    # runs afterwards are the benchmark's, not the runs'.
                    took, _started, used = await self._throughput_round(
                        client, s, n, steps, lambda: self._cpu(procs)
                    )
                    rates.append(n / took)
                    for name, secs in used.items():
                        spent[name] = spent.get(name, 0.0) + secs
                rate = statistics.median(rates)
                cpu = self._cpu_note({k: 0.0 for k in spent}, spent, n * len(rates))
                self.report.add(
                    Figure(
                        f"{steps}-step workflows/s, {n:,} started at once, {workers} worker process"
                        + ("es" if workers > 1 else ""),
                        rate,
                        "wf/s",
                        kind="rate",
                        note=f"median of {len(rates)} rounds ({', '.join(f'{r:.0f}' for r in rates)}); "
                        f"{rate * (steps + 3):,.0f} appends/s; {cpu}",
                    )
                )
        finally:
            await client.close()
            procs.stop_all()

    @staticmethod
    async def _throughput_round(
        client: PolosClient,
        s: Settings,
        n: int,
        steps: int,
        cpu: Callable[[], dict[str, float]],
    ) -> tuple[float, float, dict[str, float]]:
        """Start n runs at once; seconds until the last completed, and until all were sent,
        and the CPU seconds each process used meanwhile."""
        from . import workflows as w

        done: set[str] = set()
        all_done = asyncio.Event()

        ids = [f"tp{i}-{uuid.uuid4().hex[:8]}" for i in range(n)]
        wanted = set(ids)

        async def on_ctl(msg: Any) -> None:
            if b'"RunCompleted"' in msg.data or b'"RunFailed"' in msg.data:
                run_id = msg.subject.split(".")[2]
                if run_id in wanted:  # only this round's runs (not an earlier round's end)
                    done.add(run_id)
                    if len(done) >= n:
                        all_done.set()

        sub = await client.nc.subscribe(f"{s.prefix}.run.*.ctl", cb=on_ctl)
        sem = asyncio.Semaphore(64)

        async def start(run_id: str) -> None:
            async with sem:
                await client.start(w.bench_steps, w.Steps(steps=steps), run_id=run_id)

        try:
            cpu0 = cpu()
            t0 = time.perf_counter()
            await asyncio.gather(*(start(i) for i in ids))
            t_started = time.perf_counter() - t0
            await asyncio.wait_for(all_done.wait(), timeout=max(60.0, n * 0.5))
            took = time.perf_counter() - t0
            cpu1 = cpu()
        finally:
            await sub.unsubscribe()
        # Each run was seen ending. On an R3 cluster a follower answers direct gets too and may
        # not have applied the last end yet: a run not read as completed is read again for a
        # few seconds before it counts as failed (a run that failed, or whose end was never
        # stored, still does).
        pending, deadline = ids, time.monotonic() + 5.0
        while True:
            pending = [i for i in pending if (await client.get(i)).status != "completed"]
            if not pending or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        if pending:
            raise RuntimeError(f"throughput runs did not complete: {pending[:3]}")
        return took, t_started, {k: cpu1[k] - cpu0[k] for k in cpu0 if k in cpu1}

    async def fig_failover(self) -> None:
        """SIGKILL the worker in the middle of a step; a standby worker continues the run."""

        for label in self.sizes.failover_settings:
            await self._failover(label)

    async def _failover(self, label: str) -> None:
        from . import workflows as w

        s = self.settings(**FAILOVER_SETTINGS[label])
        procs, client = await self._deployment(s, 1)
        try:
            events: list[ev.Event] = []
            changed = asyncio.Event()
            run_id = f"fo-{uuid.uuid4().hex[:8]}"

            async def on_event(msg: Any) -> None:
                events.append(ev.decode(msg.data))
                changed.set()

            sub = await client.nc.subscribe(f"{s.prefix}.run.{run_id}.*", cb=on_event)
            job = w.Steps(
                steps=self.sizes.failover_steps, step_seconds=self.sizes.failover_step_seconds
            )
            await client.start(w.slow_steps, job, run_id=run_id)
            # The standby starts after w1 claimed the run, so the run begins on w1.
            await self._wait_event(events, changed, lambda e: isinstance(e, ev.RunClaimed))
            procs.worker("w2")
            await wait_workers(client, {"w1", "w2"})
            # A step completed after the standby is up proves w1 still runs the run (the run is
            # far longer than a worker's start); kill w1 in the middle of the next step.
            done_before = sum(isinstance(e, ev.StepCompleted) for e in events)
            await self._wait_event(
                events,
                changed,
                lambda e: sum(isinstance(x, ev.StepCompleted) for x in events) > done_before,
            )
            await asyncio.sleep(self.sizes.failover_step_seconds / 2)
            t_kill = time.time()
            procs.kill("w1")
            claim = await self._wait_event(
                events,
                changed,
                lambda e: isinstance(e, ev.RunClaimed) and e.worker_id == "w2",
                timeout=60,
            )
            step = await self._wait_event(
                events,
                changed,
                lambda e: isinstance(e, ev.StepCompleted) and e.at > claim.at,
                timeout=60,
            )
            # The rest of the run is not needed: w2 goes without a graceful drain.
            procs.kill("w2")
            await sub.unsubscribe()
            ack = s.task_ack_wait
            self.report.add(
                Figure(
                    f"failover: SIGKILL -> standby claims ({label}: ack_wait {ack:g}s, "
                    f"hb {s.heartbeat_interval:g}s)",
                    (claim.at - t_kill) * 1000,
                    "ms",
                    note=f"next step done {(step.at - t_kill) * 1000:.0f} ms after the kill "
                    f"(includes re-running the interrupted {job.step_seconds:g}s step)",
                )
            )
        finally:
            await client.close()
            procs.stop_all()

    @staticmethod
    async def _wait_event(
        events: list[ev.Event],
        changed: asyncio.Event,
        pred: Callable[[ev.Event], bool],
        timeout: float = 30.0,
    ) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            for e in events:
                if pred(e):
                    return e
            changed.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("benchmark: expected event did not arrive")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), timeout=left)

    # ------------------------------------------------------------------ pending figures

    async def fig_suspend(self) -> None:
        """Resume latency, then N suspended runs at once: memory, and time to resume them all."""
        from polos.workflow import Step

        from . import workflows as w

        if not hasattr(Step, "suspend"):
            self.report.pending.append(
                "suspend/resume (resume latency, suspended runs: memory and time-to-resume-all):"
                " ctx.step.suspend does not exist yet (issue 3)"
            )
            return
        s = self.settings()
        procs, client = await self._deployment(s, 1)
        # The whole deployment, so each service's memory is measured: suspended runs with no
        # timer should cost the scheduler nothing, and that is worth showing.
        procs.spawn("scheduler", "-m", "polos_services.scheduler")
        await self._scheduler_ready(client, s)
        suspended: dict[str, asyncio.Event] = {}
        ended: set[str] = set()
        counts = {"suspended": 0, "completed": 0, "failed": 0}
        all_there = asyncio.Event()
        target = {"suspended": 0, "completed": 0}

        async def on_ctl(msg: Any) -> None:
            run_id = msg.subject.split(".")[2]
            data = msg.data
            if b'"t":"RunSuspended"' in data:
                counts["suspended"] += 1
                event = suspended.get(run_id)
                if event is not None:
                    event.set()
                if target["suspended"] and counts["suspended"] >= target["suspended"]:
                    all_there.set()
            elif b'"t":"RunCompleted"' in data or b'"t":"RunFailed"' in data:
                if run_id in ended:
                    return
                ended.add(run_id)
                counts["failed" if b'"t":"RunFailed"' in data else "completed"] += 1
                if (
                    target["completed"]
                    and counts["completed"] + counts["failed"] >= target["completed"]
                ):
                    all_there.set()

        # Every control event of every run comes here (three per run and phase): with a million
        # runs the default pending limit (524,288 messages) could drop some and the count
        # would never be reached.
        sub = await client.nc.subscribe(
            f"{s.prefix}.run.*.ctl",
            cb=on_ctl,
            pending_msgs_limit=10_000_000,
            pending_bytes_limit=2 * 1024**3,
        )

        async def start_suspended(run_id: str) -> Any:
            suspended[run_id] = asyncio.Event()
            h = await client.start(w.approval, run_id=run_id)
            await asyncio.wait_for(suspended[run_id].wait(), 60)
            del suspended[run_id]
            return h

        async def resume_latency(tag: str) -> tuple[list[float], list[float]]:
            # Suspended (no worker holds it) -> resume -> the next step runs, one at a time.
            lat, acks = [], []
            for i in range(self.sizes.e2e_runs):
                run_id = f"{tag}{i}-{uuid.uuid4().hex[:8]}"
                h = await start_suspended(run_id)
                t0 = time.time()
                await client.resume(run_id, "approve", {"ok": True})
                acks.append((time.time() - t0) * 1000)
                ran_at = float(await h.result(timeout=60))
                lat.append((ran_at - t0) * 1000)
            return lat, acks

        try:
            lat, acks = await resume_latency("rs")
            self.report.add(
                Figure(
                    "resume -> next step runs p50 (run held no worker)",
                    statistics.median(lat),
                    "ms",
                    note=f"p99 {pct(lat, 99):.1f} ms; resume command answered "
                    f"in {statistics.median(acks):.1f} ms p50",
                )
            )
            idle_p50 = statistics.median(lat)

            total = self.sizes.suspended_runs
            n = min(self.sizes.started_runs or total, total)
            copies = total - n
            fill_note = ""
            if copies:
                sample = f"sample-{uuid.uuid4().hex[:12]}"
                await start_suspended(sample)
                before = counts["suspended"]
                took = await self._prefill(procs, client, s, sample, copies)

                async def copies_heard() -> bool:
                    return counts["suspended"] >= before + copies

                await until(copies_heard, 60 + copies / 1000, "the copies' control events")
                fill_note = f"; {copies:,} copies of a suspended run waiting already (written in {took:.0f} s)"

            # Many suspended runs at once.
            base = dict(counts)
            ids = [f"ms{i}-{uuid.uuid4().hex[:8]}" for i in range(n)]
            rss_before = self._rss(procs)

            async def start(run_id: str) -> None:
                await client.start(w.approval, run_id=run_id)

            all_there.clear()
            target["suspended"] = base["suspended"] + n
            cpu0 = self._cpu(procs)
            t0 = time.perf_counter()
            await _pool(ids, start, "started", lambda: counts["suspended"] - base["suspended"])
            await asyncio.wait_for(all_there.wait(), timeout=120 + n / 20)
            t_susp = time.perf_counter() - t0
            # Memory and reads are measured at rest: once the orchestrator has folded every
            # control event into the run index (it trails the suspensions under this load).
            t_rest = time.perf_counter()
            await self._orchestrator_idle(client, s, timeout=120 + n / 50)
            caught_up = time.perf_counter() - t_rest
            cpu_susp = self._cpu_note(cpu0, self._cpu(procs), n)
            rss = self._rss(procs)
            stored = await self._stream_bytes(client, s)
            # A history read now, with the runs stream this full: it is on every resume path
            # twice (orchestrator, then worker). Polos reads a run kind by kind (literal
            # subjects); the wildcard filter it used before is timed beside it.
            # The first read of a run may have to load its messages' block from disk (the server
            # keeps recent blocks in memory); the second read of the same run shows the rest.
            names = Names(s.prefix)
            reads, again, wildcard = [], [], []
            for r in ids[:: max(1, n // 20)]:
                t_r = time.perf_counter()
                msgs = await read_run(client.nc, names, r)
                reads.append((time.perf_counter() - t_r) * 1000)
                t_r = time.perf_counter()
                await read_run(client.nc, names, r)
                again.append((time.perf_counter() - t_r) * 1000)
                t_r = time.perf_counter()
                wild = await read_subject(client.nc, names.runs_stream, names.run_filter(r))
                wildcard.append((time.perf_counter() - t_r) * 1000)
                assert [m.seq for m in msgs] == [m.seq for m in wild]
            info = await client.js.stream_info(names.runs_stream)
            self.report.add(
                Figure(
                    f"history read of one suspended run, {info.state.messages:,} msgs in the stream",
                    statistics.median(reads),
                    "ms",
                    note=f"p99 {pct(reads, 99):.2f} ms; read again at once {statistics.median(again):.2f}"
                    f" ms; wildcard filter <p>.run.<id>.* (after) {statistics.median(wildcard):.2f}"
                    " ms",
                )
            )
            self.report.add(
                Figure(
                    f"{n:,} runs started and suspended",
                    n / t_susp,
                    "wf/s",
                    kind="rate",
                    note=f"{t_susp:.1f} s; the run index caught up {caught_up:.1f} s later; "
                    + cpu_susp
                    + fill_note,
                )
            )
            for proc_name in ("orchestrator", "scheduler", "worker", "nats-server"):
                now, was = rss.get(proc_name), rss_before.get(proc_name)
                parts = [] if was is None else [f"before the runs {was:.0f} MB"]
                if proc_name == "nats-server":
                    parts.append(f"stored in JetStream {stored:.0f} MB")
                self.report.add(
                    Figure(
                        f"memory with {total:,} suspended runs: {proc_name} RSS",
                        now,
                        "MB",
                        kind="other",
                        note="; ".join(parts),
                    )
                )

            # The same resume latency with all of them waiting: a resume must not get slower
            # with the number of runs the namespace holds (the bound: within 2x).
            lat, acks = await resume_latency("rw")
            self.report.add(
                Figure(
                    f"resume -> next step runs p50 with {total:,} suspended runs waiting",
                    statistics.median(lat),
                    "ms",
                    note=f"{statistics.median(lat) / idle_p50:.2f}x the figure with none waiting; "
                    f"p99 {pct(lat, 99):.1f} ms; answered in {statistics.median(acks):.1f} ms p50",
                )
            )
            base = dict(counts)

            all_there.clear()
            target["suspended"] = 0
            target["completed"] = counts["completed"] + counts["failed"] + n
            cpu0 = self._cpu(procs)
            t0 = time.perf_counter()

            async def resume(run_id: str) -> None:
                await client.resume(run_id, "approve", {"ok": True})

            done_before = counts["completed"] + counts["failed"]
            await _pool(
                ids, resume, "resumed", lambda: counts["completed"] + counts["failed"] - done_before
            )
            t_sent = time.perf_counter() - t0
            await asyncio.wait_for(all_there.wait(), timeout=120 + n / 20)
            t_all = time.perf_counter() - t0
            await self._orchestrator_idle(client, s, timeout=120 + n / 50)
            cpu_res = self._cpu_note(cpu0, self._cpu(procs), n)
            if counts["failed"] > base["failed"]:
                raise RuntimeError(f"{counts['failed'] - base['failed']} resumed runs failed")
            self.report.add(
                Figure(
                    f"time to resume all {n:,} suspended runs"
                    if not copies
                    else f"time to resume {n:,} of the {total:,} suspended runs",
                    t_all * 1000,
                    "ms",
                    note=f"{n / t_all:,.0f} runs/s finished; resumes answered in {t_sent:.1f} s; "
                    + cpu_res,
                )
            )
        finally:
            await sub.unsubscribe()
            await client.close()
            procs.stop_all()

    async def _prefill(
        self, procs: Processes, client: PolosClient, s: Settings, sample: str, copies: int
    ) -> float:
        """Write ``copies`` suspended runs straight to the streams: the stored messages of the
        real suspended run ``sample`` (its control events, its run index entry, its start
        command), byte for byte but for the run id. So a million waiting runs cost minutes to
        set up instead of the hours the services would take on two cores, and the server holds
        what it would hold for real ones. The orchestrator is stopped meanwhile and its
        consumers restart at the end of the streams: the copies are history it never saw, as
        if it had folded them already. Returns the seconds the writing took."""
        names = Names(s.prefix)
        await self._orchestrator_idle(client, s, timeout=60)
        stored = [(m.subject, m.data, m.headers) for m in await read_run(client.nc, names, sample)]
        entry = await kv_entry(client.nc, names.runs_bucket, sample)
        cmd = await last_for_subject(client.nc, names.cmd_stream, names.start_subject("approval"))
        if entry is None or cmd is None or sample.encode() not in cmd.data:
            raise RuntimeError(f"the sample run {sample} has no index entry or start command")
        stored += [
            (f"$KV.{names.runs_bucket}.{sample}", entry.value, None),
            (cmd.subject, cmd.data, cmd.headers),
        ]
        # The server adds Nats-* headers to what it returns (stream, sequence, time) and the
        # writers sent fences; a copy keeps only its own message id and Polos's headers.
        template = [
            (
                subj,
                data,
                {k: v for k, v in (hdrs or {}).items() if k == MSG_ID or not k.startswith("Nats-")},
            )
            for subj, data, hdrs in stored
        ]
        procs.stop("orchestrator")
        raw = sample.encode()

        written = [0]

        async def write(run_id: str) -> None:
            rid = run_id.encode()
            for subj, data, hdrs in template:
                await publish(
                    client.nc,
                    subj.replace(sample, run_id),
                    data.replace(raw, rid),
                    headers={k: v.replace(sample, run_id) for k, v in hdrs.items()} or None,
                    timeout=30.0,
                )
            written[0] += 1

        ids = [f"cp{i}-{uuid.uuid4().hex[:8]}" for i in range(copies)]
        t0 = time.perf_counter()
        await _pool(ids, write, "copies written", lambda: written[0], width=256)
        took = time.perf_counter() - t0
        del ids
        for stream, durable in (
            (names.cmd_stream, "orchestrator_cmd"),
            (names.runs_stream, "orchestrator_ctl"),
        ):
            info = await client.js.consumer_info(stream, durable)
            cfg = info.config
            cfg.deliver_policy = DeliverPolicy.NEW
            await client.js.delete_consumer(stream, durable)
            await client.js.add_consumer(stream, cfg)
        procs.orchestrator()

        async def pulling() -> bool:
            info = await client.js.consumer_info(names.runs_stream, "orchestrator_ctl")
            return bool(info.num_waiting)

        await until(pulling, 60.0, "the orchestrator to start again")
        return took

    @staticmethod
    async def _orchestrator_idle(client: PolosClient, s: Settings, timeout: float) -> None:
        """No command or control event waits for the orchestrator (delivered or not)."""
        names = Names(s.prefix)

        async def idle() -> bool:
            for stream, durable in (
                (names.cmd_stream, "orchestrator_cmd"),
                (names.runs_stream, "orchestrator_ctl"),
            ):
                info = await client.js.consumer_info(stream, durable)
                if info.num_pending or info.num_ack_pending:
                    return False
            return True

        await until(idle, timeout, "the orchestrator to catch up")

    @staticmethod
    async def _scheduler_ready(client: PolosClient, s: Settings) -> None:
        """The scheduler has made its consumer: it is up (and done importing)."""
        from polos_services.scheduler.scheduler import DURABLE

        async def ready() -> bool:
            try:
                await client.js.consumer_info(Names(s.prefix).timers_stream, DURABLE)
            except Exception:
                return False
            return True

        await until(ready, 30.0, "the scheduler")
        await asyncio.sleep(0.5)  # its start-up reads settle

    def _pids(self, procs: Processes) -> dict[str, int]:
        pids = {
            name: procs.procs[key].pid
            for name, key in (
                ("worker", "w1"),
                ("worker 2", "w2"),
                ("orchestrator", "orchestrator"),
                ("scheduler", "scheduler"),
            )
            if key in procs.procs
        }
        if self.server is not None and self.server.proc is not None:
            pids["nats-server"] = self.server.proc.pid
        return pids

    def _cpu(self, procs: Processes) -> dict[str, float]:
        """CPU seconds (user + system) each process has used so far, from /proc (Linux); the
        benchmark's own client as ``client``. Differences over a phase, per run, say where a
        run's cost goes."""
        tick = os.sysconf("SC_CLK_TCK")
        out: dict[str, float] = {"client": time.process_time()}
        for name, pid in self._pids(procs).items():
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                out[name] = (int(fields[11]) + int(fields[12])) / tick
        return out

    @staticmethod
    def _cpu_note(before: dict[str, float], after: dict[str, float], n: int) -> str:
        """CPU ms per run over a phase, by process."""
        parts = [
            f"{name} {(after[name] - before[name]) * 1000 / n:.2f}"
            for name in ("orchestrator", "worker", "worker 2", "nats-server", "scheduler", "client")
            if name in before and name in after
        ]
        total = sum(after[k] - before[k] for k in before if k in after) * 1000 / n
        return f"CPU ms per run: {total:.2f} = " + ", ".join(parts)

    def _rss(self, procs: Processes) -> dict[str, float]:
        """Resident memory (MB) of the services, from /proc (Linux)."""
        out: dict[str, float] = {}
        for name, pid in self._pids(procs).items():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        out[name] = int(line.split()[1]) / 1024
        return out

    @staticmethod
    async def _stream_bytes(client: PolosClient, s: Settings) -> float:
        """Everything the namespace keeps in JetStream (streams and KV buckets), in MB."""
        total = 0
        names = await client.js.streams_info()
        for info in names:
            name = info.config.name or ""
            if name.startswith(s.prefix.upper() + "_") or s.prefix in name:
                total += info.state.bytes
        return total / 1e6

    async def fig_export(self) -> None:
        """The analytics exporter over a log of N synthetic but well-formed run histories."""
        try:
            from polos_analytics.export import Exporter
        except ImportError:
            self.report.pending.append(
                "export throughput (events/s): the analytics exporter does not exist yet (issue 6)"
            )
            return
        s = self.settings()
        names = Names(s.prefix)
        nc = await connect(s, "polos-bench-export")
        js = nc.jetstream()
        try:
            await ensure_topology(js, names, s)
            runs, steps = self.sizes.export_runs, 10
            futs = []
            for r in range(runs):
                run_id = f"ex{r:06d}"
                batch: list[ev.Event] = [
                    ev.RunRequested(run_id=run_id, workflow="bench_steps", input={"steps": steps}),
                    ev.RunClaimed(run_id=run_id, worker_id="w1", attempt=1),
                    *(
                        ev.StepCompleted(
                            key=f"s{i}", kind="run", name="noop", output=1, duration_ms=0.01
                        )
                        for i in range(steps)
                    ),
                    ev.RunCompleted(run_id=run_id, output=steps),
                ]
                for e in batch:
                    futs.append(
                        await js.publish_async(names.run_subject(run_id, e.KIND), ev.encode(e))
                    )
            await asyncio.gather(*futs)
            out = self.tmp / f"export-{s.prefix}"
            async with Exporter(s, out, nc=nc) as exporter:
                first = await exporter.export_once()
                again = await exporter.export_once()
        finally:
            await nc.close()
        self.report.add(
            Figure(
                f"analytics export to Parquet ({first.total:,} rows, one pass)",
                first.per_second,
                "ev/s",
                kind="rate",
                note=f"{first.seconds * 1000:.0f} ms; a second export found {again.total} new rows",
            )
        )
        if again.total:
            raise RuntimeError(
                f"export is not idempotent: the second pass wrote {again.total} rows"
            )


async def run_bench(
    sizes: Sizes,
    *,
    only: set[str] | None = None,
    nats_url: str | None = None,
    keep: bool = False,
    json_path: str | None = None,
    sync: str | None = None,
    cluster: bool = False,
) -> Report:
    bench = Bench(sizes, nats_url=nats_url, keep=keep, sync=sync, cluster=cluster)
    # A long figure (a million suspended runs) may be stopped with SIGTERM: cancel, so the
    # figures' finally blocks stop the services and the server it started instead of leaving
    # them running.
    main = asyncio.current_task()
    if main is not None:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main.cancel)
    try:
        report = await bench.run(only)
    except asyncio.CancelledError:
        print("bench: stopped (SIGTERM); its processes and server are stopped", file=sys.stderr)
        raise SystemExit(143) from None
    print()
    print(f"durability: {report.mode}; load average at the end {_loadavg()}")
    print(report.table())
    for p in report.pending:
        print(f"pending: {p}")
    for f in report.failed:
        print(f"FAILED: {f}")
    if json_path:
        Path(json_path).write_bytes(orjson.dumps(report.as_dict(), option=orjson.OPT_INDENT_2))
    return report
