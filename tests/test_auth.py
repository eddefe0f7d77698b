"""Security: per-role users with generated credentials, a client that cannot write history, a
worker that cannot leave its namespace, anonymous connections refused, TLS with a self-made CA."""

from __future__ import annotations

import shutil
import stat
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import nats.errors
import orjson
import pytest

from polos import PolosClient, Worker, WorkflowContext, workflow
from polos._private.ops import auth
from polos._private.ops.server import default_config
from polos._private.store import Names, connect, ensure_topology
from polos.testing import EmbeddedServer, fast_settings

pytestmark = pytest.mark.slow

A = f"a{uuid.uuid4().hex[:8]}"
B = f"b{uuid.uuid4().hex[:8]}"


@workflow
async def guarded(ctx: WorkflowContext, n: int) -> str:
    return await ctx.step.run("make", lambda: "z" * n)


@pytest.fixture(scope="module")
def secured(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[EmbeddedServer, dict[str, Any]]]:
    d = tmp_path_factory.mktemp("auth")
    creds = auth.ensure_credentials(d / "credentials.json", [A, B])
    conf = auth.write_server_config(d / "nats-auth.conf", default_config(), creds)
    server = EmbeddedServer(d / "data", port=0, config=conf)
    server.start()
    yield server, creds
    server.stop()


def _settings(secured: tuple[EmbeddedServer, dict[str, Any]], prefix: str, role: str) -> Any:
    server, creds = secured
    return fast_settings(auth.url_for(creds, f"{prefix}-{role}", server.url), prefix=prefix)


