"""Does the export `polos up` runs slow the runs down? ``python -m polos_bench.up_export``

Starts `polos up` (embedded server, no auth) with and without its export, alternating which goes
first, and each time: a worker process, 200 sequential 10-step runs (p50, p99) and a burst of
1,000 started at once (runs/s). On a shared machine compare the medians over several rounds;
an idle child process in place of the exporter moves them by about as much as noise does.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from polos import PolosClient

from . import workflows as w


def _start(export: bool) -> tuple[Path, str, subprocess.Popen[str], subprocess.Popen[bytes]]:
    """`polos up` in a fresh directory and a worker beside it."""
    d = Path(tempfile.mkdtemp(prefix="polos-up-export-"))
    env = {**os.environ, "POLOS_PREFIX": "upx", "PYTHONUNBUFFERED": "1"}
    env.pop("POLOS_NATS_URL", None)
    up = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "polos",
            "up",
            "--port",
            "0",
            "--no-auth",
            *([] if export else ["--no-export"]),
        ],
        cwd=d,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert up.stdout is not None
    url = next(m.group(1) for line in up.stdout if (m := re.search(r"NATS_URL=(\S+)", line)))
    worker = subprocess.Popen(
        [sys.executable, "-m", "polos", "worker", "polos_bench.workflows", "--nats-url", url],
        cwd=d,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return d, url, up, worker


def _stop(d: Path, up: subprocess.Popen[str], worker: subprocess.Popen[bytes]) -> None:
    worker.terminate()
    worker.wait()
    up.send_signal(signal.SIGINT)
    up.wait(30)
    shutil.rmtree(d, ignore_errors=True)


async def measure(export: bool, sequential: int, burst: int) -> tuple[float, float, float]:
    d, url, up, worker = _start(export)
    try:
        client = await PolosClient.connect(url, prefix="upx")
        try:
            while not any("bench_steps" in x.get("workflows", []) for x in await client.workers()):
                await asyncio.sleep(0.1)
            for _ in range(5):  # warm-up
                await (await client.start(w.bench_steps, w.Steps(steps=10))).result(timeout=30)
            took = []
            for _ in range(sequential):
                t0 = time.perf_counter()
                await (await client.start(w.bench_steps, w.Steps(steps=10))).result(timeout=30)
                took.append((time.perf_counter() - t0) * 1000)
            t0 = time.perf_counter()
            handles = await asyncio.gather(
                *(client.start(w.bench_steps, w.Steps(steps=10)) for _ in range(burst))
            )
            await asyncio.gather(*(h.result(timeout=300) for h in handles))
            rate = burst / (time.perf_counter() - t0)
        finally:
            await client.close()
        took.sort()
        return statistics.median(took), took[int(len(took) * 0.99) - 1], rate
    finally:
        _stop(d, up, worker)


async def main(rounds: int, sequential: int, burst: int) -> None:
    results: dict[bool, list[tuple[float, float, float]]] = {True: [], False: []}
    for i in range(rounds):
        for export in (False, True) if i % 2 == 0 else (True, False):
            r = await measure(export, sequential, burst)
            results[export].append(r)
            print(
                f"export {'on ' if export else 'off'}: p50 {r[0]:.2f} ms  p99 {r[1]:.2f} ms  "
                f"burst {r[2]:.0f} runs/s",
                flush=True,
            )
    for export in (False, True):
        rs = results[export]
        print(
            f"export {'on ' if export else 'off'}, medians of {rounds}: "
            f"p50 {statistics.median(r[0] for r in rs):.2f} ms, "
            f"p99 {statistics.median(r[1] for r in rs):.2f} ms, "
            f"burst {statistics.median(r[2] for r in rs):.0f} runs/s"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m polos_bench.up_export")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--sequential", type=int, default=200)
    parser.add_argument("--burst", type=int, default=1000)
    a = parser.parse_args()
    asyncio.run(main(a.rounds, a.sequential, a.burst))
