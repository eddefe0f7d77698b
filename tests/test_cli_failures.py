"""What a user sees when things are not where they should be: a server that is not there, wrong
credentials, a server that goes away and comes back, a second `polos up` on the same data, a
`polos up` killed with SIGKILL, and finding a `polos up` from another directory.

Real processes throughout (`polos ...`, `python -m polos_services.worker ...`) against real
nats-servers with authentication on; bounds on time are generous ("exits within 15 s").
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nats
import pytest

from polos import PolosClient
from polos._private.ops import auth
from polos._private.ops.server import EmbeddedServer, default_config
from polos.testing import PolosEnvironment, fast_settings
from tests.helpers import ROOT, stop, until
from tests.workflows.marked import marked

pytestmark = pytest.mark.slow

BOUND = 15.0  # "fails within a few seconds", with room for a loaded machine


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POLOS_")}
    env.update(PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", **extra)
    return env


def _polos(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "polos", *args],
        env=env or _env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(cwd or ROOT),
    )


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


def _lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


def _dead(pid: int) -> bool:
    """Gone, or a zombie nobody has reaped yet (it holds nothing any more)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")


@dataclass
class Up:
    """A `polos up` process, its output read by a thread so its pipe never fills."""

    proc: subprocess.Popen[str]
    data: Path
    prefix: str
    lines: list[str] = field(default_factory=list)
    url: str = ""

    @classmethod
    def start(cls, data: Path, prefix: str, *args: str, wait: bool = True) -> Up:
        proc = subprocess.Popen(
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
                prefix,
                *args,
            ],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=str(ROOT),
        )
        up = cls(proc, data, prefix)
        threading.Thread(target=up._read, daemon=True).start()
        if wait:
            deadline = time.monotonic() + 60
            while not up.url:
                if proc.poll() is not None or time.monotonic() > deadline:
                    up.stop()
                    raise AssertionError("polos up did not come up:\n" + "\n".join(up.lines))
                time.sleep(0.05)
        return up

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            m = re.search(r"Polos is up: NATS_URL=(\S+)", line)
            if m:
                self.url = m.group(1)

    @property
    def creds(self) -> dict[str, dict[str, str]]:
        return json.loads((self.data / auth.CREDENTIALS_FILE).read_text())  # type: ignore[no-any-return]

    def url_for(self, role: str) -> str:
        return auth.url_for(self.creds, f"{self.prefix}-{role}", self.url)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    running = Up.start(tmp_path_factory.mktemp("up") / "data", f"f{uuid.uuid4().hex[:8]}")
    yield running
    running.stop()


def _worker(url: str, prefix: str, log: Path, **extra: str) -> subprocess.Popen[bytes]:
    env = _env(POLOS_PREFIX=prefix, POLOS_TEST_LOG=str(log.with_suffix(".marks")), **extra)
    env.update(
        {
            k: v
            for k, v in fast_settings(url, prefix=prefix).to_env().items()
            if k not in ("POLOS_NATS_URL",)
        }
    )
    out = open(log, "ab")
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "polos_services.worker",
            "tests.workflows.marked",
            "--nats-url",
            url,
        ],
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        cwd=str(ROOT),
    )


async def _serves_a_run(url: str, prefix: str) -> None:
    client = await PolosClient.connect(settings=fast_settings(url, prefix=prefix))
    try:
        handle = await client.start(marked, {"steps": 2})
        assert await handle.result(timeout=30) == 5
    finally:
        await client.close()


# --------------------------------------------------------------------------- commands


@pytest.mark.parametrize(
    "command",
    [["runs"], ["analytics", "export", "--dir", "{tmp}"]],
    ids=["runs", "analytics-export"],
)
def test_a_command_with_a_wrong_url_fails_fast_with_one_line(
    command: list[str], tmp_path: Path
) -> None:
    url = f"nats://127.0.0.1:{_closed_port()}"
    t0 = time.monotonic()
    out = _polos("--nats-url", url, *(c.format(tmp=tmp_path) for c in command), timeout=BOUND)
    assert time.monotonic() - t0 < BOUND
    assert out.returncode == 1
    assert _lines(out.stderr) == [
        f"error: cannot connect to {url}: connection refused (no server listening there)"
    ], out.stderr
    assert out.stdout == ""


