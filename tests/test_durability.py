"""Durability settings: `polos up --sync always` runs a server that fsyncs every write before its
ack (asked of the running server, its /varz), the default keeps the shipped 10 s, a config it
cannot set is refused in one line, and the benchmark's --sync and --cluster modes run (tiny
sizes: that they work, never how fast)."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from polos import PolosClient, Worker
from polos._private.ops import auth
from polos._private.ops.cluster import free_ports
from polos._private.ops.server import (
    SYNC_CONFIG_FILE,
    EmbeddedServer,
    default_config,
    with_sync,
)
from polos.testing import fast_settings
from tests.helpers import ROOT
from tests.workflows.marked import marked

pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    env = dict(os.environ)
    for k in ("POLOS_NATS_URL", "POLOS_SYNC", "POLOS_REPLICAS"):
        env.pop(k, None)
    env["PYTHONPATH"] = str(ROOT)
    return env


def _monitored_config(tmp_path: Path) -> tuple[Path, int]:
    """The shipped nats.conf plus a monitoring port, so the test can ask the server itself."""
    (port,) = free_ports(1)
    conf = tmp_path / "base.conf"
    conf.write_text(default_config().read_text() + f"\nhttp: 127.0.0.1:{port}\n")
    return conf, port


def _varz(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/varz", timeout=10) as r:
        varz: dict[str, Any] = json.load(r)
        return varz


def _varz_jetstream(port: int) -> dict[str, Any]:
    config: dict[str, Any] = _varz(port)["jetstream"]["config"]
    return config


def _half_the_cores() -> int:
    return max(1, len(os.sched_getaffinity(0)) // 2)


async def _up(args: list[str], env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "polos", "up", *args],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=str(ROOT),
    )

    def read_url() -> str:
        assert proc.stdout is not None
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if "Polos is up: NATS_URL=" in line:
                return line.split("NATS_URL=", 1)[1].split()[0]
        raise AssertionError(f"polos up never came up: {''.join(seen)[-3000:]}")

    return proc, await asyncio.to_thread(read_url)


def _down(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def test_up_sync_always_runs_a_server_that_fsyncs_every_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under authentication (the default), as the client role: the run works, and the server
    says it syncs always."""
    monkeypatch.setenv("POLOS_TEST_LOG", str(tmp_path / "marks.log"))
    conf, mport = _monitored_config(tmp_path)
    data = tmp_path / "data"
    proc, url = await _up(
        [
            "--data-dir",
            str(data),
            "--port",
            "0",
            "--config",
            str(conf),
            "--sync",
            "always",
            "--no-ui",
            "--no-export",
            "--prefix",
            "dur",
        ],
        _env(),
    )
    try:
        js = _varz_jetstream(mport)
        assert js.get("sync_always") is True, js
        generated = (data / SYNC_CONFIG_FILE).read_text()
        assert "sync_interval: always" in _settings(generated)
        assert 'sync_interval: "10s"' not in _settings(generated)
        creds = json.loads((data / auth.CREDENTIALS_FILE).read_text())
        client_url = auth.url_for(creds, "dur-client", url)
        worker_url = auth.url_for(creds, "dur-worker", url)
        async with Worker([marked], settings=fast_settings(worker_url, prefix="dur")):
            client = await PolosClient.connect(settings=fast_settings(client_url, prefix="dur"))
            try:
                handle = await client.start(marked, {"steps": 3})
                assert await handle.result(timeout=30) == 14
            finally:
                await client.close()
    finally:
        _down(proc)
    assert proc.returncode == 0


async def test_up_without_sync_keeps_the_shipped_interval(tmp_path: Path) -> None:
    conf, mport = _monitored_config(tmp_path)
    data = tmp_path / "data"
    proc, _ = await _up(
        [
            "--no-auth",
            "--data-dir",
            str(data),
            "--port",
            "0",
            "--config",
            str(conf),
            "--no-ui",
            "--no-export",
        ],
        _env(),
    )
    try:
        js = _varz_jetstream(mport)
        assert not js.get("sync_always") and js["sync_interval"] == 10 * 10**9, js
        assert not (data / SYNC_CONFIG_FILE).exists()
        # The embedded server leaves the other half of the cores to the services.
        assert _varz(mport)["gomaxprocs"] == _half_the_cores()
    finally:
        _down(proc)


def test_the_embedded_servers_go_threads_are_half_the_cores_unless_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf, mport = _monitored_config(tmp_path)
    for given, expected in ((None, _half_the_cores()), ("3", 3)):
        if given is None:
            monkeypatch.delenv("GOMAXPROCS", raising=False)
        else:
            monkeypatch.setenv("GOMAXPROCS", given)
        server = EmbeddedServer(tmp_path / f"data-{given}", port=0, config=conf)
        server.start()
        try:
            varz = _varz(mport)
            assert varz["gomaxprocs"] == expected, (given, varz["gomaxprocs"], varz["cores"])
        finally:
            server.stop()


