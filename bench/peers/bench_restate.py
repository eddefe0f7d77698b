"""Restate: the 10-step no-op workflow on restate-server, measured by common.py.

Run in Restate's own venv (see README.md):
``/tmp/peers/restate/bin/python bench/peers/bench_restate.py --server PATH/restate-server``.

The server is the ``restate-server`` binary of the npm package ``@restatedev/restate-server``,
single node, its default configuration (``--dump-config``: the replicated loglet with
replication 1, RocksDB with ``rocksdb-disable-wal-fsync = false``, so a journal entry is
fsynced before it is acknowledged), on loopback ports picked here, telemetry off. The service
is the Python SDK (``restate-sdk``) served by hypercorn in a process of its own (this script
with ``--serve``): a handler whose ten steps are ``ctx.run_typed``. This process is the client,
over the ingress HTTP API: a sequential run is one call (``POST /bench/run``); a concurrent run
is a ``/send`` then an ``/attach`` to the invocation.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import common
import httpx
import restate

service = restate.Service("bench")


async def noop() -> float:
    return common.stamp()


@service.handler()
async def run(ctx: restate.Context, n: int) -> list[float]:
    return [await ctx.run_typed(f"s{i}", noop) for i in range(n)]


app = restate.app(services=[service])


async def serve(port: int) -> None:
    from hypercorn.asyncio import serve as hypercorn_serve
    from hypercorn.config import Config

    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.loglevel = "WARNING"
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await hypercorn_serve(app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]


def server_binary(explicit: str | None) -> str:
    found = explicit or os.environ.get("RESTATE_SERVER") or shutil.which("restate-server")
    if not found or not Path(found).exists():
        raise SystemExit(
            "restate-server not found: pass --server (npm i @restatedev/restate-server, README.md)"
        )
    return found


class RestatePeer(common.Peer):
    name = "Restate"
    durability = (
        "single node, defaults: replicated loglet (replication 1) on RocksDB, WAL "
        "fsynced before the ack"
    )

    def __init__(self, binary: str) -> None:
        self.binary = binary
        out = subprocess.run([binary, "--version"], capture_output=True, text=True)
        self.version = (
            f"server {out.stdout.strip().removeprefix('restate-server ')}, Python SDK "
            f"{importlib.metadata.version('restate-sdk')}"
        )
        self.procs: list[subprocess.Popen[bytes]] = []

    async def setup(self, tmp: Path) -> None:
        ingress, admin, fabric, svc = (common.free_port() for _ in range(4))
        env = dict(
            os.environ,
            RESTATE_INGRESS__BIND_PORT=str(ingress),
            RESTATE_ADMIN__BIND_PORT=str(admin),
            RESTATE_DISABLE_TELEMETRY="true",
            RESTATE_LOG_FILTER="warn",
        )
        log, slog = tmp / "restate-server.log", tmp / "restate-service.log"
        self.procs.append(
            common.spawn(
                [
                    self.binary,
                    "--no-logo",
                    "--base-dir",
                    str(tmp / "restate"),
                    "--node-name",
                    "n1",
                    "--listen-mode",
                    "tcp",
                    "--bind-ip",
                    "127.0.0.1",
                    "--bind-port",
                    str(fabric),
                ],
                log,
                env,
            )
        )
        self.procs.append(common.spawn([sys.executable, __file__, "--serve", str(svc)], slog))
        self.http = httpx.AsyncClient(
            timeout=120,
            limits=httpx.Limits(
                max_connections=common.START_IN_FLIGHT * 2, max_keepalive_connections=64
            ),
        )
        self.ingress = f"http://127.0.0.1:{ingress}"
        admin_url = f"http://127.0.0.1:{admin}"
        deadline = time.monotonic() + 60
        while True:  # the server answers, then takes the service's deployment
            try:
                r = await self.http.post(
                    f"{admin_url}/deployments", json={"uri": f"http://127.0.0.1:{svc}"}
                )
                if r.status_code < 300:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"restate did not start: see {log}, {slog}")
            await asyncio.sleep(0.5)
        while True:  # the ingress knows the service (it learns deployments asynchronously)
            with contextlib.suppress(httpx.HTTPError):
                r = await self.http.post(f"{self.ingress}/bench/run", json=1)
                if r.status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"restate ingress never served bench/run: see {log}")
            await asyncio.sleep(0.5)

    async def teardown(self) -> None:
        with contextlib.suppress(Exception):
            await self.http.aclose()
        common.stop(self.procs)

    async def call(self, run_id: str) -> Any:
        r = await self.http.post(
            f"{self.ingress}/bench/run", json=common.STEPS, headers={"idempotency-key": run_id}
        )
        r.raise_for_status()
        return r.json()

    async def start(self, run_id: str) -> Any:
        r = await self.http.post(
            f"{self.ingress}/bench/run/send", json=common.STEPS, headers={"idempotency-key": run_id}
        )
        r.raise_for_status()
        return r.json()["invocationId"]

    async def wait(self, handle: Any) -> Any:
        r = await self.http.get(f"{self.ingress}/restate/invocation/{handle}/attach")
        r.raise_for_status()
        return r.json()


def extra(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", help="the restate-server binary (default: $RESTATE_SERVER, PATH)")
    p.add_argument("--serve", metavar="PORT", type=int, help=argparse.SUPPRESS)


if __name__ == "__main__":
    if "--serve" in sys.argv:
        asyncio.run(serve(int(sys.argv[sys.argv.index("--serve") + 1])))
    else:
        common.main(lambda a: RestatePeer(server_binary(a.server)), extra)
