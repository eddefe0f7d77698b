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

from polos import WorkflowContext, workflow
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


# --------------------------------------------------------------------------- the dry replay itself

SIDE_EFFECTS: list[str] = []


def effect(name: str) -> str:
    SIDE_EFFECTS.append(name)
    return name


def other_effect(name: str) -> str:
    SIDE_EFFECTS.append(f"other {name}")
    return name


@workflow(name="dry_branches")
async def dry_v1(ctx: WorkflowContext) -> str:
    async def branch(tag: str) -> None:
        await ctx.step.run(f"{tag}1", effect, tag)
        await ctx.step.run(f"{tag}2", effect, tag)

    await asyncio.gather(branch("a"), branch("b"))
    await ctx.step.suspend("approval")
    return "done"


@workflow(name="dry_branches")
async def dry_same(ctx: WorkflowContext) -> str:
    async def branch(tag: str) -> None:
        await ctx.step.run(f"{tag}1", effect, tag)
        await ctx.step.run(f"{tag}2", effect, tag)

    await asyncio.gather(branch("b"), branch("a"))  # other order, same steps: compatible
    await ctx.step.suspend("approval")
    await ctx.step.run("after", effect, "after")
    return "done"


@workflow(name="dry_branches")
async def dry_other_function(ctx: WorkflowContext) -> str:
    async def branch(tag: str) -> None:
        await ctx.step.run(f"{tag}1", effect, tag)
        await ctx.step.run(f"{tag}2", other_effect if tag == "b" else effect, tag)

    await asyncio.gather(branch("a"), branch("b"))
    await ctx.step.suspend("approval")
    return "done"


@workflow(name="dry_branches")
async def dry_returns_early(ctx: WorkflowContext) -> str:
    await ctx.step.run("a1", effect, "a")
    return "done"


@workflow(name="dry_branches")
async def dry_catches(ctx: WorkflowContext) -> str:
    try:
        await ctx.step.run("renamed", effect, "a")
    except Exception:
        pass  # swallows the NonDeterminismError: the check must not
    await ctx.step.suspend("approval")
    return "done"


@workflow(name="dry_branches")
async def dry_raises(ctx: WorkflowContext) -> str:
    raise KeyError("config 'region' is gone")


async def test_dry_replay_verdicts_on_branches_functions_and_odd_code(
    env_factory: Any, settings: Any
) -> None:
    from polos import Worker
    from polos._private.run.check import dry_replay
    from polos._private.store import load_state

    env = await env_factory([], with_worker=False)
    client = env.client
    async with Worker([dry_v1], settings=settings.worker):
        run_id = (await client.start("dry_branches")).run_id
        for _ in range(1500):
            if await _status(client, run_id) == "suspended":
                break
            await asyncio.sleep(0.02)
    assert sorted(SIDE_EFFECTS) == ["a", "a", "b", "b"]
    SIDE_EFFECTS.clear()
    state = await load_state(client.nc, client.names, run_id)
    before = len(await client.history(run_id))

    async def check(wf: Any) -> Any:
        return await dry_replay(
            js=client.js,
            nc=client.nc,
            names=client.names,
            settings=client.settings,
            workflow=wf,
            state=await load_state(client.nc, client.names, run_id),
            invoke=lambda exe: wf(WorkflowContext(exe)),
            timeout=10,
        )

    same = await check(dry_same)
    assert same.ok and "replays 4 recorded step(s)" in same.reason, same
    assert "'approval'" in same.reason  # it stopped at the step the run waits at

    other = await check(dry_other_function)
    assert not other.ok and other.step == "b2", other
    assert other.recorded == "run 'b2' (effect)" and "other_effect" in (other.new or ""), other

    early = await check(dry_returns_early)
    assert not early.ok and early.new == "the end of the workflow", early

    caught = await check(dry_catches)
    # The first divergence is reported, not the one that follows from the code going on.
    assert not caught.ok and caught.step == "a1" and "renamed" in (caught.new or ""), caught
    assert "'renamed'" in caught.reason and "'approval'" not in caught.reason, caught

    raised = await check(dry_raises)
    assert not raised.ok and raised.reason.startswith("KeyError"), raised

    assert SIDE_EFFECTS == []  # no step function ran in any of them
    assert len(await client.history(run_id)) == before
    assert state.status == "suspended"
