"""Observability out of the box and the CLI as a person reads it, through real processes:

- `polos up` keeps the Parquet export current, so `polos sql` from the same directory sees a run
  without any export command (auth on: the exporter reads as the service role);
- `polos sql` on a fresh directory says nothing is exported, and where it looked;
- `polos sql --print-views` is SQL the duckdb module runs to the same rows as `polos sql`, and
  the packaged views.sql works as the duckdb CLI reads it;
- RETRIES in `polos runs` counts failures and restarts, not claims; `polos dlq` shows the whole
  reason, the run and the payload;
- piped output has no escape code; a terminal gets colour (not with NO_COLOR), and
  `polos start --wait` draws its status on stderr while stdout stays the result.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pytest

from polos import RetryPolicy, WorkflowContext, workflow
from polos._private.store.tokens import resume_subject
from polos_analytics.export import Exporter
from polos_analytics.sql import VIEWS_FILE
from tests.helpers import ROOT, spawn, stop
from tests.test_analytics import _populate, failing, retried
from tests.test_analytics_workflows import plain_steps, support_agent
from tests.test_waiting import until_status, w_approval

ANSI = re.compile(r"\x1b\[")
COLOUR = re.compile(r"\x1b\[[0-9;]*(3[0-7]|9[0-7]|38;[25];[0-9;]+)m")

_FLAKY: set[str] = set()


def fails_once(key: str) -> str:
    if key not in _FLAKY:
        _FLAKY.add(key)
        raise ConnectionError("the first call fails")
    return "ok"


@workflow
async def naps(ctx: WorkflowContext, n: int) -> int:
    """Suspends n times (a durable sleep each) and never fails: n + 1 claims, no retry."""
    for i in range(n):
        await ctx.step.sleep(f"nap{i}", 0.01)
    return n


@workflow
async def flaky(ctx: WorkflowContext, key: str) -> str:
    return await ctx.step.run(
        "call", fails_once, key, retry=RetryPolicy(max_attempts=3, initial_interval=0.01)
    )


def _env(base: dict[str, str], **extra: str) -> dict[str, str]:
    env = dict(base)
    for name in ("NO_COLOR", "FORCE_COLOR", "COLUMNS", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        env.pop(name, None)
    env.update(extra)
    return env


def polos(
    *args: str, env: dict[str, str], cwd: Path | str = ROOT, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "polos", *args],
        env=env,
        cwd=str(cwd),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


async def apolos(
    *args: str, env: dict[str, str], cwd: Path | str = ROOT, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(polos, *args, env=env, cwd=cwd, timeout=timeout)


def on_terminal(
    args: list[str],
    env: dict[str, str],
    *,
    stdout_tty: bool = True,
    stderr_tty: bool = False,
    timeout: float = 60,
) -> tuple[int, str, str, str]:
    """Run `polos ARGS` with stdout and/or stderr on a pseudo-terminal (120 columns).
    Returns (exit code, what the terminal got, piped stdout, piped stderr)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "polos", *args],
        env=env,
        cwd=str(ROOT),
        stdin=subprocess.DEVNULL,
        stdout=slave if stdout_tty else subprocess.PIPE,
        stderr=slave if stderr_tty else subprocess.PIPE,
    )
    os.close(slave)
    seen: list[bytes] = []

    def read() -> None:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every holder of the terminal's other end has closed it
                return
            if not chunk:
                return
            seen.append(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(10)
    os.close(master)

    def text(b: bytes | None) -> str:
        return (b or b"").decode(errors="replace")

    return proc.returncode, text(b"".join(seen)), text(out), text(err)


def _row(table: str, run_id: str) -> list[str]:
    line = next(ln for ln in table.splitlines() if ln.startswith(run_id))
    return line.split()


# --------------------------------------------------------------------------- polos up -> polos sql


def _read_until(proc: subprocess.Popen[str], pattern: str, seen: list[str]) -> re.Match[str]:
    assert proc.stdout is not None
    for line in proc.stdout:
        seen.append(line)
        m = re.search(pattern, line)
        if m:
            return m
    raise AssertionError(f"polos up never printed {pattern!r}:\n{''.join(seen)}")


def _up_env(tmp_path: Path, prefix: str, **extra: str) -> dict[str, str]:
    env = _env(
        dict(os.environ),
        PYTHONPATH=str(ROOT),
        POLOS_PREFIX=prefix,
        PYTHONUNBUFFERED="1",
        POLOS_TEST_LOG=str(tmp_path / "marks.log"),
    )
    for name in (
        "POLOS_NATS_URL",
        "POLOS_DATA_DIR",
        "POLOS_ANALYTICS_DIR",
        "POLOS_EXPORT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_TRACES_EXPORTER",
        "OTEL_SDK_DISABLED",
    ):
        env.pop(name, None)
    env.update(extra)
    return env


async def test_polos_up_keeps_the_export_current_so_sql_sees_a_run(tmp_path: Path) -> None:
    """Auth on, real processes, nothing run by hand but up, a worker and start."""
    env = _up_env(tmp_path, "upobs", POLOS_ANALYTICS_FLUSH_INTERVAL="0.05")
    up = subprocess.Popen(
        [sys.executable, "-m", "polos", "up", "--port", "0"],
        env=env,
        cwd=str(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    worker = None
    seen: list[str] = []
    try:
        analytics = await asyncio.to_thread(
            _read_until, up, r"analytics: Parquet export in (\S+)", seen
        )
        assert Path(analytics.group(1)) == tmp_path / ".polos" / "exports"
        await asyncio.to_thread(_read_until, up, r"Polos is up", seen)
        with open(tmp_path / "worker.out", "ab") as log:  # beside up: it finds the server
            worker = subprocess.Popen(
                [sys.executable, "-m", "polos", "worker", "tests.workflows.marked"],
                env=env,
                cwd=str(tmp_path),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        started = await apolos(
            "start",
            "marked",
            "--input",
            '{"steps": 3}',
            "--wait",
            "--timeout",
            "60",
            env=env,
            cwd=tmp_path,
        )
        assert started.returncode == 0, started.stdout + started.stderr
        run_id = re.search(r"run (\w+) started", started.stdout).group(1)  # type: ignore[union-attr]
        assert started.stdout.splitlines()[-1] == "14"

        query = f"SELECT count(*) AS n FROM runs WHERE run_id = '{run_id}' AND status = 'completed'"
        deadline = time.monotonic() + 30
        while True:
            out = await apolos("sql", query, "--format", "json", env=env, cwd=tmp_path)
            if out.returncode == 0 and orjson.loads(out.stdout) == [{"n": 1}]:
                break
            assert time.monotonic() < deadline, f"polos sql never saw the run: {out}"
            await asyncio.sleep(0.1)
        table = await apolos("sql", "SELECT count(*) FROM runs", env=env, cwd=tmp_path)
        assert table.returncode == 0 and table.stdout.split() == ["count_star()", "1"], table
        # polos trace finds the same server (service role) from the same directory.
        trace = await apolos("trace", run_id, env=env, cwd=tmp_path)
        assert trace.returncode == 0 and "marked  completed" in trace.stdout, trace
        # A second exporter on the same directory is refused, in one line.
        again = await apolos("analytics", "export", env=env, cwd=tmp_path)
        assert again.returncode == 1 and "another exporter (pid" in again.stderr, again
        child = int((tmp_path / ".polos" / "exports" / ".lock").read_text())
        os.kill(child, 0)  # the exporter runs, as a child of polos up
    finally:
        if worker is not None:
            stop(worker)
        up.send_signal(signal.SIGINT)
        rest = await asyncio.to_thread(up.communicate, timeout=30)
    assert up.returncode == 0, "".join(seen) + rest[0]
    assert "Polos stopped." in rest[0]
    with pytest.raises(ProcessLookupError):  # Ctrl-C stopped the exporter with polos up
        os.kill(child, 0)


async def test_up_runs_the_span_follower_when_otel_configures_an_exporter(tmp_path: Path) -> None:
    env = _up_env(tmp_path, "upotel", OTEL_TRACES_EXPORTER="console", OTEL_SERVICE_NAME="upotel")
    up = subprocess.Popen(
        [sys.executable, "-m", "polos", "up", "--port", "0", "--no-export"],
        env=env,
        cwd=str(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen: list[str] = []
    worker = None
    try:
        line = await asyncio.to_thread(_read_until, up, r"analytics: (.*) \(log", seen)
        assert line.group(1) == "OpenTelemetry spans"  # spans only: --no-export
        await asyncio.to_thread(_read_until, up, r"Polos is up", seen)
        with open(tmp_path / "worker.out", "ab") as log:
            worker = subprocess.Popen(
                [sys.executable, "-m", "polos", "worker", "tests.workflows.marked"],
                env=env,
                cwd=str(tmp_path),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        done = await apolos(
            "start",
            "marked",
            "--input",
            '{"steps": 2}',
            "--wait",
            "--timeout",
            "60",
            env=env,
            cwd=tmp_path,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        spans = tmp_path / ".polos" / "analytics.log"  # the console exporter writes there
        deadline = time.monotonic() + 30
        # The run span: the follower emits it when it reads the run's last event, which is the
        # last message of the burst (no later notification wakes the follower for it).
        while '"name": "run marked"' not in (spans.read_text() if spans.exists() else ""):
            assert time.monotonic() < deadline, "no run span from the follower polos up runs:\n" + (
                spans.read_text()[-3000:] if spans.exists() else "(no log)"
            )
            await asyncio.sleep(0.1)
    finally:
        if worker is not None:
            stop(worker)
        up.send_signal(signal.SIGINT)
        await asyncio.to_thread(up.communicate, timeout=30)
    assert up.returncode == 0
    assert not (tmp_path / ".polos" / "exports").exists()


def test_otel_configured_reads_the_standard_variables() -> None:
    from polos._private.ops.analytics_process import otel_configured

    assert not otel_configured({})  # OpenTelemetry's default (OTLP to localhost): not started
    assert otel_configured({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert otel_configured({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"})
    assert otel_configured({"OTEL_TRACES_EXPORTER": "console"})
    assert otel_configured({"OTEL_TRACES_EXPORTER": "otlp"})
    assert not otel_configured(
        {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}
    )
    assert not otel_configured({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "console"})


async def test_up_with_no_export_runs_no_exporter(tmp_path: Path) -> None:
    env = _up_env(tmp_path, "upnoexp")
    up = subprocess.Popen(
        [sys.executable, "-m", "polos", "up", "--port", "0", "--no-export"],
        env=env,
        cwd=str(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen: list[str] = []
    try:
        await asyncio.to_thread(_read_until, up, r"Polos is up", seen)
    finally:
        up.send_signal(signal.SIGINT)
        rest = await asyncio.to_thread(up.communicate, timeout=30)
    assert up.returncode == 0
    assert not any("analytics:" in line for line in [*seen, rest[0]])
    assert not (tmp_path / ".polos" / "exports").exists()


async def test_sql_on_a_fresh_directory_says_nothing_is_exported(tmp_path: Path) -> None:
    env = _env(dict(os.environ), PYTHONPATH=str(ROOT))
    for name in ("POLOS_DATA_DIR", "POLOS_ANALYTICS_DIR"):
        env.pop(name, None)
    out = await apolos("sql", "SELECT count(*) FROM runs", env=env, cwd=tmp_path)
    assert out.returncode == 1 and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "nothing exported yet in" in lines[0]
    assert str(tmp_path / ".polos" / "exports") in lines[0]  # where it looked
    assert "polos up" in lines[0] and "polos analytics export" in lines[0]  # how to export
    # POLOS_DATA_DIR moves where it looks, as it moves where other commands find the server.
    moved = await apolos(
        "sql", "SELECT 1", env={**env, "POLOS_DATA_DIR": str(tmp_path / "d")}, cwd=tmp_path
    )
    assert str(tmp_path / "d" / "exports") in moved.stderr


# --------------------------------------------------------------------------- views for duckdb


QUERIES = [
    "SELECT run_id, workflow, status, steps, attempts, events FROM runs ORDER BY run_id",
    "SELECT run_id, key, kind, status, attempts FROM steps ORDER BY seq",
    "SELECT run_id, model, total_tokens, cost_usd, n_tool_calls FROM llm_calls ORDER BY seq",
    "SELECT run_id, decision, chosen_tool, alternatives FROM decisions ORDER BY seq",
    "SELECT run_id, workflow, model, llm_calls, total_tokens, cost_usd FROM costs ORDER BY run_id",
    "SELECT topic, data FROM external_events ORDER BY seq",
    "SELECT count(*) AS n FROM dead_letters",
]


def _json_rows(con: duckdb.DuckDBPyConnection, query: str) -> Any:
    rel = con.sql(query)
    rows = [dict(zip(rel.columns, r, strict=True)) for r in rel.fetchall()]
    return orjson.loads(orjson.dumps(rows, default=str))


async def test_print_views_runs_in_duckdb_to_the_rows_of_polos_sql(
    env_factory: Any, subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    env = await env_factory([support_agent, plain_steps, retried, failing])
    await _populate(env)
    out = tmp_path / "export"
    async with Exporter(env.as_role("service"), out) as exporter:
        await exporter.export_once()
    printed = await apolos("sql", "--print-views", "--dir", str(out), env=subprocess_env)
    assert printed.returncode == 0, printed.stderr
    assert str(out.resolve() / "history") in printed.stdout  # the paths are filled in
    assert "getvariable" not in printed.stdout
    con = duckdb.connect()
    con.execute(printed.stdout)
    # The packaged file, as the duckdb CLI reads it: the directory in a variable.
    cli = duckdb.connect()
    cli.execute(f"SET VARIABLE polos_export_dir = '{out.resolve()}'")
    cli.execute(VIEWS_FILE.read_text())
    for query in QUERIES:
        via_polos = await apolos(
            "sql", query, "--dir", str(out), "--format", "json", env=subprocess_env
        )
        assert via_polos.returncode == 0, via_polos.stderr
        expected = orjson.loads(via_polos.stdout)
        assert _json_rows(con, query) == expected, query
        assert _json_rows(cli, query) == expected, query
    assert (
        len(
            orjson.loads(
                (
                    await apolos(
                        "sql", QUERIES[0], "--dir", str(out), "--format", "json", env=subprocess_env
                    )
                ).stdout
            )
        )
        == 4
    )


def test_views_are_defined_once_in_the_package() -> None:
    import tomllib

    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]
    assert "views.sql" in package_data["polos_analytics"]
    sql_py = (ROOT / "analytics" / "sql.py").read_text()
    assert "CREATE OR REPLACE VIEW runs" not in sql_py  # no second copy
    assert "CREATE OR REPLACE VIEW runs" in VIEWS_FILE.read_text()


# --------------------------------------------------------------------------- runs, show, dlq


async def test_runs_counts_retries_not_claims(
    env_factory: Any, subprocess_env: dict[str, str]
) -> None:
    env = await env_factory([naps, flaky])
    napper = await env.client.start(naps, 3)
    assert await napper.result(timeout=30) == 3
    failer = await env.client.start(flaky, f"k-{time.time()}")
    assert await failer.result(timeout=30) == "ok"
    deadline = time.monotonic() + 20
    while True:  # the index (a projection) folds the endings right after the log
        runs = {
            r["run_id"]: r
            for r in orjson.loads((await apolos("runs", "--json", env=subprocess_env)).stdout)
        }
        if all(runs.get(h.run_id, {}).get("status") == "completed" for h in (napper, failer)):
            break
        assert time.monotonic() < deadline, runs
        await asyncio.sleep(0.1)
    # --json is as it was: the index's claim count.
    assert runs[napper.run_id]["attempt"] == 4
    table = await apolos("runs", env=subprocess_env)
    assert table.returncode == 0, table.stderr
    header = table.stdout.splitlines()[0].split()
    assert header == ["RUN", "WORKFLOW", "STATUS", "CREATED", "RETRIES", "NOTE"]
    # RUN WORKFLOW STATUS DATE TIME RETRIES: four claims, no failure, no retry.
    assert _row(table.stdout, napper.run_id)[5] == "0"
    assert _row(table.stdout, failer.run_id)[5] == "1"
    show = await apolos("show", napper.run_id, env=subprocess_env)
    assert "retries 0" in show.stdout.splitlines()[0] and "(claim 4)" in show.stdout
    show = await apolos("show", failer.run_id, env=subprocess_env)
    assert "retries 1 (1 failed step attempt)" in show.stdout.splitlines()[0]


async def test_dlq_shows_the_whole_reason_the_run_and_the_payload(
    env_factory: Any, subprocess_env: dict[str, str]
) -> None:
    env = await env_factory([w_approval])
    handle = await env.client.start(w_approval, {"id": "dlq-1", "amount": 3})
    await until_status(env, handle.run_id, "suspended")
    field = "a_field_name_long_enough_that_the_reason_goes_well_past_sixty_characters"
    await env.client.js.publish(
        resume_subject(env.client.names, handle.run_id, "approval"),
        orjson.dumps({field: {"approved": True}}),
    )
    deadline = time.monotonic() + 20
    while not any(field in d["reason"] for d in await env.client.dead_letters()):
        assert time.monotonic() < deadline, "the bad resume was never dead-lettered"
        await asyncio.sleep(0.05)
    reason = next(d["reason"] for d in await env.client.dead_letters() if field in d["reason"])
    assert len(reason) > 60

    listing = await apolos("dlq", env=subprocess_env)
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.splitlines()[0].split() == [
        "ID",
        "AT",
        "SOURCE",
        "RUN",
        "SUBJECT",
        "REASON",
    ]
    line = next(ln for ln in listing.stdout.splitlines() if field in ln)
    assert line.endswith(reason)  # whole, not cut at 60 characters
    assert handle.run_id in line.split()
    letter_id = line.split()[0]

    shown = await apolos("dlq", "show", letter_id, env=subprocess_env)
    assert shown.returncode == 0, shown.stderr
    assert f"run  {handle.run_id}" in shown.stdout and reason in shown.stdout
    assert f'"{field}": {{' in shown.stdout  # the payload, as indented JSON
    as_json = orjson.loads(
        (await apolos("dlq", "show", letter_id, "--json", env=subprocess_env)).stdout
    )
    assert as_json["seq"] == int(letter_id) and as_json["reason"] == reason
    # The list's --json is unchanged: the letters as they were kept.
    letters = orjson.loads((await apolos("dlq", "--json", env=subprocess_env)).stdout)
    assert any(
        d["reason"] == reason and set(d) >= {"source", "subject", "data", "at"} for d in letters
    )
    missing = await apolos("dlq", "show", "999999", env=subprocess_env)
    assert missing.returncode == 1 and "no dead letter 999999" in missing.stderr


# --------------------------------------------------------------------------- terminals and pipes


async def test_piped_output_has_no_escape_codes_and_a_terminal_has_colour(
    env_factory: Any, subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    env = await env_factory([support_agent, plain_steps, retried, failing])
    runs = await _populate(env)
    out = tmp_path / "export"
    async with Exporter(env.as_role("service"), out) as exporter:
        await exporter.export_once()
    plain = _env(subprocess_env)
    commands = [
        ["runs"],
        ["show", runs["failed"]],
        ["trace", runs["agent"]],
        ["workers"],
        ["dlq"],
        ["schedules"],
        ["queues"],
        ["sql", "SELECT * FROM runs", "--dir", str(out)],
    ]
    for args in commands:
        got = await apolos(*args, env=plain)
        assert got.returncode == 0, (args, got.stderr)
        assert got.stdout.strip(), args
        assert not ANSI.search(got.stdout + got.stderr), (args, got.stdout)
        assert all(ln == ln.rstrip() for ln in got.stdout.splitlines()), args

    term = _env(subprocess_env, TERM="xterm-256color")
    code, seen, _, err = await asyncio.to_thread(on_terminal, ["runs"], term)
    assert code == 0, err
    assert COLOUR.search(seen), seen
    assert runs["agent"] in seen  # a run id is never cut, even on a terminal
    code, seen, _, err = await asyncio.to_thread(on_terminal, ["runs"], {**term, "NO_COLOR": "1"})
    assert code == 0, err
    assert not COLOUR.search(seen) and runs["agent"] in seen


async def test_start_wait_draws_its_status_on_stderr_and_prints_only_the_result(
    env_factory: Any, subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    await env_factory([], with_worker=False)
    term = _env(subprocess_env, TERM="xterm-256color")
    # No worker serves the workflow: the status line says so while it waits.
    code, seen, stdout, _ = await asyncio.to_thread(
        on_terminal,
        ["start", "marked", "--run-id", "lonely-1", "--wait", "--timeout", "3"],
        term,
        stdout_tty=False,
        stderr_tty=True,
    )
    assert code == 1
    assert "run lonely-1 started" in stdout and not ANSI.search(stdout)
    assert "no worker serves 'marked' yet" in seen, seen
    # With a worker: stdout is the start line and the result, nothing else.
    worker = spawn(
        ["-m", "polos", "worker", "tests.workflows.marked"],
        {**subprocess_env.as_role("worker"), "POLOS_TEST_LOG": str(tmp_path / "m.log")},
        tmp_path / "w.out",
    )
    try:
        code, seen, stdout, _ = await asyncio.to_thread(
            on_terminal,
            [
                "start",
                "marked",
                "--run-id",
                "watched-1",
                "--input",
                '{"steps": 3, "step_seconds": 0.3}',
                "--wait",
                "--timeout",
                "60",
            ],
            term,
            stdout_tty=False,
            stderr_tty=True,
        )
    finally:
        stop(worker)
    assert code == 0, seen
    assert stdout.splitlines() == ["run watched-1 started", "14"]
    assert "run watched-1:" in seen  # the status line, on the terminal (stderr)
