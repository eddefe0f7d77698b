"""Listing a bucket with more keys than the server answers in one multi-last direct get.

The server refuses a multi-last request matching more than 1,024 subjects (413, "Too Many
Results", whatever the batch size), so ``client.list_runs()`` (and everything listing a KV
bucket: `polos runs`, the workers, retention) failed once a namespace had that many runs in
its index. The listing now falls back to reading the bucket's messages.
"""

from __future__ import annotations

import asyncio

import orjson

from polos._private.store import connect, disconnect, kv_entries, publish
from polos.client import PolosClient
from polos.testing import RoleSettings

RUNS = 1_500  # past the server's 1,024 subjects per multi-last answer


async def _fill_index(settings: RoleSettings, n: int) -> None:
    """Index entries as the orchestrator writes them (the service role), some written twice
    and one deleted, so the listing must keep each key's last revision only."""
    nc = await connect(settings.service, "test-fill")
    try:
        bucket = f"$KV.{settings.prefix}_runs"
        sem = asyncio.Semaphore(200)

        async def put(i: int, status: str) -> None:
            entry = {"run_id": f"r{i}", "workflow": "wf", "status": status, "created_at": i}
            async with sem:
                await publish(nc, f"{bucket}.r{i}", orjson.dumps(entry), timeout=10)

        await asyncio.gather(*(put(i, "running") for i in range(n)))
        await asyncio.gather(*(put(i, "completed") for i in range(0, n, 2)))
        js = nc.jetstream()
        kv = await js.key_value(f"{settings.prefix}_runs")
        await kv.delete("r1")
    finally:
        await disconnect(nc)


async def test_list_runs_past_the_servers_multi_last_limit(settings: RoleSettings) -> None:
    await _fill_index(settings, RUNS)
    client = await PolosClient.connect(settings=settings)  # the client role
    try:
        runs = await client.list_runs(limit=10_000)
        assert len(runs) == RUNS - 1  # r1 was deleted
        assert len({r.run_id for r in runs}) == RUNS - 1
        assert "r1" not in {r.run_id for r in runs}
        by_id = {r.run_id: r for r in runs}
        assert by_id["r0"].status == "completed" and by_id["r3"].status == "running"
        assert [r.created_at for r in runs[:3]] == [RUNS - 1, RUNS - 2, RUNS - 3]  # newest first
        completed = await client.list_runs(status="completed", limit=10_000)
        assert len(completed) == RUNS // 2
        assert all(r.run_id in by_id for r in completed)
    finally:
        await client.close()


async def test_a_small_bucket_is_listed_the_same_way(settings: RoleSettings) -> None:
    """Below the limit the one-request path answers, with the same result shape."""
    await _fill_index(settings, 40)
    client = await PolosClient.connect(settings=settings)
    try:
        entries = await kv_entries(client.nc, f"{settings.prefix}_runs")
        assert sorted(e.key for e in entries) == sorted(f"r{i}" for i in range(40) if i != 1)
        last = {e.key: orjson.loads(e.value)["status"] for e in entries}
        assert last["r0"] == "completed" and last["r3"] == "running"
    finally:
        await client.close()
