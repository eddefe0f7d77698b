"""The waiting commands as a user runs them (separate processes, real server), and the order
demo end to end: charge, fraud review, SIGKILLed worker, approval, pickup event, email."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from typing import Any

import orjson

from tests.helpers import ROOT
from tests.test_waiting import until_status, w_approval, w_pickup


async def apolos(
    *args: str, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "polos", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(ROOT),
    )


async def test_cli_waiting_resume_event_cancel_schedules(
    env_factory: Any, subprocess_env: dict[str, str]
) -> None:
    env = await env_factory([w_approval, w_pickup])
    handle = await env.client.start(w_approval, {"id": "cli-1", "amount": 4200})
    await until_status(env, handle.run_id, "suspended")

    for _ in range(50):  # `runs` reads the index, which folds the suspension right after the log
        out = await apolos("runs", "--waiting", env=subprocess_env)
        if handle.run_id in out.stdout:
            break
        await asyncio.sleep(0.1)
    assert out.returncode == 0, out.stderr
    assert handle.run_id in out.stdout and "4200" in out.stdout and "approval" in out.stdout

    out = await apolos(
        "resume", handle.run_id, "approval", "--data", '{"approved": true}', env=subprocess_env
    )
    assert out.returncode == 0, out.stderr
    assert (await handle.result(timeout=20))["approved"] is True
    out = await apolos("resume", handle.run_id, "approval", "--data", "{}", env=subprocess_env)
    assert out.returncode == 1 and "already resumed" in out.stderr

    pickup = await env.client.start(w_pickup, "cli/9")
    await until_status(env, pickup.run_id, "suspended")
    out = await apolos(
        "event", "warehouse.pickup/cli/9", "--data", '{"dock": 2}', env=subprocess_env
    )
    assert out.returncode == 0, out.stderr
    assert (await pickup.result(timeout=20))["data"] == {"dock": 2}

    out = await apolos("cancel", "ghost-run", env=subprocess_env)
    assert out.returncode == 1 and "no run" in out.stderr

    out = await apolos(
        "schedules",
        "create",
        "weekly",
        "--workflow",
        "w_pickup",
        "--cron",
        "0 9 * * 1",
        "--timezone",
        "America/New_York",
        env=subprocess_env,
    )
    assert out.returncode == 0, out.stderr
    out = await apolos("schedules", "--json", env=subprocess_env)
    assert [d["key"] for d in orjson.loads(out.stdout)] == ["weekly"]
    out = await apolos("schedules", "delete", "weekly", env=subprocess_env)
    assert out.returncode == 0, out.stderr


async def test_order_demo_end_to_end(subprocess_env: dict[str, str]) -> None:
    out = await apolos("demo", env=subprocess_env, timeout=120)
    print(out.stdout)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "charge: 1x   email: 1x" in out.stdout
    assert "SIGKILL" in out.stdout and "completed" in out.stdout
