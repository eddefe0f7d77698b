"""Figures for docs/waiting.md: pending-timer capacity, timer accuracy, resume latency.

    python -m polos_bench.timers --timers 200000 --runs 30

Starts its own nats-server (temp dir) so the numbers are not mixed with anything else.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from polos import WorkflowContext, workflow
from polos._private.ops.server import EmbeddedServer
from polos._private.run.timers import schedule_timer
from polos.testing import PolosEnvironment, fast_settings


@workflow(name="bench_wait")
async def bench_wait(ctx: WorkflowContext, mode: str) -> str:
    if mode == "sleep":
        await ctx.step.sleep("nap", 1.0)
    else:
        await ctx.step.suspend("approval")
    await ctx.step.now("after")
    return "ok"


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def pending_timers(n: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        server = EmbeddedServer(Path(d) / "nats", port=0)
        server.start()
        try:
            settings = fast_settings(server.url)
            async with PolosEnvironment(settings, []) as env:
                js, names = env.client.js, env.client.names
                assert server.proc is not None
                pid = server.proc.pid
                rss0 = _rss_mb(pid)
                due = time.time() + 86400
                t0 = time.perf_counter()
                batch: list[Any] = []
                for i in range(n):
                    batch.append(
                        schedule_timer(
                            js,
                            names,
                            f"r{i:08d}",
                            1,
                            due + i % 3600,
                            {"kind": "wake", "step": "nap", "wait_kind": "sleep", "workflow": "w"},
                        )
                    )
                    if len(batch) == 2000:
                        await asyncio.gather(*batch)
                        batch.clear()
                await asyncio.gather(*batch)
                took = time.perf_counter() - t0
                info = await js.stream_info(names.timers_stream)
                rss1 = _rss_mb(pid)
                per = info.state.bytes / max(1, info.state.messages)
                print(f"{n} pending timers armed in {took:.1f} s ({n / took:,.0f}/s)")
                print(
                    f"  stream: {info.state.messages} msgs, {info.state.bytes / 1e6:.1f} MB "
                    f"({per:.0f} B/timer) -> 1M timers ~ {per:.0f} MB on disk"
                )
                print(
                    f"  nats-server RSS: {rss0:.0f} MB -> {rss1:.0f} MB "
                    f"(~{(rss1 - rss0) / n * 1e6:.0f} MB per 1M timers)"
                )
                await asyncio.sleep(10)
                print(f"  nats-server RSS 10 s later: {_rss_mb(pid):.0f} MB")
                # One more timer, due soon, among all of them: still on time?
                t_due = time.time() + 1.2
                await schedule_timer(
                    js,
                    names,
                    "probe",
                    1,
                    t_due,
                    {"kind": "wake", "step": "x", "wait_kind": "sleep"},
                )
                sched = env.scheduler
                while not sched.lateness_ms:
                    await asyncio.sleep(0.01)
                print(f"  a timer due among them fired {sched.lateness_ms[-1]:.1f} ms late")
        finally:
            server.stop()


async def latencies(runs: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        server = EmbeddedServer(Path(d) / "nats", port=0)
        server.start()
        try:
            settings = fast_settings(server.url)
            async with PolosEnvironment(settings, [bench_wait]) as env:
                c = env.client
                resume_ms: list[float] = []
                for _ in range(runs):
                    h = await c.start(bench_wait, "suspend")
                    while await _status(c, h.run_id) != "suspended":
                        await asyncio.sleep(0.005)
                    t0 = time.time()
                    await c.resume(h.run_id, "approval", {"ok": True})
                    await h.result(timeout=30)
                    hist = await c.history(h.run_id)
                    claim = [e for _, e in hist if type(e).__name__ == "RunClaimed"][-1]
                    resume_ms.append((claim.at - t0) * 1000)
                print(
                    f"resume latency (client publishes resume -> worker claims the run and runs "
                    f"the next step), {runs} runs: p50 {statistics.median(resume_ms):.1f} ms, "
                    f"p90 {sorted(resume_ms)[int(runs * 0.9) - 1]:.1f} ms, max {max(resume_ms):.1f} ms"
                )
                handles = [await c.start(bench_wait, "sleep") for _ in range(runs)]
                for h in handles:
                    await h.result(timeout=60)
                late = env.scheduler.lateness_ms
                print(
                    f"timer accuracy (wake appended - due), {len(late)} sleeps of 1 s: "
                    f"p50 {statistics.median(late):.1f} ms, max {max(late):.1f} ms"
                )
        finally:
            server.stop()


async def _status(c: Any, run_id: str) -> str:
    try:
        return str((await c.get(run_id)).status)
    except Exception:
        return "unknown"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--timers", type=int, default=100_000)
    p.add_argument("--runs", type=int, default=30)
    args = p.parse_args()
    if args.runs:
        asyncio.run(latencies(args.runs))
    if args.timers:
        asyncio.run(pending_timers(args.timers))


if __name__ == "__main__":
    main()
