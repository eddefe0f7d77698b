"""Analytics against a real nats-server: export to Parquet (incremental, idempotent, tolerant of
garbage), follow mode, the DuckDB views, the CLI (export, sql, trace), and every query that
docs/observability.md documents."""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import time
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import polos_analytics as analytics
from polos import NO_RETRY, RetryPolicy, WorkflowContext, workflow
from polos import history as ev
from polos._private.store import Names, append, load_state
from polos.cli.trace import cmd_trace
from polos_analytics.commands import cmd_analytics, cmd_sql
from polos_analytics.export import Exporter
from tests.helpers import until
from tests.test_analytics_workflows import plain_steps, support_agent

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "observability.md"

_FLAKY: dict[str, int] = {}


def flaky_once(key: str) -> str:
    _FLAKY[key] = _FLAKY.get(key, 0) + 1
    if _FLAKY[key] == 1:
        raise ConnectionError("first call fails")
    return "ok"


def always_fails() -> None:
    raise ValueError("card declined")


@workflow
async def retried(ctx: WorkflowContext, key: str) -> str:
    return await ctx.step.run(
        "call", flaky_once, key, retry=RetryPolicy(max_attempts=3, initial_interval=0.01)
    )


@workflow
async def failing(ctx: WorkflowContext) -> None:
    await ctx.step.run("charge", always_fails, retry=NO_RETRY)


async def _populate(env: Any) -> dict[str, str]:
    """One agent run, one plain run, one retried step, one failed run, one external event."""
    runs = {}
    h = await env.client.start(support_agent, "o-1")
    assert await h.result(timeout=15) == "Refunded 40."
    runs["agent"] = h.run_id
    h = await env.client.start(plain_steps, 3)
    assert await h.result(timeout=15) == 3
    runs["plain"] = h.run_id
    h = await env.client.start(retried, f"k-{time.time()}")
    assert await h.result(timeout=15) == "ok"
    runs["retried"] = h.run_id
    h = await env.client.start(failing)
    with pytest.raises(Exception, match="card declined"):
        await h.result(timeout=15)
    runs["failed"] = h.run_id
    await env.client.js.publish(
        env.orchestrator.names.event_subject("warehouse.pickup"), orjson.dumps({"order": "o-1"})
    )
    return runs


def _files(directory: Path) -> dict[str, float]:
    return {str(p.relative_to(directory)): p.stat().st_mtime for p in directory.rglob("*.parquet")}


async def _stream_count(env: Any, stream: str) -> int:
    info = await env.client.js.stream_info(stream)
    return int(info.state.messages)


async def test_export_is_incremental_and_idempotent(env_factory: Any, tmp_path: Path) -> None:
    env = await env_factory([support_agent, plain_steps, retried, failing])
    runs = await _populate(env)
    out = tmp_path / "export"
    async with Exporter(env.as_role("service"), out) as exporter:
        first = await exporter.export_once()
        history_total = await _stream_count(env, env.orchestrator.names.runs_stream)
        assert first.rows["history"] == history_total
        assert first.rows["external_events"] == 1
        files = _files(out)
        # Twice: nothing new, nothing rewritten.
        again = await exporter.export_once()
        assert again.total == 0
        assert _files(out) == files
        # New messages: only they are exported, into a new file.
        h = await env.client.start(plain_steps, 2)
        await h.result(timeout=15)
        more = await exporter.export_once()
        assert more.rows["history"] == 5  # requested, claimed, 2 steps, completed
    # A new exporter (a restart) starts where the files end.
    async with Exporter(env.as_role("service"), out) as restarted:
        assert (await restarted.export_once()).total == 0
    seqs = [
        s
        for f in sorted((out / "history").glob("*.parquet"))
        for s in pq.read_table(f, columns=["seq"]).column("seq").to_pylist()
    ]
    assert seqs == sorted(set(seqs)) and len(seqs) == history_total + 5
    con = analytics.connect(out)
    status = dict(con.execute("select run_id, status from runs").fetchall())
    assert status[runs["agent"]] == "completed"
    assert status[runs["failed"]] == "failed"
    assert status[h.run_id] == "completed"


