"""Retention: finished, exported runs leave the hot history stream; analytics keeps them."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import nats.js.errors
import pyarrow.parquet as pq

from polos import WorkflowContext, workflow
from polos._private.ops.retention import archive_exported_runs
from polos._private.store import payloads, read_history
from polos.errors import RunNotFoundError
from polos_analytics.export import Exporter, exported_upto

GATE: dict[str, asyncio.Event] = {}


async def hold(key: str) -> int:
    await GATE.setdefault(key, asyncio.Event()).wait()
    return 1


@workflow
async def retained(ctx: WorkflowContext, size: int) -> int:
    text = await ctx.step.run("make", lambda: "r" * size)
    if size == 0:
        await ctx.step.run("hold", hold, ctx.run_id)
    return len(text)


async def test_finished_exported_runs_leave_the_hot_stream(
    env_factory: Any, settings: Any, tmp_path: Path
) -> None:
    env = await env_factory([retained])
    client = env.client
    big = client.nc.max_payload + 100
    done = [await client.start(retained, n) for n in (5, big)]
    for h in done:
        await h.result(timeout=30)
    running = await client.start(retained, 0)  # blocks in a step: still running
    while (
        not await _exists(client, running.run_id)
        or (await client.get(running.run_id)).status != "running"
    ):
        await asyncio.sleep(0.02)
    while len(await client.list_runs(status="completed")) < 2:
        await asyncio.sleep(0.02)

    out = tmp_path / "export"
    async with Exporter(settings.service, out) as exporter:
        await exporter.export_once()
    upto = exported_upto(out / "history")
    late = await client.start(retained, 7)  # finishes after the export: not archivable yet
    await late.result(timeout=30)
    while len(await client.list_runs(status="completed")) < 3:
        await asyncio.sleep(0.02)

    names = client.names
    before = (await client.js.stream_info(names.runs_stream)).state.messages
    # Archiving purges histories: the service role's right (`polos retention` uses it).
    orch = env.orchestrator
    result = await archive_exported_runs(
        orch.nc, orch.js, names, exported_upto=upto, older_than=0.0
    )
    after = (await client.js.stream_info(names.runs_stream)).state.messages
    assert sorted(result.archived) == sorted(h.run_id for h in done)
    assert result.kept_not_exported == 1 and result.payload_objects_deleted == 1
    for h in done:
        assert await read_history(client.nc, names, h.run_id) == []
        try:
            await client.get(h.run_id)
            raise AssertionError("archived run still readable from the hot stream")
        except RunNotFoundError:
            pass
    obs = await payloads.store(client.js, names)
    try:
        left = [o.name for o in await obs.list(ignore_deletes=True)]
    except nats.js.errors.NotFoundError:  # nats-py's answer for an empty bucket
        left = []
    assert not [n for n in left if n.split("/")[0] in {h.run_id for h in done}]
    # Analytics still has every event of the archived runs, large output included.
    table = pq.read_table(out / "history").to_pylist()
    for h in done:
        rows = [r for r in table if r["run_id"] == h.run_id]
        assert {"RunRequested", "RunClaimed", "StepCompleted", "RunCompleted"} <= {
            r["type"] for r in rows
        }
    assert any(
        r["run_id"] == done[1].run_id and r["output"] and len(r["output"]) > big for r in table
    )
    # The run index keeps them, marked archived; unfinished and unexported runs are untouched.
    index = {r.run_id: r for r in await client.list_runs(limit=1000)}
    assert all(index[h.run_id].extra.get("archived") for h in done)
    assert (await client.get(running.run_id)).status == "running"
    assert (await client.get(late.run_id)).status == "completed"
    # A second pass finds nothing new to do.
    again = await archive_exported_runs(
        client.nc, client.js, names, exported_upto=upto, older_than=0.0
    )
    assert again.archived == []
    GATE.setdefault(running.run_id, asyncio.Event()).set()
    await running.result(timeout=10)
    print(
        f"\nretention: archived {len(result.archived)} runs, history stream {before} -> "
        f"{after} messages, {result.payload_objects_deleted} payload object deleted, "
        f"{result.seconds * 1000:.1f} ms"
    )


async def _exists(client: Any, run_id: str) -> bool:
    try:
        await client.get(run_id)
        return True
    except RunNotFoundError:
        return False


async def test_retention_command_dry_run(
    env_factory: Any, settings: Any, tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    import subprocess
    import sys

    env = await env_factory([retained])
    h = await env.client.start(retained, 3)
    await h.result(timeout=10)
    while not await env.client.list_runs(status="completed"):
        await asyncio.sleep(0.02)
    async with Exporter(settings.service, tmp_path / "x") as exporter:
        await exporter.export_once()
    out = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "polos",
            "retention",
            "--export-dir",
            str(tmp_path / "x"),
            "--older-than",
            "0",
            "--dry-run",
        ],
        env=subprocess_env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "would archive 1 runs" in out.stdout, out
    assert (await env.client.get(h.run_id)).status == "completed"  # a dry run changes nothing


async def test_big_event_objects_go_when_their_event_has_aged_out(env_factory: Any) -> None:
    env = await env_factory([retained])
    client = env.client
    names = client.names
    await client.publish_event("aging.big", "e" * (client.nc.max_payload + 10))
    obs = await payloads.store(client.js, names)
    [name] = [o.name for o in await obs.list(ignore_deletes=True)]
    assert name.startswith(payloads.EVENT_PREFIX)
    max_age = (await client.js.stream_info(names.events_stream)).config.max_age or 0.0
    assert max_age > 0
    # Archiving deletes objects: the service role's right (`polos retention` uses it).
    orch = env.orchestrator
    soon = await archive_exported_runs(
        orch.nc, orch.js, names, exported_upto=0, older_than=0.0, now=time.time() + max_age - 60
    )
    assert soon.payload_objects_deleted == 0
    later = await archive_exported_runs(
        orch.nc, orch.js, names, exported_upto=0, older_than=0.0, now=time.time() + max_age + 60
    )
    assert later.payload_objects_deleted == 1
    try:
        left = [o.name for o in await obs.list(ignore_deletes=True)]
    except nats.js.errors.NotFoundError:  # nats-py's answer for an empty bucket
        left = []
    assert left == []
