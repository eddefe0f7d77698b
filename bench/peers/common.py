"""The harness every peer benchmark shares: the same workload, the same three figures, the same
floor, measured the same way for Polos and for each peer.

Standard library only: each peer runs in its own virtual environment with nothing of Polos in
it, and imports this file from beside its script.

The workload is a workflow of ``STEPS`` no-op steps. Each step returns ``time.time()`` taken
when it ran, in the process that runs the steps, and the workflow returns the list.

- **sequential wf/s**: ``--seq-runs`` runs, each started and awaited before the next. The
  figure is runs divided by the wall time of all of them.
- **concurrent wf/s**: ``--concurrent`` runs started at once (at most 64 start requests in
  flight, as in ``python -m bench``). Timed from the first start until the last result is in
  the client's hands.
- **per-step ms**: the p50 of the gaps between the stamps of consecutive steps of one run, over
  the sequential runs. A gap is what a durable step costs inside a run: the step's record made
  durable as the system does it, then the next step dispatched and started.
- **floor**: a 60-byte append to a file followed by ``os.fsync``, awaited, p50 over 200, in the
  same temp directory and the same run. Nothing that flushes every commit to disk can take a
  step faster than that; a system that does beats it only by not syncing (or by grouping
  commits). The Polos script adds the awaited JetStream publish p50 of its own server.

Every run's result is checked (``STEPS`` stamps, in order); a run that fails or returns
anything else fails the benchmark. Each round does the sequential runs, then the concurrent
ones; ``--rounds`` rounds (at least two for a published figure) in one process after
``WARMUP`` warm-up runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

STEPS = 10
WARMUP = 10
START_IN_FLIGHT = 64


def stamp() -> float:
    """What each step returns: when it ran (one machine, one clock)."""
    return time.time()


def free_port() -> int:
    """A port nothing listens on now (loopback only)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def p50(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def fsync_floor_ms(directory: Path, n: int = 200) -> float:
    """p50 of an awaited 60-byte append plus ``os.fsync``: one commit flushed to this disk."""
    path = directory / "fsync-floor.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    times = []
    try:
        for _ in range(n + 10):
            t0 = time.perf_counter()
            os.write(fd, b"x" * 59 + b"\n")
            os.fsync(fd)
            times.append((time.perf_counter() - t0) * 1000)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    return p50(times[10:])


def spawn(
    cmd: list[str], log: Path, env: dict[str, str] | None = None, stdout_pipe: bool = False
) -> subprocess.Popen[bytes]:
    """A server or worker of a peer, in its own session (stopped with ``stop``), its output
    in ``log``."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            cmd,
            env=env,
            stdout=subprocess.PIPE if stdout_pipe else out,
            stderr=out if stdout_pipe else subprocess.STDOUT,
            start_new_session=True,
        )


def stop(
    procs: list[subprocess.Popen[bytes]], sig: int = signal.SIGTERM, timeout: float = 30
) -> None:
    """Stop what ``spawn`` started, last first: ``sig``, then SIGKILL after ``timeout``."""
    for p in reversed(procs):
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, sig)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    procs.clear()


def check(result: Any, run_id: str) -> list[float]:
    """A run's result is its STEPS stamps in order; anything else is a failed run."""
    if (
        not isinstance(result, list)
        or len(result) != STEPS
        or any(not isinstance(x, (int, float)) for x in result)
        or sorted(result) != list(result)
    ):
        raise RuntimeError(f"run {run_id} returned {str(result)[:200]!r}, not {STEPS} stamps")
    return [float(x) for x in result]


class Peer:
    """One system under test. Subclasses start what it needs in ``setup`` and stop it in
    ``teardown``; ``start`` begins a run and returns a handle, ``wait`` gives its result.
    ``call`` runs one to the end (by default ``wait(start())``; a peer whose users call a run
    in one request overrides it)."""

    name = "peer"
    version = "?"
    # What an acknowledged step means with the settings this script runs: said in the output.
    durability = "?"

    async def setup(self, tmp: Path) -> None: ...

    async def teardown(self) -> None: ...

    async def start(self, run_id: str) -> Any:
        raise NotImplementedError

    async def wait(self, handle: Any) -> Any:
        raise NotImplementedError

    async def call(self, run_id: str) -> Any:
        return await self.wait(await self.start(run_id))

    async def floors(self) -> dict[str, float]:
        """More floors measured in this run (ms), beside the fsync floor."""
        return {}


@dataclass
class Round:
    seq_wfs: float
    conc_wfs: float
    step_ms_p50: float
    step_ms_p90: float
    seq_runs: int
    conc_runs: int
    conc_all_started_s: float


@dataclass
class Result:
    system: str
    version: str
    durability: str
    mode: str
    floors_ms: dict[str, float]
    rounds: list[Round] = field(default_factory=list)
    load_average_start: str = ""
    load_average_end: str = ""
    python: str = platform.python_version()
    started: float = field(default_factory=time.time)


async def sequential(peer: Peer, n: int, tag: str) -> tuple[float, list[float]]:
    gaps: list[float] = []
    t0 = time.perf_counter()
    for i in range(n):
        run_id = f"{tag}-s{i}"
        stamps = check(await peer.call(run_id), run_id)
        gaps += [(b - a) * 1000 for a, b in itertools.pairwise(stamps)]
    return n / (time.perf_counter() - t0), gaps


async def concurrent(peer: Peer, n: int, tag: str) -> tuple[float, float]:
    sem = asyncio.Semaphore(START_IN_FLIGHT)
    started = 0
    all_started = 0.0
    t0 = time.perf_counter()

    async def one(i: int) -> None:
        nonlocal started, all_started
        run_id = f"{tag}-c{i}"
        async with sem:
            handle = await peer.start(run_id)
        started += 1
        if started == n:
            all_started = time.perf_counter() - t0
        check(await peer.wait(handle), run_id)

    await asyncio.gather(*(one(i) for i in range(n)))
    return n / (time.perf_counter() - t0), all_started


def parse_args(
    argv: list[str] | None = None, extra: Callable[[argparse.ArgumentParser], None] | None = None
) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seq-runs", type=int, default=50, help="sequential runs per round")
    p.add_argument("--concurrent", type=int, default=1000, help="runs started at once per round")
    p.add_argument(
        "--quick",
        action="store_true",
        help="1 round, 3 sequential and 10 concurrent runs: checks it works, not speed",
    )
    p.add_argument("--json", dest="json_path", help="also write the result to this JSON file")
    p.add_argument("--tmp", help="directory for the peer's data (default: a new temp dir)")
    if extra is not None:
        extra(p)
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.seq_runs, args.concurrent = 1, 3, 10
    return args


def _range(values: list[float], fmt: str = "{:.1f}") -> str:
    lo, hi = min(values), max(values)
    return (
        fmt.format(lo) if fmt.format(lo) == fmt.format(hi) else f"{fmt.format(lo)}–{fmt.format(hi)}"
    )


async def run(peer: Peer, args: argparse.Namespace, mode: str = "") -> Result:
    made = not args.tmp
    tmp = Path(args.tmp) if args.tmp else Path(tempfile.mkdtemp(prefix=f"peer-{peer.name}-"))
    tmp.mkdir(parents=True, exist_ok=True)
    result = Result(
        system=peer.name,
        version=peer.version,
        durability=peer.durability,
        mode=mode,
        floors_ms={},
        load_average_start=load_average(),
    )
    print(
        f"{peer.name} {peer.version} ({mode or 'defaults'}); data in {tmp}; "
        f"load average {result.load_average_start}",
        flush=True,
    )
    result.floors_ms["fsync 60 B p50"] = fsync_floor_ms(tmp)
    await peer.setup(tmp)
    try:
        result.version = peer.version  # some peers learn their version once started
        result.floors_ms.update(await peer.floors())
        print(
            "floors: " + ", ".join(f"{k} {v:.3f} ms" for k, v in result.floors_ms.items()),
            flush=True,
        )
        for i in range(WARMUP):
            check(await peer.call(f"warm{i}"), f"warm{i}")
        for r in range(args.rounds):
            tag = f"r{r}-{os.getpid()}-{int(time.time())}"
            seq, gaps = await sequential(peer, args.seq_runs, tag)
            conc, all_started = await concurrent(peer, args.concurrent, tag)
            rd = Round(
                seq_wfs=seq,
                conc_wfs=conc,
                step_ms_p50=p50(gaps),
                step_ms_p90=statistics.quantiles(gaps, n=10)[-1] if len(gaps) > 1 else p50(gaps),
                seq_runs=args.seq_runs,
                conc_runs=args.concurrent,
                conc_all_started_s=all_started,
            )
            result.rounds.append(rd)
            print(
                f"round {r + 1}: sequential {rd.seq_wfs:.1f} wf/s; {rd.conc_runs} at once "
                f"{rd.conc_wfs:.1f} wf/s (all started after {all_started:.2f} s); per step "
                f"p50 {rd.step_ms_p50:.2f} ms (p90 {rd.step_ms_p90:.2f}); load {load_average()}",
                flush=True,
            )
    finally:
        await peer.teardown()
        if made:
            shutil.rmtree(tmp, ignore_errors=True)
    result.load_average_end = load_average()
    rs = result.rounds
    floor = result.floors_ms["fsync 60 B p50"]
    print(
        f"\n| {peer.name} {peer.version} ({mode or 'defaults'}) | "
        f"{_range([x.seq_wfs for x in rs])} | {_range([x.conc_wfs for x in rs])} | "
        f"{_range([x.step_ms_p50 for x in rs], '{:.2f}')} | fsync floor {floor:.3f} ms | "
        f"per step {_range([x.step_ms_p50 / floor for x in rs])}x floor | "
        f"load {result.load_average_start} -> {result.load_average_end} |",
        flush=True,
    )
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(asdict(result), indent=2))
    return result


def main(
    make: Callable[[argparse.Namespace], Peer],
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
    mode: Callable[[argparse.Namespace], str] | None = None,
) -> None:
    args = parse_args(extra=extra)
    asyncio.run(run(make(args), args, mode(args) if mode else ""))
    sys.stdout.flush()