async def test_views_over_agent_records(env_factory: Any, tmp_path: Path) -> None:
    env = await env_factory([support_agent, plain_steps, retried, failing])
    runs = await _populate(env)
    out = tmp_path / "export"
    async with Exporter(env.as_role("service"), out) as exporter:
        await exporter.export_once()
    con = analytics.connect(out)
    agent = runs["agent"]

    row = con.execute(
        f"select workflow, status, attempts, steps, output::VARCHAR from runs "
        f"where run_id = '{agent}'"
    ).fetchone()
    assert row == ("support_agent", "completed", 1, 5, '"Refunded 40."')

    llm = con.execute(
        f"select key, model, agent, prompt_tokens, completion_tokens, cost_usd, "
        f"n_tool_calls, n_messages from llm_calls where run_id = '{agent}' "
        f"order by seq"
    ).fetchall()
    assert llm == [
        ("llm:1", "dev-small", "support", 100, 20, 0.001, 1, 2),
        ("llm:2", "dev-small", "support", 180, 25, 0.002, 1, 4),
        ("llm:3", "dev-small", "support", 220, 10, 0.003, 0, 6),
    ]
    tools = con.execute(
        f"select tool, decision, tool_call_id, arguments::VARCHAR, error "
        f"from tool_calls where run_id = '{agent}' order by seq"
    ).fetchall()
    assert tools == [
        ("lookup_order", "llm:1", "call_1", '{"order_id":"o-1"}', None),
        ("refund", "llm:2", "call_2", '{"amount":40}', None),
    ]
    decisions = con.execute(
        f"select decision, chosen_tool, tools_offered, alternatives, reason, "
        f"tool_step from decisions where run_id = '{agent}' "
        f"order by seq"
    ).fetchall()
    assert decisions == [
        (
            "llm:1",
            "lookup_order",
            ["lookup_order", "refund", "escalate"],
            ["refund", "escalate"],
            "check order state before refund",
            "tool:lookup_order",
        ),
        (
            "llm:2",
            "refund",
            ["lookup_order", "refund", "escalate"],
            ["lookup_order", "escalate"],
            "Delivered and under 50: refund.",
            "tool:refund",
        ),
    ]
    cost = con.execute(
        f"select llm_calls, prompt_tokens, completion_tokens, total_tokens, "
        f"round(cost_usd, 6) from costs where run_id = '{agent}'"
    ).fetchone()
    assert cost == (3, 500, 55, 555, 0.006)

    retried_step = con.execute(
        f"select attempts, status from steps where run_id = '{runs['retried']}'"
    ).fetchone()
    assert retried_step == (2, "completed")
    failed = con.execute(
        f"select status, error->>'message' from runs where run_id = '{runs['failed']}'"
    ).fetchone()
    assert failed is not None and failed[0] == "failed" and "card declined" in failed[1]
    topics = con.execute("select topic, data::JSON->>'order' from external_events").fetchall()
    assert topics == [("warehouse.pickup", "o-1")]
    starts = con.execute(
        "select topic from commands where topic like 'start.%' order by seq"
    ).fetchall()
    assert starts == [
        ("start.support_agent",),
        ("start.plain_steps",),
        ("start.retried",),
        ("start.failing",),
    ]


async def test_garbage_on_the_log_does_not_stop_the_export(
    env_factory: Any, tmp_path: Path
) -> None:
    env = await env_factory([plain_steps])
    names = env.orchestrator.names
    js = env.orchestrator.js  # junk in a history comes from a writer of histories, not a client
    await js.publish(names.run_subject("junkrun", "step"), b"\x00\xffnot json")
    await js.publish(
        names.run_subject("junkrun", "ctl"), b'{"t": "FutureEvent", "run_id": "junkrun", "x": 1}'
    )
    await js.publish(names.event_subject("raw.text"), b"plain text, not JSON")
    h = await env.client.start(plain_steps, 1)
    await h.result(timeout=15)
    out = tmp_path / "export"
    async with Exporter(env.as_role("service"), out) as exporter:
        result = await exporter.export_once()
    assert result.rows["history"] == 2 + 4
    con = analytics.connect(out)
    types = dict(con.execute("select type, count(*) from events group by type").fetchall())
    assert types["<undecodable>"] == 1 and types["FutureEvent"] == 1
    assert con.execute("select data from external_events").fetchone() == ('"plain text, not JSON"',)
    # The views still work with the odd rows in them.
    assert con.execute(f"select status from runs where run_id = '{h.run_id}'").fetchone() == (
        "completed",
    )


async def test_views_work_before_anything_is_exported(tmp_path: Path) -> None:
    con = analytics.connect(tmp_path / "nothing-yet")
    for view in analytics.VIEW_NAMES:
        assert con.execute(f"select count(*) from {view}").fetchone() == (0,)


