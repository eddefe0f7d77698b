"""Polos as a new user meets it: the built wheel installed into a fresh virtual environment,
run from an empty directory, with `polos up`'s default authentication.

Nothing here imports the repository's code into the processes under test: they run the venv's
own `polos`, find the server and their role's credentials the way a user's would (the `.polos`
directory `polos up` made), and the agent talks to a local OpenAI-compatible server over HTTP
through the real `openai` client.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from polos.devllm import DevLLM
from tests.helpers import ROOT, kill, marks, stop

# Whichever test runs first builds and installs the wheel (the module's fixture): minutes on a
# busy machine, counted in that test's time.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


class Installed:
    """A fresh venv with the wheel installed; runs its commands from an empty directory."""

    def __init__(self, venv: Path, wheel: Path) -> None:
        self.venv = venv
        self.wheel = wheel
        self.bin = venv / "bin"

    def env(self, **extra: str) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("POLOS_", "OPENAI_", "PYTHON", "VIRTUAL_ENV"))
        }
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"
        env["PYTHONUNBUFFERED"] = "1"
        env.update(extra)
        return env

    def run(
        self, cwd: Path, *args: str, timeout: float = 60, **extra: str
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.bin / "polos"), *args],
            cwd=cwd,
            env=self.env(**extra),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def spawn(self, cwd: Path, log: Path, *args: str, **extra: str) -> subprocess.Popen[bytes]:
        out = open(log, "ab")
        return subprocess.Popen(
            [str(self.bin / "polos"), *args],
            cwd=cwd,
            env=self.env(**extra),
            stdout=out,
            stderr=subprocess.STDOUT,
        )


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    base = tmp_path_factory.mktemp("wheel")
    build = base / "build"
    # Built from a copy, so the build leaves nothing (build/, *.egg-info) in the checkout.
    shutil.copytree(
        ROOT,
        build,
        ignore=shutil.ignore_patterns(
            ".git",
            ".venv",
            "build",
            "dist",
            "*.egg-info",
            "__pycache__",
            ".polos",
            "exports",
            ".mypy_cache",
            ".ruff_cache",
            ".pytest_cache",
            ".hypothesis",
        ),
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(base), str(build)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    wheel = next(base.glob("polos-*.whl"))
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            # Byte-compiling every dependency (openai, anthropic, pyarrow...) was a third of
            # this fixture's time; the processes compile what they import as they run.
            "--no-compile",
            str(wheel),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    yield Installed(venv, wheel)


def test_the_wheel_installs_only_polos_names(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as whl:
        tops = {name.split("/", 1)[0] for name in whl.namelist()}
        names = set(whl.namelist())
    tops = {t for t in tops if not t.endswith(".dist-info")}
    assert tops == {
        "polos",
        "polos_services",
        "polos_analytics",
        "polos_bench",
        "polos_examples",
        "polos_ui",
    }
    # The web UI's templates and assets ship in the wheel (nothing is fetched at run time).
    assert {
        "polos_ui/templates/base.html",
        "polos_ui/static/style.css",
        "polos_ui/static/ui.js",
    } <= names
    # The server configuration and the demo's workflows are package data.
    assert "polos/_private/nats.conf" in names
    assert {"polos_examples/order.py", "polos_examples/ten_steps.py"} <= names
    conf = (ROOT / "nats.conf").read_text()
    with zipfile.ZipFile(installed.wheel) as whl:
        assert whl.read("polos/_private/nats.conf").decode() == conf


def _open_ui(login_url: str, path: str) -> str:
    """Open the UI's token URL (its session cookie), then ``path``; the page's HTML."""
    import http.cookiejar
    import urllib.request

    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    with opener.open(login_url, timeout=10) as r:
        assert r.status == 200
    base = login_url.split("/?", 1)[0]
    with opener.open(base + path, timeout=10) as r:
        return str(r.read().decode())


async def _until(cond: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = await asyncio.to_thread(cond)
        if got:
            return got
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _run_state(installed: Installed, cwd: Path, run_id: str) -> dict[str, Any] | None:
    out = installed.run(cwd, "runs", "--json", "--limit", "200")
    assert out.returncode == 0, out.stderr
    return next((r for r in orjson.loads(out.stdout) if r["run_id"] == run_id), None)


def _waiting_at(installed: Installed, cwd: Path, run_id: str, step: str) -> bool:
    r = _run_state(installed, cwd, run_id)
    return bool(r and r["status"] == "suspended" and (r.get("waiting") or {}).get("step") == step)


async def test_order_scenario_from_an_empty_directory_with_auth(
    installed: Installed, tmp_path: Path
) -> None:
    """polos up (auth on) → a worker serving examples/order.py by path → the order with its agent
    → worker SIGKILLed while the run waits → resume and event from the client → charged once."""
    home = tmp_path / "user"
    home.mkdir()
    # What a user has after copying the examples: the files, nothing of the repository.
    shutil.copytree(
        ROOT / "examples", home / "examples", ignore=shutil.ignore_patterns("__pycache__")
    )
    effects = home / "effects.log"
    up = installed.spawn(home, home / "up.log", "up", "--port", "0", "--ui-port", "0")
    workers: list[subprocess.Popen[bytes]] = []
    async with DevLLM() as llm:
        try:
            await _until(lambda: "Polos is up" in (home / "up.log").read_text(), 60, "polos up")
            creds = home / ".polos" / "credentials.json"
            assert creds.exists() and (creds.stat().st_mode & 0o777) == 0o600

            def worker(name: str) -> subprocess.Popen[bytes]:
                return installed.spawn(
                    home,
                    home / f"{name}.log",
                    "worker",
                    "examples/order.py",
                    "--worker-id",
                    name,
                    OPENAI_BASE_URL=llm.url,
                    POLOS_DEMO_LOG=str(effects),
                )

            workers.append(worker("worker-1"))
            await _until(
                lambda: "serving" in (home / "worker-1.log").read_text(), 60, "worker-1 to serve"
            )
            order = {"id": "A-1001", "amount": 2500, "email": "ada@example.com"}
            out = installed.run(
                home, "start", "process_order", "--input", orjson.dumps(order).decode()
            )
            assert out.returncode == 0, out.stdout + out.stderr
            run_id = out.stdout.split()[1]

            await _until(
                lambda: _waiting_at(installed, home, run_id, "fraud_review"),
                60,
                "the run to wait for the fraud review",
            )
            # The agent really called the model server, through the worker role's connection.
            assert llm.chat_requests, "the agent never called the LLM server"
            assert [ln.split()[1] for ln in marks(effects)] == ["charge"]

            kill(workers[0])  # SIGKILL while the run waits: it holds no worker anyway
            workers.append(worker("worker-2"))
            await _until(
                lambda: "serving" in (home / "worker-2.log").read_text(), 60, "worker-2 to serve"
            )

            out = installed.run(
                home,
                "resume",
                run_id,
                "fraud_review",
                "--data",
                '{"approved": true, "by": "fraud-team"}',
            )
            assert out.returncode == 0, out.stdout + out.stderr
            await _until(
                lambda: _waiting_at(installed, home, run_id, "wait_pickup"),
                60,
                "the run to wait for the pickup",
            )

            # The event from the user's own program, connected with the client's credentials.
            url = installed.run(home, "credentials", "client")
            assert url.returncode == 0, url.stderr
            script = home / "pickup.py"
            script.write_text(
                textwrap.dedent("""
                import asyncio, os, sys
                from polos import PolosClient

                async def main() -> None:
                    async with await PolosClient.connect(os.environ["POLOS_NATS_URL"]) as client:
                        await client.publish_event(sys.argv[1], {"dock": 4})

                asyncio.run(main())
            """)
            )
            pub = subprocess.run(
                [str(installed.bin / "python"), str(script), "warehouse.pickup/A-1001"],
                cwd=home,
                capture_output=True,
                text=True,
                timeout=60,
                env=installed.env(POLOS_NATS_URL=url.stdout.strip()),
            )
            assert pub.returncode == 0, pub.stderr

            done = await _until(
                lambda: (
                    (r := _run_state(installed, home, run_id)) and r["status"] == "completed" and r
                ),
                60,
                "the run to complete",
            )
            assert done["status"] == "completed"
            show = installed.run(home, "show", run_id, "--json")
            assert show.returncode == 0, show.stderr
            end = [e for e in orjson.loads(show.stdout) if e["event"] == "RunCompleted"]
            assert end and end[0]["output"]["status"] == "completed"
            assert end[0]["output"]["dock"] == 4

            # The web UI `polos up` serves, from the wheel's templates, opened with its token.
            [ui_url] = re.findall(r"^ui: (\S+)$", (home / "up.log").read_text(), flags=re.M)
            page = await asyncio.to_thread(_open_ui, ui_url, f"/runs/{run_id}")
            assert "process_order" in page and "fraud_review" in page

            lines = marks(effects)
            assert sum(ln.split()[1] == "charge" for ln in lines) == 1, lines
            assert sum(ln.split()[1] == "email" for ln in lines) == 1, lines
        finally:
            for w in workers:
                stop(w)
            for log in sorted(home.glob("*.log")):  # shown by pytest when the test fails
                print(f"----- {log.name}\n{log.read_text()[-4000:]}")
            if up.poll() is None:
                up.send_signal(signal.SIGINT)
                try:
                    up.wait(30)
                except subprocess.TimeoutExpired:
                    kill(up)
    assert up.returncode == 0, (home / "up.log").read_text()
    assert "Polos stopped" in (home / "up.log").read_text()


@pytest.mark.parametrize("scenario", ["order", "crash"])
def test_polos_demo_from_the_installed_package(
    installed: Installed, tmp_path: Path, scenario: str
) -> None:
    out = installed.run(tmp_path, "demo", "--scenario", scenario, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    if scenario == "order":
        assert "charge: 1x   email: 1x" in out.stdout
    else:
        assert "No completed step ran twice." in out.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # the demo leaves the directory empty


_POLOS_SCRIPT = """
import asyncio
from pydantic import BaseModel
from polos import Polos, WorkflowContext, workflow