def test_a_command_with_a_wrong_password_fails_with_an_authorization_line(up: Up) -> None:
    good = up.url_for("client")
    wrong = re.sub(r":[^:@/]+@", ":not-the-password@", good)
    for url, says in (
        (wrong, "refused this user and password"),
        (up.url, "requires a user and password"),
    ):
        out = _polos("--nats-url", url, "--prefix", up.prefix, "runs", timeout=BOUND)
        assert out.returncode == 1
        lines = _lines(out.stderr)
        assert len(lines) == 1 and "authorization violation" in lines[0] and says in lines[0], lines
        assert "not-the-password" not in out.stderr  # the URL is shown without its password


async def test_a_client_from_user_code_fails_fast_with_a_typed_error() -> None:
    from polos import ConnectionFailedError

    url = f"nats://someone:secret@127.0.0.1:{_closed_port()}"
    with pytest.raises(ConnectionFailedError) as err:
        await asyncio.wait_for(PolosClient.connect(url), BOUND)
    assert err.value.reason == "refused" and err.value.retryable
    assert err.value.url == url.replace(":secret", "") and "secret" not in str(err.value)


# --------------------------------------------------------------------------- a worker


def test_a_worker_with_wrong_credentials_exits_with_one_line(up: Up, tmp_path: Path) -> None:
    wrong = re.sub(r":[^:@/]+@", ":not-the-password@", up.url_for("worker"))
    log = tmp_path / "worker.out"
    proc = _worker(wrong, up.prefix, log)
    try:
        assert proc.wait(BOUND) != 0
    finally:
        stop(proc)
    text = log.read_text()
    assert "Traceback" not in text
    assert _lines(text) == [
        f"error: cannot connect to {re.sub(r':[^:@/]+@', '@', wrong)}: authorization violation: "
        "the server refused this user and password (`polos credentials ROLE` prints the ones of "
        "the `polos up` in the data dir)"
    ], text


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[tuple[EmbeddedServer, str]]:
    """A server with authentication on that the test may kill and restart on its port."""
    prefix = f"r{uuid.uuid4().hex[:8]}"
    _, conf = auth.secure_server_config(tmp_path / "srv", prefix, default_config())
    server = EmbeddedServer(tmp_path / "srv", port=0, config=conf)
    server.start()
    yield server, prefix
    server.stop()


async def test_a_worker_says_lost_and_back_once_and_keeps_working(
    secured: tuple[EmbeddedServer, str], tmp_path: Path
) -> None:
    server, prefix = secured
    creds = json.loads((server.data_dir / auth.CREDENTIALS_FILE).read_text())
    services = fast_settings(auth.url_for(creds, f"{prefix}-service", server.url), prefix=prefix)
    log = tmp_path / "worker.out"
    env = PolosEnvironment(services, [], with_worker=False)
    await env.start()
    proc = _worker(auth.url_for(creds, f"{prefix}-worker", server.url), prefix, log)
    try:
        await until(lambda: "serving" in log.read_text(), 30, "the worker to start")
        server.kill()
        await until(lambda: "lost the connection" in log.read_text(), BOUND, "the 'lost' line")
        await asyncio.sleep(2.0)  # several reconnect attempts fail meanwhile
        server.start()  # same port
        await until(lambda: "is back" in log.read_text(), BOUND, "the 'back' line")
        await _serves_a_run(auth.url_for(creds, f"{prefix}-client", server.url), prefix)
        assert proc.poll() is None
    finally:
        stop(proc)
        await env.stop()
    text = log.read_text()
    assert "Traceback" not in text, text
    assert text.count("lost the connection") == 1 and text.count("is back") == 1, text
    assert re.search(
        rf"lost the connection to nats://{prefix}-worker@127\.0\.0\.1:{server.port} "
        r"\(the server closed the connection\); reconnecting",
        text,
    ), text


async def test_a_worker_started_before_its_server_waits_and_says_so_once(
    secured: tuple[EmbeddedServer, str], tmp_path: Path
) -> None:
    server, prefix = secured
    creds = json.loads((server.data_dir / auth.CREDENTIALS_FILE).read_text())
    services = fast_settings(auth.url_for(creds, f"{prefix}-service", server.url), prefix=prefix)
    env = PolosEnvironment(services, [], with_worker=False)
    await env.start()
    log = tmp_path / "worker.out"
    server.kill()
    proc = _worker(auth.url_for(creds, f"{prefix}-worker", server.url), prefix, log)
    try:
        await until(lambda: "waiting for it" in log.read_text(), BOUND, "the 'waiting' line")
        await asyncio.sleep(2.0)  # several attempts fail meanwhile
        server.start()
        await until(lambda: "serving" in log.read_text(), BOUND, "the worker to start")
        await _serves_a_run(auth.url_for(creds, f"{prefix}-client", server.url), prefix)
    finally:
        stop(proc)
        await env.stop()
    text = log.read_text()
    assert "Traceback" not in text, text
    assert text.count("waiting for it") == 1 and text.count(" connected to ") == 1, text
    assert (
        f"cannot connect to nats://{prefix}-worker@127.0.0.1:{server.port}: connection "
        "refused (no server listening there); waiting for it" in text
    )


