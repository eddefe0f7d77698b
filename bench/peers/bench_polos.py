"""Polos as a user runs it, measured by common.py exactly as the peers are.

Run in Polos's own environment (the repository's ``.venv``)::

    .venv/bin/python bench/peers/bench_polos.py                  # shipped nats.conf (sync 10 s)
    .venv/bin/python bench/peers/bench_polos.py --sync always    # fsync before every ack
    .venv/bin/python bench/peers/bench_polos.py --cluster        # 3-node loopback cluster, R3

``polos up --no-auth`` (its defaults otherwise: the embedded nats-server with the shipped
nats.conf, the orchestrator, the scheduler, the analytics export and the UI), one
``polos worker polos_bench.workflows`` process, and this process as the client
(``client.start`` then ``handle.result()``). With ``--cluster`` the three nodes of
``polos._private.ops.cluster`` run on free loopback ports, ``polos up`` runs the services only
against them, and every process has ``POLOS_REPLICAS=3``.

Beside the fsync floor it prints the awaited JetStream publish p50 on the same server (a stream
of the same replicas and storage): the floor ``python -m bench`` divides by.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import common
import nats
from nats.js.api import StorageType, StreamConfig

import polos
from polos import PolosClient
from polos._private.ops.cluster import LocalCluster
from polos._private.ops.server import with_sync
from polos.config import Settings
from polos_bench import workflows as w


class PolosPeer(common.Peer):
    name = "Polos"
    version = polos.__version__ if hasattr(polos, "__version__") else "dev"

    def __init__(self, sync: str | None, cluster: bool) -> None:
        self.sync = sync
        self.cluster = cluster
        self.nodes: LocalCluster | None = None
        self.procs: list[subprocess.Popen[bytes]] = []
        if cluster:
            self.durability = (
                f"3-node cluster, R3 streams: acked once a quorum stored it; sync "
                f"{sync or 'the server default (2 min)'}"
            )
        elif sync == "always":
            self.durability = "single node, sync_interval always: fsync before every ack"
        else:
            self.durability = "single node, shipped nats.conf: fsync every 10 s"

    def _spawn(
        self, tmp: Path, name: str, *args: str, env: dict[str, str]
    ) -> subprocess.Popen[bytes]:
        log = open(tmp / f"{name}.log", "wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "polos", *args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    async def setup(self, tmp: Path) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        for k in ("POLOS_NATS_URL", "POLOS_REPLICAS", "POLOS_SYNC", "POLOS_PREFIX"):
            env.pop(k, None)
        data = tmp / "up"
        up_args = ["up", "--no-auth", "--data-dir", str(data), "--port", "0", "--ui-port", "0"]
        if self.cluster:
            self.nodes = LocalCluster(tmp / "cluster")
            if self.sync:
                for n in self.nodes.nodes:
                    n.server.config.write_text(with_sync(n.server.config.read_text(), self.sync))
            env.update(POLOS_NATS_URL=self.nodes.start(), POLOS_REPLICAS="3")
            await self.nodes.wait_ready()
        elif self.sync:
            up_args += ["--sync", self.sync]
        up = self._spawn(tmp, "polos-up", *up_args, env=env)
        self.url = await asyncio.to_thread(self._wait_up, tmp / "polos-up.log", up)
        self._spawn(
            tmp, "polos-worker", "worker", "polos_bench.workflows", "--data-dir", str(data), env=env
        )
        self.settings = Settings(nats_url=self.url, replicas=3 if self.cluster else 1)
        self.client = await PolosClient.connect(settings=self.settings)
        deadline = time.monotonic() + 60
        while not await self.client.workers():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not come up: see {tmp / 'polos-worker.log'}")
            await asyncio.sleep(0.2)

    @staticmethod
    def _wait_up(log: Path, proc: subprocess.Popen[bytes]) -> str:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            m = re.search(r"Polos is up: NATS_URL=(\S+)", log.read_text(errors="replace"))
            if m:
                return m.group(1)
            if proc.poll() is not None:
                raise RuntimeError(f"polos up exited: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        raise TimeoutError(f"polos up did not come up: see {log}")

    async def floors(self) -> dict[str, float]:
        nc = await nats.connect(servers=self.url.split(","))
        js = nc.jetstream()
        name = f"PEERFLOOR{os.getpid()}"
        await js.add_stream(
            StreamConfig(
                name=name,
                subjects=[f"peerfloor{os.getpid()}"],
                storage=StorageType.FILE,
                num_replicas=self.settings.replicas,
            )
        )
        times = []
        try:
            for i in range(550):
                t0 = time.perf_counter()
                await js.publish(
                    f"peerfloor{os.getpid()}", b"x" * 60, headers={"Nats-Msg-Id": str(i)}
                )
                times.append((time.perf_counter() - t0) * 1000)
        finally:
            await js.delete_stream(name)
            await nc.close()
        return {"awaited JetStream publish p50": statistics.median(times[50:])}

    async def teardown(self) -> None:
        with contextlib.suppress(Exception):
            await self.client.close()
        for p in reversed(self.procs):  # the worker, then polos up (which stops its server)
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        if self.nodes is not None:
            self.nodes.stop()

    async def start(self, run_id: str) -> Any:
        return await self.client.start(w.stamped_steps, w.Steps(steps=common.STEPS), run_id=run_id)

    async def wait(self, handle: Any) -> Any:
        return await handle.result(timeout=600)


def extra(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--sync",
        choices=("always", "interval"),
        default=None,
        help="`polos up --sync`: always = fsync before every ack (default: as shipped)",
    )
    p.add_argument("--cluster", action="store_true", help="3-node loopback cluster, R3 streams")


def mode(a: argparse.Namespace) -> str:
    parts = ["3-node R3 cluster"] if a.cluster else []
    parts.append(
        f"sync {a.sync}"
        if a.sync
        else ("sync server default" if a.cluster else "sync interval 10 s")
    )
    return ", ".join(parts)


if __name__ == "__main__":
    common.main(lambda a: PolosPeer(a.sync, a.cluster), extra, mode)