async def test_follow_mode_exports_as_runs_happen(env_factory: Any, tmp_path: Path) -> None:
    env = await env_factory([plain_steps])
    out = tmp_path / "export"
    stop = asyncio.Event()
    exported: list[int] = []
    async with Exporter(env.as_role("service"), out) as exporter:
        task = asyncio.create_task(
            exporter.follow(
                stop, flush_interval=0.05, on_export=lambda r: exported.append(r.rows["history"])
            )
        )
        handles = []
        for n in (1, 2):
            h = await env.client.start(plain_steps, n)
            await h.result(timeout=15)
            handles.append(h)

        def done_on_disk() -> bool:
            if not (out / "history").is_dir():
                return False
            con = analytics.connect(out)
            return con.execute(
                "select count(*) from runs where status = 'completed'"
            ).fetchone() == (2,)

        await until(done_on_disk, 20, "both runs in the Parquet export")
        stop.set()
        await asyncio.wait_for(task, 10)
    assert sum(exported) == await _stream_count(env, env.orchestrator.names.runs_stream)
    print(f"\nfollow mode wrote {len(exported)} export batches: {exported}")


def _doc_queries() -> list[str]:
    text = DOC.read_text()
    return [q.strip() for q in re.findall(r"```sql\n(.*?)```", text, flags=re.S)]


async def test_documented_queries_run_and_answer(env_factory: Any, tmp_path: Path) -> None:
    queries = _doc_queries()
    assert len(queries) >= 8, "docs/observability.md lost its queries"
    env = await env_factory([support_agent, plain_steps, retried, failing])
    await _populate(env)
    out = tmp_path / "export"
    async with Exporter(env.as_role("service"), out) as exporter:
        await exporter.export_once()
    con = analytics.connect(out)
    for q in queries:
        rows = con.execute(q).fetchall()
        assert rows, f"documented query returned nothing:\n{q}"


def _args(env: Any, role: str = "client", **kw: Any) -> argparse.Namespace:
    """The flags of a CLI command run as ``role`` (its URL carries that role's user)."""
    return argparse.Namespace(nats_url=env.as_role(role).nats_url, prefix=env.settings.prefix, **kw)