class Order(BaseModel):
    id: str
    amount: float


def charge(order: Order) -> str:
    return f"ch_{order.id}"


@workflow
async def process_order(ctx: WorkflowContext, order: Order) -> dict:
    payment = await ctx.step.run("charge", charge, order)
    return {"status": "completed", "payment_id": payment, "amount": order.amount}


async def main() -> None:
    async with Polos() as polos:
        print(await process_order.run(polos, {"id": "A-1", "amount": 25.0}))


asyncio.run(main())
"""


def test_polos_object_from_an_empty_directory(installed: Installed, tmp_path: Path) -> None:
    """`async with Polos() as polos:` in a script, from the installed wheel: with nothing
    running it starts a local stack for itself (and says so, in one line); with a `polos up`
    running on the directory it uses that one, with its credentials."""
    home = tmp_path / "user"
    home.mkdir()
    (home / "order.py").write_text(_POLOS_SCRIPT)

    def script() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(installed.bin / "python"), "order.py"],
            cwd=home,
            env=installed.env(),
            capture_output=True,
            text=True,
            timeout=120,
        )

    expected = "{'status': 'completed', 'payment_id': 'ch_A-1', 'amount': 25.0}"
    for _ in range(2):  # the second time over the data the first one left
        out = script()
        assert out.returncode == 0, out.stdout + out.stderr
        assert out.stdout.strip() == expected
        said = out.stderr.strip().splitlines()
        assert len(said) == 1 and "started a local one for this process" in said[0], out.stderr
    creds = home / ".polos" / "credentials.json"
    assert creds.exists() and (creds.stat().st_mode & 0o777) == 0o600  # auth on, as polos up
    assert not (home / ".polos" / "polos.lock").read_text()  # released: nothing runs

    up = installed.spawn(home, home / "up.log", "up", "--port", "0", "--no-ui", "--no-export")
    try:
        deadline = time.monotonic() + 60
        while "Polos is up" not in (home / "up.log").read_text():
            assert time.monotonic() < deadline, (home / "up.log").read_text()
            assert up.poll() is None, (home / "up.log").read_text()
            time.sleep(0.2)
        out = script()
        assert out.returncode == 0, out.stdout + out.stderr
        assert out.stdout.strip() == expected
        assert "started a local one" not in out.stderr, out.stderr  # it used polos up's
        runs = installed.run(home, "runs", "--json")
        assert runs.returncode == 0, runs.stderr
        assert sum(r["workflow"] == "process_order" for r in orjson.loads(runs.stdout)) == 3
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(30)
        except subprocess.TimeoutExpired:
            kill(up)


def test_every_package_of_the_tree_is_in_the_wheel() -> None:
    """pyproject lists the wheel's packages by hand: a new package left out of the list works
    in the checkout (editable install) and is missing from the wheel."""
    import tomllib

    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "polos").rglob("__init__.py")
    }
    assert found - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
