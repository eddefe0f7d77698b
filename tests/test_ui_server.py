"""The UI server without a browser: its in-memory run index (paging, filters, live changes)
against a real bucket, payloads fetched from the object store on demand, the SQL page's
sandbox, the Host check, and `polos up` / `polos ui` starting it as users do."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from polos import WorkflowContext, workflow
from polos._private.ops import auth
from polos._private.store import connect
from polos_ui.projection import Query
from tests.helpers import ROOT
from tests.uistack import http, stack_fixture, until

pytestmark = pytest.mark.asyncio(loop_scope="module")

BIG = 9 * 1024 * 1024  # above the server's 8 MB max_payload: the output goes to the object store


@workflow
async def ui_big(ctx: WorkflowContext, n: int) -> int:
    await ctx.step.run("blob", lambda: {"blob": "x" * n})
    return n


@workflow
async def ui_plain(ctx: WorkflowContext, n: int) -> int:
    return n


ui_stack = stack_fixture(lambda: [ui_big, ui_plain])


def bearer(stack: Any) -> dict[str, str]:
    return {"authorization": f"Bearer {stack.ui.secrets.token}"}


async def _write_index(stack: Any, entries: list[dict[str, Any]]) -> None:
    """Index entries as the orchestrator writes them (the service role owns the bucket)."""

    nc = await connect(stack.settings("service"), name="test-index-writer")
    try:
        js = nc.jetstream()
        for e in entries:
            await js.publish(f"$KV.{stack.prefix}_runs.{e['run_id']}", orjson.dumps(e))
    finally:
        await nc.close()


async def test_the_index_pages_filters_and_follows_the_bucket(ui_stack: Any) -> None:
    index = ui_stack.ui.index
    await asyncio.wait_for(index.ready.wait(), 10)
    t0 = time.time() - 10_000
    entries = [
        {
            "run_id": f"r{i:05d}",
            "workflow": f"wf{i % 3}",
            "status": "completed" if i % 4 else "failed",
            "created_at": t0 + i,
            "updated_at": t0 + i,
            "queue": "q" if i % 2 else None,
            "parent_run_id": "r00000" if i % 10 == 5 else None,
            "seq": i + 1,
        }
        for i in range(3000)
    ]
    await _write_index(ui_stack, entries)
    await until(lambda: all(f"r{i:05d}" in index.runs for i in (0, 2999)), what="the watch")
    # Newest first, pages contiguous and disjoint down to the oldest.
    seen: list[str] = []
    q = Query(workflow=None, limit=100)
    mine = [r for r in index.page(Query(limit=10_000)).runs if r.run_id.startswith("r")]
    while True:
        page = index.page(q)
        seen.extend(r.run_id for r in page.runs if r.run_id.startswith("r"))
        if page.older is None:
            break
        q = Query(limit=100, before=page.older)
    assert seen == [f"r{i:05d}" for i in reversed(range(3000))] == [r.run_id for r in mine]
    # Going back up from the second page gives the first one.
    first = index.page(Query(limit=50))
    second = index.page(Query(limit=50, before=first.older))
    again = index.page(Query(limit=50, after=second.newer))
    assert [r.run_id for r in again.runs] == [r.run_id for r in first.runs]
    # Filters, alone and together, and a time window.
    failed = index.page(Query(status="failed", workflow="wf1", limit=10_000)).runs
    assert [r.run_id for r in failed] == [
        f"r{i:05d}" for i in reversed(range(3000)) if i % 4 == 0 and i % 3 == 1
    ]
    window = index.page(Query(since=t0 + 100, until=t0 + 200, limit=10_000)).runs
    assert {r.run_id for r in window} == {f"r{i:05d}" for i in range(100, 200)}
    assert len(index.page(Query(queue="q", limit=10_000)).runs) == 1500
    roots = index.page(Query(roots_only=True, limit=10_000)).runs
    assert not any(r.parent_run_id for r in roots)
    assert len(index.children["r00000"]) == 300
    assert index.page(Query(id_prefix="r0299", limit=50)).total == 10
    # A status change moves the run between lists, and tells the listeners.
    told: list[set[str]] = []
    stop = index.listen(told.append)
    await _write_index(ui_stack, [{**entries[4], "status": "completed", "seq": 9999}])
    await until(lambda: index.get("r00004").status == "completed", what="the update")
    stop()
    assert any("r00004" in ids for ids in told)
    assert "r00004" not in {r.run_id for r in index.page(Query(status="failed", limit=10_000)).runs}
    # The runs page with a filter, through HTTP, and its live stream's first update.
    got = await http(f"{ui_stack.url}/runs?status=failed&workflow=wf1", headers=bearer(ui_stack))
    assert got.status == 200 and "r02992" in got.body and "r02993" not in got.body
    assert got.headers["server-timing"].startswith("app;dur=")


async def test_large_outputs_are_fetched_from_the_object_store_on_demand(ui_stack: Any) -> None:
    h = await ui_stack.client.start(ui_big, BIG)
    assert await h.result(timeout=60) == BIG
    page = await http(f"{ui_stack.url}/runs/{h.run_id}", headers=bearer(ui_stack))
    assert page.status == 200 and len(page.body) < 200_000  # the 9 MB stayed out of the page
    [load] = re.findall(r'data-load="(/runs/[^"]+/payload\?name=[^"]+)"', page.body)
    got = await http(ui_stack.url + load.replace("&amp;", "&"), headers=bearer(ui_stack))
    # The big member moved out alone (output.blob); the page shows the rest and loads it.
    assert got.status == 200 and json.loads(got.body) == "x" * BIG
    assert "in the object store: blob" in page.body
    # Only that run's objects: a name of another run is refused.
    other = await ui_stack.client.start(ui_plain, 1)
    await other.result(timeout=20)
    name = load.split("name=", 1)[1]
    refused = await http(
        f"{ui_stack.url}/runs/{other.run_id}/payload?name={name}", headers=bearer(ui_stack)
    )
    assert refused.status == 404 and "is not one of run" in refused.body


async def test_sql_runs_read_only_queries_over_the_export_only(
    ui_stack: Any, tmp_path: Path
) -> None:
    from polos_analytics.export import Exporter

    h = await ui_stack.client.start(ui_plain, 7)
    await h.result(timeout=20)
    export = tmp_path / "export"
    async with Exporter(ui_stack.settings("service"), export) as exporter:
        await exporter.export_once()
    ui_stack.ui.config.export_dir = export

    async def sql(q: str) -> Any:
        return await http(f"{ui_stack.url}/sql?q={q}", headers=bearer(ui_stack))

    ok = await sql(
        "SELECT%20workflow%2C%20count(*)%20AS%20n%20FROM%20runs%20GROUP%20BY%201%20ORDER%20BY%201"
    )
    assert (
        ok.status == 200
        and "<th>workflow</th>" in ok.body
        and '<td class="small">ui_plain</td>' in ok.body
    )
    copy = await sql("COPY%20(SELECT%201)%20TO%20'%2Ftmp%2Fpolos-ui-x.csv'")
    assert (
        copy.status == 400 and "not COPY" in copy.body and not Path("/tmp/polos-ui-x.csv").exists()
    )
    passwd = await sql("SELECT%20*%20FROM%20read_text('%2Fetc%2Fpasswd')")
    assert passwd.status == 400 and "root:" not in passwd.body
    bad = await sql("SELEC%20nonsense")
    assert bad.status == 400 and "ParserException" in bad.body


async def test_a_host_header_of_another_site_gets_nothing(ui_stack: Any) -> None:
    got = await http(f"{ui_stack.url}/runs", headers={**bearer(ui_stack), "host": "evil.example"})
    assert got.status == 421


@pytest.mark.asyncio(loop_scope="function")
async def test_without_a_ui_url_suspends_carry_no_approval_link(
    settings: Any, env_factory: Any
) -> None:
    @workflow
    async def ui_wait(ctx: WorkflowContext) -> Any:
        assert ctx.approval_url("ok") is None
        return (await ctx.step.suspend("ok", data={"x": 1})).data

    env = await env_factory([ui_wait])
    h = await env.client.start(ui_wait)
    info = await until(lambda: _suspended(env.client, h.run_id), what="the suspend")
    assert info.waiting["data"] == {"x": 1}


async def _suspended(client: Any, run_id: str) -> Any:
    try:
        info = await client.get(run_id)
    except Exception:
        return None
    return info if info.status == "suspended" else None


# --------------------------------------------------------------------------- as users start it


def _env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POLOS_")}
    env.update(PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", POLOS_UI_PORT="0")
    return env


def _read_until(proc: subprocess.Popen[str], pattern: str, timeout: float = 60) -> list[str]:
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if re.search(pattern, line):
            return lines
    raise AssertionError(f"no line matching {pattern!r} in {lines}")


async def test_polos_up_prints_the_ui_line_and_serves_it_as_the_client(tmp_path: Path) -> None:
    data = tmp_path / "data"
    up = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "polos",
            "up",
            "--data-dir",
            str(data),
            "--port",
            "0",
            "--prefix",
            "uiup",
        ],
        env=_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
    )
    try:
        lines = await asyncio.to_thread(_read_until, up, r"Polos is up")
        [ui_line] = [ln for ln in lines if ln.startswith("ui: ")]
        url = ui_line.split(" ", 1)[1].strip()
        m = re.fullmatch(r"(http://127\.0\.0\.1:\d+)/\?token=(\S+)", url)
        assert m, url
        base = m.group(1)
        assert (await http(f"{base}/runs")).status == 401
        opened = await http(url)
        assert opened.status == 303 and "set-cookie" in opened.headers
        cookie = opened.headers["set-cookie"].split(";", 1)[0]
        runs = await http(f"{base}/runs", headers={"cookie": cookie})
        assert runs.status == 200 and "namespace uiup" in runs.body
        secrets = data / "ui.json"
        assert secrets.exists() and secrets.stat().st_mode & 0o777 == 0o600
        # Workers of this `polos up` learn the UI's URL (for _approval_url) from its data dir.
        assert json.loads((data / "polos.lock").read_text())["ui_url"] == base
        # `polos ui` refuses the service role's URL.
        creds = json.loads((data / auth.CREDENTIALS_FILE).read_text())
        nats = re.search(r"NATS_URL=(\S+)", "".join(lines)).group(1)  # type: ignore[union-attr]
        refused = subprocess.run(
            [
                sys.executable,
                "-m",
                "polos",
                "ui",
                "--nats-url",
                auth.url_for(creds, "uiup-service", nats),
                "--prefix",
                "uiup",
            ],
            env=_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )
        assert refused.returncode == 2 and "client role" in refused.stderr
    finally:
        up.send_signal(signal.SIGINT)
        await asyncio.to_thread(up.wait, 30)
    # --no-ui: no UI, no line.
    up = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "polos",
            "up",
            "--no-ui",
            "--data-dir",
            str(data),
            "--port",
            "0",
            "--prefix",
            "uiup",
        ],
        env=_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
    )
    try:
        lines = await asyncio.to_thread(_read_until, up, r"Polos is up")
        assert not any(ln.startswith("ui: ") for ln in lines)
    finally:
        up.send_signal(signal.SIGINT)
        await asyncio.to_thread(up.wait, 30)