async def test_a_worker_whose_credentials_stop_working_on_a_reconnect_exits(
    secured: tuple[EmbeddedServer, str], tmp_path: Path
) -> None:
    server, prefix = secured
    creds = json.loads((server.data_dir / auth.CREDENTIALS_FILE).read_text())
    services = fast_settings(auth.url_for(creds, f"{prefix}-service", server.url), prefix=prefix)
    env = PolosEnvironment(services, [], with_worker=False)
    await env.start()  # the services make the topology a worker uses
    await env.stop()
    log = tmp_path / "worker.out"
    proc = _worker(auth.url_for(creds, f"{prefix}-worker", server.url), prefix, log)
    try:
        await until(lambda: "serving" in log.read_text(), 30, "the worker to start")
        # The server comes back with new passwords: the worker's no longer work.
        (server.data_dir / auth.CREDENTIALS_FILE).unlink()
        auth.secure_server_config(server.data_dir, prefix, default_config())
        server.kill()
        server.start()
        code = await asyncio.to_thread(proc.wait, BOUND)
    finally:
        stop(proc)
    text = log.read_text()
    assert code == 1, text
    assert "Traceback" not in text, text
    assert _lines(text)[-1].startswith(f"error: cannot connect to nats://{prefix}-worker@"), text
    assert "authorization violation" in _lines(text)[-1]


# --------------------------------------------------------------------------- polos up


@pytest.mark.parametrize("same_port", [True, False], ids=["same-port", "other-port"])
async def test_a_second_polos_up_on_the_same_data_is_refused(
    up: Up, same_port: bool, tmp_path: Path
) -> None:
    port = up.url.rsplit(":", 1)[1] if same_port else "0"
    before = {p.name: p.stat().st_mtime_ns for p in up.data.iterdir() if p.is_file()}
    log_size = (up.data / "nats-server.log").stat().st_size
    out = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "polos",
            "up",
            "--data-dir",
            str(up.data),
            "--port",
            port,
            "--prefix",
            up.prefix,
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=BOUND,
        cwd=str(ROOT),
    )
    assert out.returncode == 1
    assert _lines(out.stderr) == [
        f"error: polos up already runs on {up.data.resolve()} (pid {up.proc.pid}, {up.url}); "
        "stop it first, or give this one another --data-dir"
    ], out.stderr + out.stdout
    # Refused before touching anything: no second server wrote to the store's log, nothing
    # in the data dir changed, and the first still serves.
    assert (up.data / "nats-server.log").stat().st_size == log_size
    assert {p.name: p.stat().st_mtime_ns for p in up.data.iterdir() if p.is_file()} == before
    worker = _worker(up.url_for("worker"), up.prefix, tmp_path / "worker.out")
    try:
        await _serves_a_run(up.url_for("client"), up.prefix)
    finally:
        stop(worker)
    assert up.proc.poll() is None


def _lock(data: Path) -> dict[str, object]:
    return json.loads((data / "polos.lock").read_text())  # type: ignore[no-any-return]


async def test_a_sigkilled_polos_up_takes_its_server_along(tmp_path: Path) -> None:
    data = tmp_path / "data"
    prefix = f"k{uuid.uuid4().hex[:8]}"
    first = await asyncio.to_thread(Up.start, data, prefix)
    server_pid = int(str(_lock(data)["server_pid"]))
    assert not _dead(server_pid)
    first.proc.kill()  # SIGKILL: no finally, no cleanup
    first.proc.wait()
    await until(lambda: _dead(server_pid), BOUND, "the orphaned nats-server to die")
    # The lock died with its process: the next `polos up` on the data starts and serves.
    second = await asyncio.to_thread(Up.start, data, prefix)
    try:
        worker = _worker(second.url_for("worker"), prefix, tmp_path / "worker.out")
        try:
            await _serves_a_run(second.url_for("client"), prefix)
        finally:
            stop(worker)
    finally:
        second.stop()


def test_polos_up_names_a_leftover_server_and_what_to_do(tmp_path: Path) -> None:
    # Where a server cannot die with its `polos up` (not Linux), it is found by its pid file.
    data = tmp_path / "data"
    stray = EmbeddedServer(data, port=0)
    stray.start()
    try:
        assert stray.proc is not None
        out = _polos("up", "--data-dir", str(data), "--port", "0", timeout=BOUND)
        assert out.returncode == 1
        assert _lines(out.stderr) == [
            f"error: a nats-server (pid {stray.proc.pid}) left by an earlier `polos up` still "
            f"runs on {data.resolve()}: stop it (kill {stray.proc.pid}) and start again"
        ], out.stderr
        assert stray.proc.poll() is None
    finally:
        stray.stop()


