"""A Polos service process sets Python's collector from ``Settings.gc_threshold``: a busy
orchestrator spent a sixth of its time collecting (whole-heap collections of 65 ms one and a
half times a second). The ``polos worker`` process does the same; a process that embeds a
Worker keeps its own collector, and 0 keeps Python's."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from polos import Settings, Worker
from polos._private.ops.runtime import tune_gc
from tests.helpers import ROOT, spawn, stop
from tests.test_cli import apolos
from tests.test_durability import _down, _env, _up
from tests.workflows.collector import gc_thresholds


def test_tune_gc_sets_the_threshold_and_zero_keeps_pythons() -> None:
    before = gc.get_threshold()
    try:
        tune_gc(Settings(gc_threshold=0))
        assert gc.get_threshold() == before
        tune_gc(Settings(gc_threshold=1234))
        assert gc.get_threshold() == (1234, 20, 20)
    finally:
        gc.set_threshold(*before)


async def _thresholds_in_a_polos_worker(
    subprocess_env: Any, tmp_path: Path, name: str, **env: str
) -> list[int]:
    worker = spawn(
        ["-m", "polos", "worker", "tests.workflows.collector"],
        {**subprocess_env.as_role("worker"), **env},
        tmp_path / f"{name}.out",
    )
    try:
        done = await apolos(
            "start", "gc_thresholds", "--wait", "--timeout", "30", env=subprocess_env
        )
        assert done.returncode == 0, done.stderr
        result: list[int] = orjson.loads(done.stdout.strip().splitlines()[-1])
        return result
    finally:
        stop(worker)


async def test_a_polos_worker_process_collects_with_the_setting(
    env_factory: Any, subprocess_env: Any, tmp_path: Path
) -> None:
    # As a user runs it: `polos worker` as the worker role, `polos start` as the client's.
    await env_factory([], with_worker=False)  # the orchestrator
    assert await _thresholds_in_a_polos_worker(subprocess_env, tmp_path, "default") == [
        Settings().gc_threshold,
        20,
        20,
    ]
    assert await _thresholds_in_a_polos_worker(
        subprocess_env, tmp_path, "set", POLOS_GC_THRESHOLD="4321"
    ) == [4321, 20, 20]
    python_own = await _thresholds_in_a_polos_worker(
        subprocess_env, tmp_path, "off", POLOS_GC_THRESHOLD="0"
    )
    assert python_own[0] == 700 and python_own[0] != Settings().gc_threshold


async def test_polos_up_collects_with_the_setting(tmp_path: Path) -> None:
    # `polos up` runs the orchestrator and the scheduler in its own process. What that process's
    # collector was set to is written when it exits, by a sitecustomize only this test puts on
    # its path.
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import atexit, gc, json, os\n"
        "def _said():\n"
        "    with open(os.environ['POLOS_TEST_GC_OUT'], 'w') as f:\n"
        "        json.dump(gc.get_threshold(), f)\n"
        "atexit.register(_said)\n"
    )
    for name, value, expected in (("default", None, [50_000, 20, 20]), ("off", "0", [700, 10, 10])):
        out = tmp_path / f"{name}.json"
        env = {**_env(), "POLOS_TEST_GC_OUT": str(out)}
        env["PYTHONPATH"] = os.pathsep.join([str(hook), env["PYTHONPATH"]])
        if value is not None:
            env["POLOS_GC_THRESHOLD"] = value
        else:
            env.pop("POLOS_GC_THRESHOLD", None)
        args = ["--no-auth", "--data-dir", str(tmp_path / name), "--port", "0"]
        proc, _ = await _up([*args, "--no-ui", "--no-export"], env)
        _down(proc)
        assert proc.returncode == 0
        assert orjson.loads(out.read_bytes()) == expected, name


async def test_an_embedded_worker_leaves_its_process_collector_alone(
    settings: Any, env_factory: Any
) -> None:
    from polos.client import PolosClient

    await env_factory([], with_worker=False)
    before = gc.get_threshold()
    async with Worker([gc_thresholds], settings=settings.worker):
        client = await PolosClient.connect(settings=settings)
        try:
            handle = await client.start(gc_thresholds)
            assert await handle.result(timeout=20) == list(before)
        finally:
            await client.close()
    assert gc.get_threshold() == before


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("abc", "POLOS_GC_THRESHOLD must be a whole number, not 'abc'"),
        ("-3", "gc_threshold (POLOS_GC_THRESHOLD) must be 0 (Python's own) or more, not -3"),
    ],
)
def test_a_wrong_threshold_stops_each_service_process_with_one_line(
    subprocess_env: Any, value: str, says: str
) -> None:
    for role, args in (
        ("service", ["-m", "polos_services.orchestrator"]),
        ("service", ["-m", "polos_services.scheduler"]),
        ("worker", ["-m", "polos", "worker", "tests.workflows.collector"]),
    ):
        done = subprocess.run(
            [sys.executable, *args],
            env={**subprocess_env.as_role(role), "POLOS_GC_THRESHOLD": value},
            capture_output=True,
            text=True,
            timeout=60,
            cwd=str(ROOT),
        )
        assert done.returncode != 0, args
        assert done.stderr.strip().splitlines() == [f"error: {says}"], (args, done.stderr)