def _up_fails(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "polos", "up", *args],
        env=env,
        text=True,
        capture_output=True,
        cwd=str(ROOT),
        timeout=60,
    )


def test_up_sync_refuses_what_it_cannot_set(tmp_path: Path) -> None:
    bare = tmp_path / "bare.conf"
    bare.write_text("listen: 127.0.0.1:4222\n")
    out = _up_fails(
        [
            "--no-auth",
            "--data-dir",
            str(tmp_path / "d1"),
            "--port",
            "0",
            "--config",
            str(bare),
            "--sync",
            "always",
            "--no-ui",
            "--no-export",
        ],
        _env(),
    )
    assert out.returncode == 2, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and str(bare) in lines[0] and "jetstream" in lines[0], out.stderr

    out = _up_fails(
        ["--data-dir", str(tmp_path / "d2"), "--sync", "always"],
        dict(_env(), POLOS_NATS_URL="nats://127.0.0.1:1"),
    )
    assert out.returncode == 2 and "--sync" in out.stderr and "POLOS_NATS_URL" in out.stderr

    out = _up_fails(
        ["--data-dir", str(tmp_path / "d3"), "--port", "0", "--no-ui"],
        dict(_env(), POLOS_SYNC="sometimes"),
    )
    assert out.returncode == 2 and "unknown sync mode 'sometimes'" in out.stderr, out.stderr

    out = _up_fails(["--sync", "sometimes"], _env())
    assert out.returncode == 2 and "invalid choice" in out.stderr


def _settings(text: str) -> list[str]:
    """The config's lines that set something: its comments (nats.conf names both modes) aside."""
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def test_with_sync_sets_replaces_or_inserts() -> None:
    shipped = default_config().read_text()
    assert _settings(shipped).count('sync_interval: "10s"') == 1
    always = with_sync(shipped, "always")
    assert _settings(always).count("sync_interval: always") == 1
    assert not any(
        ln.startswith("sync_interval: ") and "always" not in ln for ln in _settings(always)
    )
    assert _settings(with_sync(always, "interval")).count('sync_interval: "10s"') == 1
    assert "sync_interval: always" not in _settings(with_sync(always, "interval"))
    # The comments are kept as they were.
    assert [ln for ln in always.splitlines() if ln.lstrip().startswith("#")] == [
        ln for ln in shipped.splitlines() if ln.lstrip().startswith("#")
    ]
    inserted = with_sync("jetstream {\n  max_file_store: 1GB\n}\n", "always")
    assert inserted.startswith("jetstream {\n  sync_interval: always\n  max_file_store")
    assert "sync_interval: always" in with_sync("jetstream: {}\n", "always")
    with pytest.raises(ValueError, match="no jetstream"):
        with_sync("# jetstream { sync_interval: 1s }\nport: 1\n", "always")


def _bench(*args: str, tmp_path: Path) -> dict[str, Any]:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "polos_bench", "--quick", "--json", str(out), *args],
        cwd=str(ROOT),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    print(proc.stdout[-4000:], proc.stderr[-4000:])
    report: dict[str, Any] = json.loads(out.read_text())
    assert proc.returncode == 0 and not report["failed"], report["failed"]
    assert report["publish_p50_ms"] > 0
    for f in report["figures"]:
        assert f["value"] is not None and math.isfinite(f["value"]) and f["value"] > 0, f
    return report


def test_bench_quick_sync_always_runs(tmp_path: Path) -> None:
    report = _bench("--sync", "always", tmp_path=tmp_path)
    assert "sync_interval always" in report["mode"]
    names = [f["name"] for f in report["figures"]]
    for expected in (
        "raw awaited JetStream publish p50",
        "step overhead p50",
        "10-step workflow end to end",
        "workflows/s",
        "failover: SIGKILL",
    ):
        assert any(expected in n for n in names), (expected, names)


def test_bench_quick_cluster_runs(tmp_path: Path) -> None:
    report = _bench("--cluster", "--only", "e2e", "--only", "throughput", tmp_path=tmp_path)
    assert report["mode"].startswith("3-node cluster, R3")
    names = [f["name"] for f in report["figures"]]
    assert any("end to end" in n for n in names) and any("workflows/s" in n for n in names)


def test_bench_refuses_sync_with_an_external_server() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "polos_bench",
            "--external",
            "--nats-url",
            "nats://127.0.0.1:1",
            "--sync",
            "always",
        ],
        cwd=str(ROOT),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "--external" in proc.stdout