def test_a_server_that_cannot_start_says_why(tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = taken.getsockname()[1]
        out = _polos("up", "--data-dir", str(tmp_path / "d"), "--port", str(port), timeout=60)
    finally:
        taken.close()
    assert out.returncode == 1
    assert _lines(out.stderr) == [
        f"error: nats-server exited with 1: Error listening on port: 127.0.0.1:{port}, "
        f'"listen tcp 127.0.0.1:{port}: bind: address already in use"'
    ], out.stderr


# --------------------------------------------------------------------------- credentials


async def test_credentials_in_every_format_name_the_running_server(up: Up) -> None:
    base = ["credentials", "client", "--data-dir", str(up.data), "--prefix", up.prefix]
    password = up.creds[f"{up.prefix}-client"]["password"]
    user = f"{up.prefix}-client"
    as_url = _polos(*base).stdout.strip()
    assert _polos(*base, "--format", "url").stdout.strip() == as_url
    assert as_url == up.url.replace("nats://", f"nats://{user}:{password}@")
    env_lines = dict(ln.split("=", 1) for ln in _lines(_polos(*base, "--format", "env").stdout))
    assert env_lines == {
        "NATS_URL": up.url,
        "NATS_USER": user,
        "NATS_PASSWORD": password,
        "POLOS_NATS_URL": as_url,
        "POLOS_PREFIX": up.prefix,
    }
    context = json.loads(_polos(*base, "--format", "context").stdout)
    assert {k: context[k] for k in ("url", "user", "password")} == {
        "url": up.url,
        "user": user,
        "password": password,
    }
    doc = json.loads(_polos(*base, "--format", "json").stdout)
    assert doc["url"] == up.url and doc["servers"] == [up.url] and doc["nats_url"] == as_url
    assert (doc["user"], doc["password"], doc["role"], doc["prefix"]) == (
        user,
        password,
        "client",
        up.prefix,
    )
    # Each form connects: the URL as Polos takes it, user and password apart as the Node and
    # Go clients take them.
    await _serves_nothing_but_connects(as_url, up.prefix)
    nc = await nats.connect(
        env_lines["NATS_URL"],
        user=env_lines["NATS_USER"],
        password=env_lines["NATS_PASSWORD"],
        allow_reconnect=False,
    )
    await nc.close()


async def _serves_nothing_but_connects(url: str, prefix: str) -> None:
    client = await PolosClient.connect(settings=fast_settings(url, prefix=prefix))
    try:
        assert isinstance(await client.list_runs(limit=1), list)
    finally:
        await client.close()


def test_credentials_without_a_running_polos_up_say_so(tmp_path: Path) -> None:
    data = tmp_path / "data"
    auth.ensure_credentials(data / auth.CREDENTIALS_FILE, ["polos"])
    out = _polos("credentials", "client", "--data-dir", str(data))
    assert out.returncode == 1 and out.stdout == ""
    assert _lines(out.stderr) == [
        f"error: no `polos up` runs on {data.resolve()}, so its URL is unknown: start it, or "
        "name the server with --nats-url"
    ]


def test_a_polos_up_is_found_from_another_directory(up: Up, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for args, env in (
        (["--prefix", up.prefix, "workers"], _env(POLOS_DATA_DIR=str(up.data))),
        (["--data-dir", str(up.data), "--prefix", up.prefix, "workers"], _env()),
        (["workers", "--data-dir", str(up.data), "--prefix", up.prefix], _env()),
    ):
        out = _polos(*args, env=env, cwd=elsewhere)
        assert out.returncode == 0, (args, out.stderr)
        # It reached the server (its namespace has no worker yet), not a "cannot connect".
        assert out.stdout.startswith("no live workers"), out.stdout
    # Without either it looks in ./.polos, where no `polos up` runs.
    out = _polos("--prefix", up.prefix, "credentials", "client", cwd=elsewhere)
    assert out.returncode == 1 and "no credentials in .polos" in out.stderr
    out = _polos(
        "--prefix",
        up.prefix,
        "credentials",
        "client",
        cwd=elsewhere,
        env=_env(POLOS_DATA_DIR=str(up.data)),
    )
    assert out.returncode == 0 and out.stdout.strip() == up.url_for("client")
