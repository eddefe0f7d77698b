"""The web UI's figures (BENCHMARKS.md): the runs page with 100,000 runs in the index, and the
delay from a run's ``RunCompleted`` to a browser showing it.

    python -m polos_bench.ui_bench [--runs 100000] [--requests 300] [--completions 40]

Everything runs here under authentication as `polos up` runs it: an embedded nats-server, the
index bucket filled with ``--runs`` entries as the orchestrator writes them, the UI as the
client role, and for the delay an orchestrator, a worker and Debian's chromium (Playwright's
driver) with the runs page open. Server time is the app's own ``Server-Timing``; wall time is
the client's, request to last byte, on the same machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import orjson

from polos import PolosClient, Worker, WorkflowContext, workflow
from polos._private.ops import auth
from polos._private.ops.server import EmbeddedServer, default_config
from polos._private.store import Names, connect, ensure_topology
from polos.config import Settings
from polos_ui import UIConfig, UIServer
from polos_ui.projection import Query, encode_key

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


async def _work(n: int) -> int:
    await asyncio.sleep(0.25)  # a step that takes a moment, so the claim's update is past
    return n + 1


@workflow
async def ui_bench_run(ctx: WorkflowContext, n: int) -> int:
    return await ctx.step.run("one", _work, n)


def _pct(values: list[float], p: float) -> float:
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))
    return values[k]


def _get(url: str, token: str) -> tuple[float, float, int]:
    req = urllib.request.Request(url, headers={"authorization": f"Bearer {token}"})
    started = time.perf_counter()
    with urllib.request.urlopen(req, timeout=30) as r:
        body = r.read()
        timing = r.headers.get("server-timing", "")
    wall = (time.perf_counter() - started) * 1000
    server = float(timing.split("dur=", 1)[1].split(",")[0]) if "dur=" in timing else float("nan")
    return server, wall, len(body)


async def fill_index(nc: Any, prefix: str, n: int, now: float) -> None:
    """``n`` index entries, newest ``now``: mostly completed, some failed, running, suspended."""
    statuses = ["completed"] * 14 + ["failed", "running", "suspended", "queued", "cancelled"]
    subject = f"$KV.{prefix}_runs."
    for start in range(0, n, 5000):
        for i in range(start, min(n, start + 5000)):
            status = statuses[i % len(statuses)]
            e: dict[str, Any] = {
                "run_id": f"b{i:07d}",
                "workflow": f"wf{i % 12}",
                "status": status,
                "created_at": now - (n - i) * 0.5,
                "updated_at": now - (n - i) * 0.5 + 0.2,
                "queue": f"q{i % 4}",
                "attempt": 1,
                "worker_id": "w-1",
                "seq": i + 1,
                "parent_run_id": None if i % 7 else f"b{max(0, i - 1):07d}",
                "ended_at": now - (n - i) * 0.5 + 0.2
                if status in ("completed", "failed")
                else None,
                "error": {"type": "ValueError", "message": "bad"} if status == "failed" else None,
                "waiting": {"step": "review", "kind": "suspend", "data": {"n": i}}
                if status == "suspended"
                else None,
            }
            await nc.publish(subject + e["run_id"], orjson.dumps(e))
        await nc.flush()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from polos_services.orchestrator import Orchestrator
    from polos_services.scheduler import Scheduler

    tmp = Path(tempfile.mkdtemp(prefix="polos-ui-bench-"))
    prefix = "uib"
    creds = auth.ensure_credentials(tmp / "credentials.json", [prefix])
    conf = auth.write_server_config(tmp / "nats-auth.conf", default_config(), creds)
    server = EmbeddedServer(tmp / "data", port=0, config=conf)
    server.start()
    figures: dict[str, Any] = {"runs_in_index": args.runs}

    def settings(role: str) -> Settings:
        return Settings(nats_url=auth.url_for(creds, f"{prefix}-{role}", server.url), prefix=prefix)

    services: list[Any] = []
    try:
        nc = await connect(settings("service"), name="ui-bench")
        js = nc.jetstream()
        await ensure_topology(js, Names(prefix), settings("service"))
        t = time.perf_counter()
        await fill_index(nc, prefix, args.runs, time.time() - 60)
        while (await js.stream_info(f"KV_{prefix}_runs")).state.messages < args.runs:
            await asyncio.sleep(0.1)
        figures["fill_seconds"] = round(time.perf_counter() - t, 2)
        await nc.close()

        ui = UIServer(
            UIConfig(settings=settings("client"), port=0, data_dir=tmp / "ui", live_interval=0.1)
        )
        t = time.perf_counter()
        await ui.start()
        assert ui.index is not None
        await ui.index.ready.wait()
        figures["index_load_seconds"] = round(time.perf_counter() - t, 2)
        services.append(ui)
        token = ui.secrets.token

        deep = ui.index.page(Query(limit=50))
        for _ in range(100):
            deep = ui.index.page(Query(limit=50, before=deep.older))
        pages = {
            "first screen": "/runs",
            "status=failed": "/runs?status=failed",
            "workflow=wf3 and status=suspended": "/runs?workflow=wf3&status=suspended",
            "last 1 h": "/runs?range=1h",
            "page 101 (cursor)": f"/runs?before={encode_key(deep.older)}",
            "run id prefix search": "/runs?q=b00999",
        }
        for name, path in pages.items():
            samples = [
                await asyncio.to_thread(_get, ui.base_url + path, token)
                for _ in range(args.requests)
            ]
            server_ms = [s for s, _, _ in samples[5:]]
            wall_ms = [w for _, w, _ in samples[5:]]
            figures[f"runs page, {name}"] = {
                "server_ms_p50": round(_pct(server_ms, 50), 2),
                "server_ms_p99": round(_pct(server_ms, 99), 2),
                "wall_ms_p50": round(_pct(wall_ms, 50), 2),
                "wall_ms_p99": round(_pct(wall_ms, 99), 2),
                "bytes": samples[-1][2],
            }
            print(name, figures[f"runs page, {name}"], flush=True)

        orch = Orchestrator(settings("service"))
        await orch.start()
        services.insert(0, orch)
        sched = Scheduler(settings("service"))
        await sched.start()
        services.insert(0, sched)
        worker = Worker([ui_bench_run], settings=settings("worker"))
        await worker.start()
        services.insert(0, worker)
        client = await PolosClient.connect(settings=settings("client"))
        delays = await _browser_delays(ui, client, args.completions)
        await client.close()
        if delays:
            figures["RunCompleted to the browser, ms"] = {
                "p50": round(_pct(delays, 50), 1),
                "p99": round(_pct(delays, 99), 1),
                "max": round(max(delays), 1),
                "mean": round(statistics.mean(delays), 1),
                "n": len(delays),
            }
            print("RunCompleted -> browser", figures["RunCompleted to the browser, ms"], flush=True)
    finally:
        for s in services:
            await s.stop()
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return figures


async def _browser_delays(ui: UIServer, client: PolosClient, n: int) -> list[float]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("no chromium: the RunCompleted -> browser figure is not measured", flush=True)
        return []
    from playwright.async_api import async_playwright

    from polos import history as ev

    delays: list[float] = []
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=chromium, headless=True, args=FLAGS)
        page = await browser.new_page()
        await page.goto(ui.login_url)
        await page.goto(f"{ui.base_url}/runs")
        # The moment (epoch ms) each run's row first shows "completed", seen from the page.
        await page.evaluate("""() => {
            window.__seen = {};
            const look = () => document.querySelectorAll('tr[data-status="completed"]').forEach(
                tr => { const id = tr.getAttribute('data-run');
                        if (!(id in window.__seen)) window.__seen[id] = Date.now(); });
            new MutationObserver(look).observe(document.body, {childList: true, subtree: true});
            look();
        }""")
        await asyncio.sleep(0.5)
        for i in range(n + 3):
            run_id = f"live{uuid.uuid4().hex[:10]}"
            h = await client.start(ui_bench_run, i, run_id=run_id)
            await h.result(timeout=30)
            history = await client.history(run_id)
            done_at = next(e.at for _, e in history if isinstance(e, ev.RunCompleted))
            deadline = time.monotonic() + 10
            seen = None
            while time.monotonic() < deadline:
                seen = await page.evaluate(f"window.__seen[{json.dumps(run_id)}]")
                if seen:
                    break
                await asyncio.sleep(0.01)
            if seen and i >= 3:  # the first ones warm the page and the connections up
                delays.append(seen - done_at * 1000)
            await asyncio.sleep(0.3)
        await browser.close()
    return delays


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=100_000)
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--completions", type=int, default=40)
    p.add_argument("--json", dest="json_path")
    args = p.parse_args()
    figures = asyncio.run(run(args))
    print(json.dumps(figures, indent=2))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