@pytest.fixture
async def stack(secured: tuple[EmbeddedServer, dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    """Namespace A with every process on its own role's user."""
    from polos_services.orchestrator import Orchestrator
    from polos_services.scheduler import Scheduler

    orch = Orchestrator(_settings(secured, A, "service"))
    await orch.start()
    sched = Scheduler(_settings(secured, A, "service"))
    await sched.start()
    worker = Worker([guarded], settings=_settings(secured, A, "worker"))
    await worker.start()
    client = await PolosClient.connect(settings=_settings(secured, A, "client"))
    yield {"client": client, "worker": worker, "orch": orch}
    await client.close()
    await worker.stop()
    await sched.stop()
    await orch.stop()


def test_credentials_are_generated_once_and_private(tmp_path: Path) -> None:
    path = tmp_path / "credentials.json"
    first = auth.ensure_credentials(path, ["polos"])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert set(first) == {"polos-service", "polos-worker", "polos-client"}
    assert len({c["password"] for c in first.values()}) == 3
    assert auth.ensure_credentials(path, ["polos"]) == first  # the next start reuses them
    conf = auth.write_server_config(tmp_path / "s.conf", default_config(), first)
    assert stat.S_IMODE(conf.stat().st_mode) == 0o600
    assert first["polos-client"]["password"] in conf.read_text()


async def test_each_role_can_do_its_job(stack: dict[str, Any]) -> None:
    client: PolosClient = stack["client"]
    handle = await client.start(guarded, 5)
    assert await handle.result(timeout=15) == "zzzzz"
    # A result bigger than a message: worker and client both use the payload store.
    big = client.nc.max_payload + 10
    handle = await client.start(guarded, big)
    assert len(await handle.result(timeout=30)) == big
    assert (await client.get(handle.run_id)).status == "completed"


async def _denied(nc: Any, subject: str, data: bytes = b"{}") -> bool:
    """True if a JetStream publish to ``subject`` got no ack (the server dropped it)."""
    try:
        await nc.jetstream(timeout=0.5).publish(subject, data)
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError, TimeoutError):
        return True
    return False


async def test_client_cannot_append_to_a_run_history(stack: dict[str, Any]) -> None:
    client: PolosClient = stack["client"]
    handle = await client.start(guarded, 1)
    await handle.result(timeout=15)
    before = await client.history(handle.run_id)
    forged = orjson.dumps({"t": "RunCompleted", "run_id": handle.run_id, "output": "forged"})
    assert await _denied(client.nc, client.names.run_subject(handle.run_id, "ctl"), forged)
    assert await _denied(client.nc, client.names.task_subject("guarded"))
    assert await client.history(handle.run_id) == before
    # ... and cannot pull another's tasks or read commands.
    tasks = client.names.tasks_stream
    assert await _denied(client.nc, f"$JS.API.CONSUMER.MSG.NEXT.{tasks}.wf_guarded")
    assert await _denied(client.nc, f"$JS.API.CONSUMER.CREATE.{tasks}")


async def test_worker_cannot_publish_into_another_namespace(
    secured: tuple[EmbeddedServer, dict[str, Any]], stack: dict[str, Any]
) -> None:
    worker_a = await connect(_settings(secured, A, "worker"), name="worker-a")
    service_b = await connect(_settings(secured, B, "service"), name="service-b")
    try:
        names_b = Names(B)
        await ensure_topology(service_b.jetstream(), names_b, _settings(secured, B, "service"))
        run_subject = names_b.run_subject("victim", "ctl")
        assert await _denied(worker_a, run_subject)
        assert await _denied(worker_a, names_b.start_subject("guarded"))
        assert await _denied(worker_a, names_b.task_subject("guarded"))
        info = await service_b.jetstream().stream_info(names_b.runs_stream)
        assert info.state.messages == 0
        # Within its own namespace the same user may append (the fence still applies).
        own = Names(A).run_subject(f"r{uuid.uuid4().hex}", "ctl")
        assert not await _denied(worker_a, own)
        # It may not create or delete streams either: not even the buckets of its own features
        # (the limiter used to create the slots stream from workers, and timed out).
        assert await _denied(worker_a, f"$JS.API.STREAM.DELETE.{Names(A).runs_stream}")
        assert await _denied(worker_a, f"$JS.API.STREAM.CREATE.KV_{Names(A).slots_bucket}")
        assert await _denied(worker_a, f"$JS.API.STREAM.CREATE.OBJ_{Names(A).payloads_bucket}")
    finally:
        await worker_a.close()
        await service_b.close()


async def test_a_service_manages_only_its_own_namespace(
    secured: tuple[EmbeddedServer, dict[str, Any]], stack: dict[str, Any]
) -> None:
    service_a = await connect(_settings(secured, A, "service"), name="service-a")
    service_b = await connect(_settings(secured, B, "service"), name="service-b")
    try:
        names_b = Names(B)
        await ensure_topology(service_b.jetstream(), names_b, _settings(secured, B, "service"))
        for api in (
            f"$JS.API.STREAM.DELETE.{names_b.runs_stream}",
            f"$JS.API.STREAM.PURGE.{names_b.cmd_stream}",
            f"$JS.API.STREAM.CREATE.KV_{B}_extra",
        ):
            assert await _denied(service_a, api), api
        assert (await service_b.jetstream().stream_info(names_b.runs_stream)).config.name
    finally:
        await service_a.close()
        await service_b.close()


async def test_anonymous_and_wrong_password_get_nothing(
    secured: tuple[EmbeddedServer, dict[str, Any]],
) -> None:
    server, _ = secured
    for url in (server.url, server.url.replace("nats://", f"nats://{A}-client:wrong@")):
        with pytest.raises(Exception) as info:
            await nats.connect(
                url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2
            )
        assert "uthorization" in str(info.value) or isinstance(info.value, nats.errors.Error)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
async def test_tls_with_a_self_made_certificate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca, cert, key = auth.make_self_signed(tmp_path / "tls")
    creds = auth.ensure_credentials(tmp_path / "credentials.json", ["tls"])
    conf = auth.write_server_config(
        tmp_path / "nats-tls.conf", default_config(), creds, tls=auth.render_tls(cert, key)
    )
    server = EmbeddedServer(tmp_path / "data", port=0, config=conf)
    server.start()
    try:
        url = auth.url_for(creds, "tls-client", server.url.replace("nats://", "tls://"))
        # Without trusting the self-made CA the certificate is refused.
        with pytest.raises(Exception):  # noqa: B017 - ssl or nats error, either is a refusal
            await nats.connect(
                url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2
            )
        monkeypatch.setenv("POLOS_TLS_CA", str(ca))
        nc = await connect(fast_settings(url, prefix="tls"), name="tls-test")
        try:
            assert nc.connected_url is not None and nc.connected_url.scheme == "tls"
            await nc.jetstream().account_info()
        finally:
            await nc.close()
    finally:
        server.stop()


async def test_polos_up_has_auth_on_generates_credentials_and_refuses_anonymous(
    tmp_path: Path,
) -> None:
    import asyncio
    import os
    import re
    import signal
    import subprocess
    import sys

    data = tmp_path / "up"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("POLOS_NATS_URL", None)
    up = subprocess.Popen(
        # Authentication is on by default: no flag.
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
            "upauth",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        url = None
        assert up.stdout is not None
        for _ in range(50):
            line = await asyncio.to_thread(up.stdout.readline)
            m = re.search(r"NATS_URL=(\S+)", line)
            if m:
                url = m.group(1)
                break
        assert url, "polos up printed no URL"
        for name in ("credentials.json", "nats-auth.conf"):
            assert stat.S_IMODE((data / name).stat().st_mode) == 0o600
        with pytest.raises(Exception):  # noqa: B017 - authorization violation
            await nats.connect(
                url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2
            )
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "polos",
                "credentials",
                "client",
                "--data-dir",
                str(data),
                "--nats-url",
                url,
                "--prefix",
                "upauth",
            ],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        ).stdout.strip()
        assert out.startswith("nats://upauth-client:")
        client = await PolosClient.connect(settings=fast_settings(out, prefix="upauth"))
        try:
            handle = await client.start("nobody_serves", 1)
            for _ in range(100):  # the orchestrator (service user) records the run
                try:
                    info = await client.get(handle.run_id)
                    break
                except Exception:
                    await asyncio.sleep(0.05)
            assert info.status == "queued"
        finally:
            await client.close()
        # The CLI run beside `polos up` finds the server and its role's credentials by itself.
        local = dict(env, POLOS_DATA_DIR=str(data))
        runs = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "polos", "runs", "--prefix", "upauth"],
            capture_output=True,
            text=True,
            env=local,
            timeout=60,
        )
        assert runs.returncode == 0, runs.stderr
        assert handle.run_id in runs.stdout
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(20)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait()
