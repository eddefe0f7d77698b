"""``polos check-deploy MODULE`` as a user runs it before a deploy: runs suspended (and one still
running) on a real worker process under auth, then the command, as the client role, against
changed code. It runs no step and appends nothing; its verdicts are then borne out by real
workers running the new code."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import orjson
import pytest

from polos.errors import WorkflowFailedError
from polos.testing import as_role
from tests.helpers import kill, marks, spawn, until
from tests.test_cli import apolos

pytestmark = pytest.mark.slow


async def _status(client: Any, run_id: str) -> str:
    try:
        return str((await client.get(run_id)).status)
    except Exception:
        return "unknown"  # the orchestrator has not recorded the start yet


async def _counts(client: Any, run_ids: list[str]) -> tuple[list[int], list[int]]:
    """Each run's history length, and every stream's message count (as the service role)."""
    import nats

    histories = [len(await client.history(r)) for r in run_ids]
    nc = await nats.connect(as_role(client.settings, "service").nats_url)
    try:
        js = nc.jetstream()
        names = client.names
        streams = [
            names.runs_stream,
            names.cmd_stream,
            names.tasks_stream,
            names.events_stream,
            names.timers_stream,
            names.dlq_stream,
        ]
        totals = [(await js.stream_info(s)).state.messages for s in streams]
    finally:
        await nc.close()
    return histories, totals


async def test_check_deploy_finds_the_runs_a_deploy_would_break_and_touches_nothing(
    env_factory: Any, subprocess_env: Any, tmp_path: Path
) -> None:
    log = tmp_path / "marks.log"
    subprocess_env["POLOS_TEST_LOG"] = str(log)
    env = await env_factory([], with_worker=False)
    client = env.client
    w1 = spawn(
        ["-m", "polos", "worker", "tests.workflows.deploy_v1"],
        subprocess_env.as_role("worker"),
        tmp_path / "w1.out",
    )
    workers = [w1]
    try:
        waiting = [(await client.start("deploy_check", {"id": i})).run_id for i in (1, 2)]
        running = (await client.start("deploy_slow", 120)).run_id
        for run_id in waiting:
            for _ in range(1500):
                if await _status(client, run_id) == "suspended":
                    break
                await asyncio.sleep(0.02)
        await until(lambda: "slow start" in marks(log), 30, "the slow step")
        assert [await _status(client, r) for r in waiting] == ["suspended", "suspended"]
        assert await _status(client, running) == "running"

        runs = [*waiting, running]
        before = await _counts(client, runs)
        marks_before = marks(log)

        async def check(module: str, *extra: str) -> Any:
            return await apolos(
                "check-deploy", f"tests/workflows/{module}.py", *extra, env=subprocess_env
            )

        same = await check("deploy_v1")
        assert same.returncode == 0, same.stdout + same.stderr
        assert "3 run(s) in flight checked" in same.stdout and "0 would fail" in same.stdout
        assert "FAILS" not in same.stdout

        renamed = await check("deploy_renamed")
        assert renamed.returncode == 1, renamed.stdout + renamed.stderr
        assert "2 would fail, 1 replay cleanly" in renamed.stdout
        for run_id in waiting:
            row = next(ln for ln in renamed.stdout.splitlines() if ln.startswith(run_id))
            assert "FAILS" in row and "reserve" in row and "reserve_stock" in row, row
        ok_row = next(ln for ln in renamed.stdout.splitlines() if ln.startswith(running))
        assert re.search(r"\bok\b", ok_row) and "FAILS" not in ok_row, ok_row

        as_json = [
            orjson.loads(ln) for ln in (await check("deploy_renamed", "--json")).stdout.splitlines()
        ]
        failing = {v["run_id"]: v for v in as_json if not v["ok"]}
        assert set(failing) == set(waiting)
        assert failing[waiting[0]]["step"] == "reserve"
        assert failing[waiting[0]]["recorded"].startswith("run ")
        assert "reserve_stock" in failing[waiting[0]]["new"]
        assert "incompatibly" in failing[waiting[0]]["reason"]

        reordered = await check("deploy_reordered")
        assert reordered.returncode == 1, reordered.stdout
        for run_id in waiting:
            row = next(ln for ln in reordered.stdout.splitlines() if ln.startswith(run_id))
            assert "FAILS" in row and "approval" in row and "ship" in row, row

        added = await check("deploy_added")
        assert added.returncode == 1 and "2 would fail" in added.stdout, added.stdout
        assert "fraud_check" in added.stdout

        patched = await check("deploy_patched")
        assert patched.returncode == 0, patched.stdout + patched.stderr
        assert "0 would fail, 3 replay cleanly" in patched.stdout

        # Nothing ran, nothing was written: the same marks, histories and streams.
        assert marks(log) == marks_before
        assert await _counts(client, runs) == before
        assert await _status(client, running) == "running"

        # The verdicts hold: the renamed code fails a run it said would fail, the patched code
        # finishes a run it said would pass.
        kill(w1)
        w2 = spawn(
            ["-m", "polos", "worker", "tests.workflows.deploy_renamed"],
            subprocess_env.as_role("worker"),
            tmp_path / "w2.out",
        )
        workers.append(w2)
        await client.resume(waiting[0], "approval", {"ok": True})
        with pytest.raises(WorkflowFailedError) as info:
            await client.get_handle(waiting[0]).result(timeout=60)
        assert info.value.error_type == "NonDeterminismError"
        kill(w2)
        w3 = spawn(
            ["-m", "polos", "worker", "tests.workflows.deploy_patched"],
            subprocess_env.as_role("worker"),
            tmp_path / "w3.out",
        )
        workers.append(w3)
        await client.resume(waiting[1], "approval", {"ok": True})
        assert await client.get_handle(waiting[1]).result(timeout=60) == "shipped"
        assert "fraud_check" not in marks(log)  # the old run kept the old path
    finally:
        for w in workers:
            if w.poll() is None:
                kill(w)


async def test_check_deploy_with_nothing_in_flight_and_a_bad_module(
    subprocess_env: Any,
) -> None:
    out = await apolos("check-deploy", "tests/workflows/deploy_v1.py", env=subprocess_env)
    assert out.returncode == 0, out.stderr
    assert "0 run(s) in flight checked" in out.stdout
    bad = await apolos("check-deploy", "tests/workflows/nope.py", env=subprocess_env)
    assert bad.returncode == 2 and "no such file" in bad.stderr
