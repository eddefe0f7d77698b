"""The original Polos's CLI verbs as a user runs them: `polos server start` (a real `polos up`
in the background, under auth), a real worker process, and every verb as the client role
through the data dir's credentials."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from polos._private.ops.instance import running
from tests.helpers import ROOT, kill, spawn
from tests.test_cli import apolos, subprocess_env_base

pytestmark = pytest.mark.slow


async def _until_ok(check: Any, timeout: float, what: str) -> Any:
    for _ in range(int(timeout / 0.2)):
        got = await check()
        if got:
            return got
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


# About thirty `polos` processes, one after the other, each paying Python's start-up: more than
# the default timeout on a loaded machine, though nothing in it waits on a clock.
@pytest.mark.timeout(600)
async def test_server_verbs_and_run_verbs_against_a_real_stack(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = {k: v for k, v in subprocess_env_base().items() if not k.startswith("OPENAI_")}
    env.pop("POLOS_PREFIX", None)
    dd = ["--data-dir", str(data)]

    async def polos(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return await apolos(*args, *dd, env=env, timeout=timeout)

    before = await polos("server", "status")
    assert before.returncode == 1 and "not running" in before.stdout
    worker = None
    try:
        up = await apolos(
            "server", "start", *dd, "--port", "0", "--no-ui", "--no-export", env=env, timeout=90
        )
        assert up.returncode == 0, up.stdout + up.stderr
        assert "Polos is up" in up.stdout and "polos server stop" in up.stdout
        assert "auth on" in up.stdout  # the default of `polos up`
        again = await polos("server", "start")
        assert again.returncode == 0 and "already running" in again.stdout

        status = await polos("server", "status")
        assert status.returncode == 0, status.stdout + status.stderr
        assert "answers:   yes, as the client role (0 live worker(s))" in status.stdout
        assert "NATS:      nats://" in status.stdout

        worker = spawn(
            ["-m", "polos", "worker", "tests.workflows.verbs_app", "--dev-llm", *dd],
            env,
            tmp_path / "worker.out",
        )

        async def greet_online() -> Any:
            out = await polos("workflow", "list")
            return out if re.search(r"^greet\s+workflow\s+-\s+online", out.stdout, re.M) else None

        listed = await _until_ok(greet_online, 60, "the worker's registration")
        assert re.search(r"^polos_agent\s+agent\s+", listed.stdout, re.M), listed.stdout
        described = await polos("workflow", "describe", "greet")
        assert described.returncode == 0 and "Greets someone, in one step." in described.stdout
        assert '"name"' in described.stdout  # the input schema
        assert "Served by:" in described.stdout and "no live worker" not in described.stdout
        from_module = await polos("workflow", "list", "--module", "tests/workflows/verbs_app.py")
        assert re.search(r"^approve\s+workflow\s+-\s+defined", from_module.stdout, re.M)
        missing = await polos("workflow", "describe", "nope")
        assert missing.returncode == 1 and "no workflow 'nope'" in missing.stderr

        agents = await polos("agent", "list")
        assert re.search(r"^helper\s+gpt-4o-mini\s+lookup\s+online", agents.stdout, re.M), (
            agents.stdout
        )
        helper = await polos("agent", "describe", "helper")
        assert "Model:             gpt-4o-mini" in helper.stdout
        assert "You help with orders." in helper.stdout
        tools = await polos("tool", "list")
        assert re.search(r"^lookup\s+tool\s+Look an order up by its id\.", tools.stdout, re.M)
        lookup = await polos("tool", "describe", "lookup")
        assert '"order_id"' in lookup.stdout  # the parameters' JSON schema

        ran = await polos("run", "greet", "--input", '{"name": "Ada"}')
        assert ran.returncode == 0, ran.stderr
        assert ran.stdout.strip() == "hello Ada"

        invoked = await polos("invoke", "greet", "--input", '{"name": "Bo"}')
        assert invoked.returncode == 0, invoked.stderr
        run_id = re.search(r"Execution started: (\w+)", invoked.stdout).group(1)  # type: ignore[union-attr]
        assert f"polos result {run_id}" in invoked.stdout
        result = await polos("result", run_id)
        assert result.returncode == 0 and orjson.loads(result.stdout) == "hello Bo"
        st = await polos("status", run_id)
        assert f"Execution: {run_id}" in st.stdout and "Workflow:  greet" in st.stdout
        assert "Status:    completed" in st.stdout and "ago" in st.stdout
        last = (await polos("logs", run_id, "--last", "2")).stdout.splitlines()
        assert len(last) == 2 and "[StepCompleted]" in last[0] and "[RunCompleted]" in last[1]
        assert re.match(r"^\[\d\d:\d\d:\d\d\] \[StepCompleted\] \{", last[0]), last
        no_input = await polos("invoke", "greet")
        assert no_input.returncode == 2 and "Either --input or --file" in no_input.stderr

        failing = await polos("invoke", "fails", "--input", "null")
        fail_id = re.search(r"Execution started: (\w+)", failing.stdout).group(1)  # type: ignore[union-attr]
        failed = await polos("result", fail_id)
        assert failed.returncode == 1
        assert "Execution failed: StepFailedError:" in failed.stderr and "no such order" in (
            failed.stderr
        )
        assert "Error:     StepFailedError" in (await polos("status", fail_id)).stdout

        # A suspended run: `result` times out naming its status; `logs` follows it to its end.
        waits = await polos("invoke", "approve", "--input", "null")
        wait_id = re.search(r"Execution started: (\w+)", waits.stdout).group(1)  # type: ignore[union-attr]

        async def suspended() -> bool:
            return "Status:    suspended" in (await polos("status", wait_id)).stdout

        await _until_ok(suspended, 60, "the suspend")
        timed_out = await polos("result", wait_id, "--timeout", "0.5")
        assert timed_out.returncode == 1 and "Status: suspended" in timed_out.stderr
        assert f"Check progress: polos status {wait_id}" in timed_out.stderr
        follow = subprocess.Popen(
            [sys.executable, "-m", "polos", "logs", wait_id, *dd],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=str(ROOT),
        )
        try:
            await asyncio.sleep(1.0)  # let it print what is there and start following
            assert follow.poll() is None  # still following: the run has not ended
            resumed = await polos("resume", wait_id, "approval", "--data", '{"ok": true}')
            assert resumed.returncode == 0, resumed.stderr
            out, _ = await asyncio.to_thread(follow.communicate, timeout=60)
        finally:
            if follow.poll() is None:
                follow.kill()
        assert follow.returncode == 0
        lines = out.splitlines()
        assert "[RunSuspended]" in out and lines[-1].split()[1] == "[RunCompleted]", out
        assert sum("[RunCompleted]" in ln for ln in lines) == 1

        # An agent by its name: the run goes to polos_agent, the dev LLM answers.
        agent = await polos("run", "helper", "--input", "look order 7 up", timeout=90)
        assert agent.returncode == 0, agent.stderr + (tmp_path / "worker.out").read_text()
        assert agent.stdout.strip()
        chat = await polos("run", "helper")
        assert chat.returncode == 2 and "interactive chat is not supported" in chat.stderr
    finally:
        if worker is not None:
            kill(worker)
        stopped = await polos("server", "stop")
    assert stopped.returncode == 0 and "Polos stopped." in stopped.stdout, stopped.stdout
    assert running(data) is None
    after = await polos("server", "status")
    assert after.returncode == 1
    nothing = await polos("server", "stop")
    assert nothing.returncode == 0 and "No running Polos" in nothing.stdout


def test_server_start_refuses_flags_for_stop(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "polos",
            "server",
            "stop",
            "--port",
            "0",
            "--data-dir",
            str(tmp_path),
        ],
        env=subprocess_env_base(),
        capture_output=True,
        text=True,
        cwd=str(ROOT),
        timeout=60,
    )
    assert out.returncode == 2 and "takes no flags" in out.stderr


def _polos_sync(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "polos", *args],
        env=subprocess_env_base(),
        capture_output=True,
        text=True,
        cwd=str(ROOT),
        timeout=60,
    )


def test_catalog_from_a_module_needs_no_server() -> None:
    module = ("--module", "tests/workflows/verbs_app.py")
    agents = _polos_sync("agent", "list", *module)
    assert agents.returncode == 0, agents.stderr
    assert re.search(r"^helper\s+gpt-4o-mini\s+lookup\s+defined", agents.stdout, re.M)
    tools = orjson.loads(_polos_sync("tool", "list", *module, "--json").stdout)
    assert [t["id"] for t in tools] == ["lookup"]
    assert tools[0]["parameters"]["properties"]["order_id"]["type"] == "string"
    described = _polos_sync("workflow", "describe", *module)
    assert described.returncode == 2 and "needs the workflow's id" in described.stderr


def test_server_start_says_why_polos_up_did_not_start(tmp_path: Path) -> None:
    out = _polos_sync("server", "start", "--data-dir", str(tmp_path), "--no-such-flag")
    assert out.returncode == 1
    assert "polos up exited with code 2" in out.stderr and "--no-such-flag" in out.stderr