async def test_cli_export_sql_and_trace(
    env_factory: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = await env_factory([support_agent, plain_steps, retried, failing])
    runs = await _populate(env)
    out = tmp_path / "export"
    args = _args(
        env,
        "service",
        action="export",
        dir=str(out),
        follow=False,
        flush_interval=1.0,
        rows_per_file=100_000,
    )
    assert await cmd_analytics(args) == 0
    printed = capsys.readouterr().out
    assert "events/s" in printed, printed
    assert await cmd_analytics(args) == 0
    assert "exported 0 rows" in capsys.readouterr().out

    assert (
        await cmd_sql(
            argparse.Namespace(
                query="select chosen_tool, alternatives from decisions order by seq",
                dir=str(out),
                format="json",
                max_rows=10,
            )
        )
        == 0
    )
    rows = orjson.loads(capsys.readouterr().out)
    assert [r["chosen_tool"] for r in rows] == ["lookup_order", "refund"]
    assert (
        await cmd_sql(
            argparse.Namespace(
                query="select nonsense from nowhere", dir=str(out), format="table", max_rows=10
            )
        )
        == 2
    )
    assert "error" in capsys.readouterr().err

    assert await cmd_trace(_args(env, "service", run_id=runs["agent"])) == 0
    tree = capsys.readouterr().out
    print(tree)
    assert "support_agent  completed" in tree
    assert "tokens 555  cost $0.0060" in tree
    assert "decision: chose lookup_order of [lookup_order, refund, escalate]" in tree
    assert "tool lookup_order(" in tree and '"status":"delivered"' in tree
    assert 'reason: "check order state before refund"' in tree
    assert tree.rstrip().splitlines()[-1].startswith("└─ ")
    assert await cmd_trace(_args(env, "service", run_id="no-such-run")) == 1


async def test_trace_shows_waits_and_child_runs(
    env_factory: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    env = await env_factory([plain_steps])
    names: Names = env.orchestrator.names
    parent = await env.client.start(plain_steps, 1)
    await parent.result(timeout=15)
    # A child run and a finished wait, written the way the orchestrator and worker write them.
    child = "child-of-" + parent.run_id[:8]
    await env.orchestrator.request_run(
        ev.RunRequested(
            run_id=child,
            workflow="plain_steps",
            input=2,
            parent_run_id=parent.run_id,
            parent_step="kid",
            root_run_id=parent.run_id,
            source="child",
        )
    )
    await env.client.get_handle(child).result(timeout=15)
    other = await env.client.start(plain_steps, 0)
    await other.result(timeout=15)
    state = await load_state(env.client.nc, names, other.run_id)
    seq = state.last_seq
    for event, msg_id in (
        (
            ev.RunSuspended(
                run_id=other.run_id,
                step="approval",
                kind="suspend",
                data={"amount": 5},
                children=[child],
            ),
            "t/sus",
        ),
        (ev.RunWoken(run_id=other.run_id, step="approval", reason="resume"), "t/woke"),
    ):
        seq = await append(
            env.orchestrator.js,
            names,
            other.run_id,
            event,
            expected_last_seq=seq,
            msg_id=f"{other.run_id}/{msg_id}",
        )
    assert await cmd_trace(_args(env, "service", run_id=other.run_id)) == 0
    tree = capsys.readouterr().out
    print(tree)
    assert "wait suspend 'approval'" in tree and "woken at 'approval' by resume" in tree
    assert f"child run {child}  plain_steps  completed" in tree


async def test_analytics_service_follows_and_stops_cleanly(
    env_factory: Any, subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    from tests.helpers import spawn

    env = await env_factory([plain_steps])
    out = tmp_path / "export"
    proc = spawn(
        ["-m", "polos_analytics", "--dir", str(out), "--flush-interval", "0.05"],
        subprocess_env.as_role("service"),
        tmp_path / "analytics.out",
    )
    try:
        h = await env.client.start(plain_steps, 2)
        await h.result(timeout=15)

        def exported() -> bool:
            if not (out / "history").is_dir():
                return False
            con = analytics.connect(out)
            rows = con.execute(f"select status from runs where run_id = '{h.run_id}'").fetchall()
            return rows == [("completed",)]

        await until(exported, 30, "the service to export the run")
    finally:
        proc.terminate()
        code = proc.wait(15)
    assert code == 0, (tmp_path / "analytics.out").read_text()


async def test_compaction_merges_small_files_and_survives_a_crash(
    env_factory: Any, tmp_path: Path
) -> None:
    from polos_analytics.export import HISTORY_SCHEMA, compact, repair

    env = await env_factory([plain_steps])
    out = tmp_path / "export"
    async with Exporter(env.as_role("service"), out, rows_per_file=3) as exporter:
        for n in (1, 2, 3):
            h = await env.client.start(plain_steps, n)
            await h.result(timeout=15)
        await exporter.export_once()
        history = out / "history"
        small = sorted(history.glob("[0-9]*.parquet"))  # data files, not _schema.parquet
        total = await _stream_count(env, env.orchestrator.names.runs_stream)
        assert len(small) == -(-total // 3)
        before = (
            analytics.connect(out)
            .execute("select run_id, status, steps from runs order by run_id")
            .fetchall()
        )
        # A crash after the merged file was renamed in, before the small files were deleted:
        # simulate it by merging a copy by hand, then let repair finish the job.
        crash = tmp_path / "crash"
        shutil.copytree(history, crash)
        first, last = small[0].name[:20], small[1].name[21:41]
        merged = pa.concat_tables([pq.read_table(p) for p in small[:2]])
        pq.write_table(merged, crash / f"{first}-{last}.parquet")
        assert repair(crash) == 2
        assert len(list(crash.glob("[0-9]*.parquet"))) == len(small) - 1
        # Real compaction to files of up to 8 rows; the export then goes on after them.
        exporter.rows_per_file = 8
        assert await asyncio.to_thread(compact, history, HISTORY_SCHEMA, 8) > 0
        after_files = sorted(history.glob("[0-9]*.parquet"))
        assert len(after_files) < len(small)
        assert (
            analytics.connect(out)
            .execute("select run_id, status, steps from runs order by run_id")
            .fetchall()
            == before
        )
        h = await env.client.start(plain_steps, 1)
        await h.result(timeout=15)
        assert (await exporter.export_once()).rows["history"] == 4
    seqs = analytics.connect(out).execute("select seq from events order by seq").fetchall()
    assert [s for (s,) in seqs] == list(range(1, total + 5))


async def test_throughput_command_runs(subprocess_env: dict[str, str]) -> None:
    import subprocess
    import sys

    proc = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "polos_analytics.throughput", "--events", "600"],
        env=subprocess_env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(ROOT),
    )
    assert proc.returncode == 0, proc.stderr
    print(proc.stdout)
    assert "export: 600 events" in proc.stdout and "spans: 600 events" in proc.stdout


@workflow
async def kicks_off(ctx: WorkflowContext) -> str:
    child = await ctx.step.invoke("kick", plain_steps, 2)
    return child.run_id


async def test_trace_draws_children_started_without_waiting(
    env_factory: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    env = await env_factory([kicks_off, plain_steps])
    h = await env.client.start(kicks_off)
    child = await h.result(timeout=15)
    await env.client.get_handle(child).result(timeout=15)
    assert await cmd_trace(_args(env, run_id=h.run_id)) == 0
    tree = capsys.readouterr().out
    print(tree)
    assert f"child run {child}  plain_steps  completed" in tree
