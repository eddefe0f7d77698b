"""The `polos` command as a user runs it: separate processes, real server."""

from __future__ import annotations

import asyncio
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

from polos import PolosClient, Worker
from polos.testing import fast_settings
from tests.helpers import ROOT, kill, marks, spawn, stop, until
from tests.workflows.marked import marked

pytestmark = pytest.mark.slow


def polos(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "polos", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(ROOT),
    )


async def apolos(
    *args: str, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(polos, *args, env=env, timeout=timeout)


async def test_start_wait_survives_a_sigkilled_worker_then_runs_and_show(
    env_factory: Any, subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    log = tmp_path / "marks.log"
    subprocess_env["POLOS_TEST_LOG"] = str(log)
    await env_factory([], with_worker=False)
    w1 = spawn(
        ["-m", "polos", "worker", "tests.workflows.marked"],
        subprocess_env.as_role("worker"),
        tmp_path / "w1.out",
    )
    w2 = None
    try:
        job = '{"steps": 10, "step_seconds": 0.1}'
        start = asyncio.create_task(
            apolos(
                "start", "marked", "--input", job, "--wait", "--timeout", "60", env=subprocess_env
            )
        )
        await until(lambda: "start 5" in marks(log), 30, "step 5")
        kill(w1)
        w2 = spawn(
            ["-m", "polos", "worker", "tests.workflows.marked"],
            subprocess_env.as_role("worker"),
            tmp_path / "w2.out",
        )
        done = await start
    finally:
        stop(w1)
        if w2:
            stop(w2)
    assert done.returncode == 0, done.stderr
    run_id = re.search(r"run (\w+) started", done.stdout).group(1)  # type: ignore[union-attr]
    assert done.stdout.strip().splitlines()[-1] == str(sum(i * i for i in range(1, 11)))
    lines = marks(log)
    assert all(lines.count(f"done {i}") == 1 for i in range(1, 11))

    for _ in range(50):  # the index (a projection) folds the ending right after the log
        runs = await apolos("runs", env=subprocess_env)
        if run_id in runs.stdout and "completed" in runs.stdout:
            break
        await asyncio.sleep(0.1)
    assert runs.returncode == 0 and run_id in runs.stdout and "completed" in runs.stdout
    show = await apolos("show", run_id, env=subprocess_env)
    assert show.returncode == 0
    assert "claimed by worker" in show.stdout and show.stdout.count("claimed by worker") == 2
    # The second claim is a restart (its worker was SIGKILLed), the one retry of the run.
    assert "retries 1 (1 restart after a lost worker)" in show.stdout.splitlines()[0]
    assert show.stdout.count("restarted: the worker that had the run was lost") == 1
    assert re.search(rf"^{run_id}\s.*\scompleted\s+\S+ \S+\s+1\b", runs.stdout, re.M), runs.stdout
    assert "step 's10'" in show.stdout and "completed ->" in show.stdout
    as_json = orjson.loads((await apolos("show", run_id, "--json", env=subprocess_env)).stdout)
    assert as_json[0]["event"] == "RunRequested" and as_json[-1]["event"] == "RunCompleted"


async def test_start_with_bad_json_input_is_a_clear_error(subprocess_env: dict[str, str]) -> None:
    out = await apolos("start", "marked", "--input", "{oops", env=subprocess_env)
    assert out.returncode == 2 and "--input is not valid JSON" in out.stderr


async def test_up_starts_serves_stops_on_ctrl_c_and_keeps_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POLOS_TEST_LOG", str(tmp_path / "m.log"))
    env = dict(subprocess_env_base())
    data = tmp_path / "data"
    up = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "polos",
            "up",
            "--no-auth",
            "--data-dir",
            str(data),
            "--port",
            "0",
            "--prefix",
            "uptest",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=str(ROOT),
    )
    try:
        url = await asyncio.to_thread(_read_url, up)
        settings = fast_settings(url, prefix="uptest")
        async with Worker([marked], settings=settings):
            client = await PolosClient.connect(settings=settings)
            handle = await client.start(marked, {"steps": 2})
            assert await handle.result(timeout=20) == 5
            await client.close()
        up.send_signal(signal.SIGINT)
        rest = await asyncio.to_thread(up.communicate, timeout=20)
        assert up.returncode == 0, rest
        assert "Polos stopped." in rest[0]
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
    # Same data dir again: the run is still there.
    up2 = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "polos",
            "up",
            "--no-auth",
            "--data-dir",
            str(data),
            "--port",
            "0",
            "--prefix",
            "uptest",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=str(ROOT),
    )
    try:
        url = await asyncio.to_thread(_read_url, up2)
        client = await PolosClient.connect(settings=fast_settings(url, prefix="uptest"))
        info = await client.get(handle.run_id)
        assert info.status == "completed" and info.output == 5
        await client.close()
    finally:
        up2.send_signal(signal.SIGINT)
        up2.wait(20)


def subprocess_env_base() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("POLOS_NATS_URL", None)
    env["PYTHONPATH"] = str(ROOT)
    return env


def _read_url(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    for line in proc.stdout:
        m = re.search(r"NATS_URL=(\S+)", line)
        if m:
            return m.group(1)
    raise AssertionError("polos up printed no NATS URL")


async def test_crash_demo_runs_end_to_end() -> None:
    """`polos demo --scenario crash`: a worker SIGKILLed mid-step, another finishes the run."""
    out = await apolos("demo", "--scenario", "crash", env=subprocess_env_base(), timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "worker-1 killed with SIGKILL" in out.stdout
    assert "No completed step ran twice." in out.stdout


async def test_worker_with_dev_llm_runs_the_order_agent_without_a_key(
    env_factory: Any, subprocess_env: Any, tmp_path: Path
) -> None:
    """`polos worker --dev-llm examples/order.py` with no OPENAI_API_KEY: the agent talks to the
    dev LLM the worker started (and says so), and the order reaches its fraud review."""
    env = await env_factory([], with_worker=False)
    worker_env = {
        k: v for k, v in subprocess_env.as_role("worker").items() if not k.startswith("OPENAI_")
    }
    log = tmp_path / "w.out"
    worker = spawn(["-m", "polos", "worker", "--dev-llm", "examples/order.py"], worker_env, log)
    try:
        handle = await env.client.start(
            "process_order", {"id": "D-1", "amount": 2500, "email": "d@example.com"}
        )
        deadline = time.monotonic() + 60
        while True:  # the index follows the log: the run may not be listed at once
            runs = {r.run_id: r for r in await env.client.list_runs()}
            run = runs.get(handle.run_id)
            if run is not None and (run.waiting or {}).get("step") == "fraud_review":
                break  # the agent (a child run) validated the order; the charge ran
            assert time.monotonic() < deadline, log.read_text()
            await asyncio.sleep(0.05)
        assert run.status == "suspended"
    finally:
        stop(worker)
    assert "agents use the Polos dev LLM (scripted test server, not a model)" in log.read_text()
