"""Every feature under authentication, each as the role that uses it in production.

The session server has auth on (tests/conftest.py): the orchestrator and scheduler connect as
service, workers as worker, clients as client, processes too. A permission a role lacks fails
the test through the server's log, even when the code swallowed the refusal. And a namespace
whose topology nobody created fails fast, in one line naming what is missing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest

from polos import Agent, PolosClient, Queue, RateLimit, Worker, WorkflowContext, workflow
from polos._private import limits
from polos._private.ops import auth
from polos._private.store import (
    TOPOLOGY,
    Names,
    TopologyMissingError,
    connect,
    disconnect,
    ensure_topology,
)
from polos.agent import SharedMemory, agent_workflow
from polos.devllm import DevLLM, Reply
from polos.queues import configure_rate_limit
from polos.testing import RoleSettings, SecuredServer
from tests.helpers import ROOT, spawn, stop

pytestmark = pytest.mark.slow


@pytest.fixture
async def llm() -> Any:
    async with DevLLM() as server:
        yield server


async def polos(
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


async def until(cond: Any, what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = await cond()
        if got:
            return got
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# --------------------------------------------------------------------------- agents


async def test_the_order_agent_runs_in_a_worker_process_as_the_worker_role(
    env_factory: Any, subprocess_env: Any, llm: DevLLM, tmp_path: Path
) -> None:
    """The first-hour path: services up, `polos worker examples/order.py` as the worker role,
    `process_order` started by a client. Its agent is a child run whose LLM calls reserve
    through the limiter (the slots bucket) from the worker."""
    env = await env_factory([], with_worker=False)
    worker_env = dict(
        subprocess_env.as_role("worker"), OPENAI_BASE_URL=llm.url, OPENAI_API_KEY="dev"
    )
    proc = spawn(
        ["-m", "polos", "worker", str(ROOT / "examples" / "order.py")],
        worker_env,
        tmp_path / "worker.out",
    )
    try:
        await until(lambda: _serving(env.client, "process_order"), "the worker to register")
        handle = await env.client.start(
            "process_order", {"id": "R-1", "amount": 20.0, "email": "ada@example.com"}
        )
        await until(lambda: _waiting_for_event(env.client, handle.run_id), "the pickup wait")
        await env.client.publish_event("warehouse.pickup/R-1", {"dock": 4})
        out = await handle.result(timeout=60)
    finally:
        stop(proc)
    assert out["status"] == "completed" and out["dock"] == 4, out
    assert llm.chat_requests, "the agent never called the LLM"
    log = (tmp_path / "worker.out").read_text()
    assert "Violation" not in log and "Traceback" not in log, log


async def test_polos_up_polos_worker_and_the_cli_run_the_order_agent_with_auth_on(
    llm: DevLLM, tmp_path: Path
) -> None:
    """The reported path, all processes and their default credentials: `polos up` (auth on by
    default), `polos worker examples/order.py` and the CLI run from beside it, `polos queues`."""
    import os
    import re
    import signal

    data = tmp_path / "up"
    prefix = f"u{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("POLOS_")}
    env.update(
        PYTHONUNBUFFERED="1",
        POLOS_DATA_DIR=str(data),
        POLOS_PREFIX=prefix,
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
    )
    up = subprocess.Popen(
        [sys.executable, "-m", "polos", "up", "--port", "0"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=str(tmp_path),
    )
    worker = None
    try:
        assert up.stdout is not None
        for _ in range(50):
            line = await asyncio.to_thread(up.stdout.readline)
            if re.search(r"Polos is up: NATS_URL=", line):
                break
        else:
            raise AssertionError("polos up never said it was up")
        worker = spawn(
            ["-m", "polos", "worker", str(ROOT / "examples" / "order.py")],
            dict(env, OPENAI_BASE_URL=llm.url, OPENAI_API_KEY="dev"),
            tmp_path / "worker.out",
        )
        queues = await polos("queues", env=env)
        assert queues.returncode == 0, queues.stderr
        run_id = f"order-{uuid.uuid4().hex[:8]}"
        started = await polos(
            "start",
            "process_order",
            "--run-id",
            run_id,
            "--input",
            '{"id": "U-1", "amount": 20, "email": "ada@example.com"}',
            env=env,
        )
        assert started.returncode == 0 and run_id in started.stdout, started.stderr
        url = (
            await polos(
                "credentials", "client", "--nats-url", (data / "url").read_text().strip(), env=env
            )
        ).stdout.strip()
        async with await PolosClient.connect(url, prefix=prefix) as client:
            await until(lambda: _waiting_for_event(client, run_id), "the pickup wait", 60)
            sent = await polos("event", "warehouse.pickup/U-1", "--data", '{"dock": 4}', env=env)
            assert sent.returncode == 0, sent.stderr
            out = await client.get_handle(run_id).result(timeout=60)
        assert out["status"] == "completed" and out["dock"] == 4, out
        log = (tmp_path / "worker.out").read_text()
        assert "iolation" not in log and "Traceback" not in log, log
    finally:
        if worker is not None:
            stop(worker)
        up.send_signal(signal.SIGINT)
        try:
            up.wait(20)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait()


async def _serving(client: PolosClient, workflow_name: str) -> bool:
    return any(workflow_name in w.get("workflows", []) for w in await client.workers())


async def _waiting_for_event(client: PolosClient, run_id: str) -> bool:
    try:
        info = await client.get(run_id)
    except Exception:
        return False
    return info.status == "suspended" and (info.waiting or {}).get("kind") == "event"


# --------------------------------------------------------------------------- streaming

streamer = Agent("roles_streamer", model="gpt-4o-mini", stream=True)


@workflow
async def roles_stream_wf(ctx: WorkflowContext, text: str) -> str:
    r = await ctx.step.agent_invoke_and_wait("talk", streamer.with_input(text))
    return str(r.result)


async def test_a_client_follows_every_agents_live_deltas(env_factory: Any, llm: DevLLM) -> None:
    """The README's way: the client role subscribes to ``<prefix>.stream.>`` and sees the text
    a worker-role worker's agent streams."""
    streamer.config = dataclasses.replace(streamer.config, base_url=llm.url)
    text = "Deltas reach a client that may only read."
    llm.script(Reply.text(text))
    env = await env_factory([roles_stream_wf, agent_workflow])
    got: list[dict[str, Any]] = []
    finished = asyncio.Event()

    async def on_msg(msg: Any) -> None:
        doc = orjson.loads(msg.data)
        got.append(doc)
        if doc.get("done"):
            finished.set()

    sub = await env.client.nc.subscribe(env.client.names.deltas_filter, cb=on_msg)
    await env.client.nc.flush()
    h = await env.client.start(roles_stream_wf, "talk")
    assert await h.result(timeout=20) == text
    await asyncio.wait_for(finished.wait(), 10)
    await sub.unsubscribe()
    assert "".join(d.get("delta", "") for d in got) == text


# --------------------------------------------------------------------------- memory, limits

MODEL = "roles-model"
noted = Agent("roles_noter", model=MODEL, memory=True)


@workflow
async def roles_memory_wf(ctx: WorkflowContext, session: str) -> str:
    r = await ctx.step.agent_invoke_and_wait("note", noted.with_input("note it", session=session))
    return str(r.result)


async def test_agent_memory_and_token_limits_from_the_worker_role(
    env_factory: Any, llm: DevLLM
) -> None:
    """An agent in a worker writes the session's shared memory and takes its LLM call's
    tokens from a system-wide limit a client configured; the client reads both."""
    noted.config = dataclasses.replace(noted.config, base_url=llm.url)
    env = await env_factory([roles_memory_wf, agent_workflow])
    await configure_rate_limit(
        env.client,
        f"model:{MODEL}",
        RateLimit(tokens_per_minute=1_000_000, requests_per_minute=1000),
    )
    llm.script(
        Reply.tools(("memory_set", {"key": "plan", "value": {"step": 1}})), Reply.text("noted")
    )
    session = f"s{uuid.uuid4().hex[:8]}"
    assert await (await env.client.start(roles_memory_wf, session)).result(timeout=20) == "noted"
    memory = SharedMemory(env.client.js, env.settings.prefix, session)
    assert await memory.get("plan") == {"step": 1}
    store = limits.store_for(env.client.nc, env.client.js, env.client.names)
    bucket = await store.get(limits.rate_key(f"model:{MODEL}"))
    assert bucket is not None, "the worker's limiter wrote no token bucket"
    assert bucket.value["req"] < 1000  # the calls were taken from it


# --------------------------------------------------------------------------- queues

ROLES_QUEUE = Queue("roles_q", concurrency=1)
GATE: dict[str, asyncio.Event] = {}


@workflow(queue=ROLES_QUEUE)
async def roles_queued(ctx: WorkflowContext, tag: str) -> str:
    async def wait() -> str:
        await GATE[tag].wait()
        return tag

    return await ctx.step.run("wait", wait)


async def test_a_worker_registers_a_limited_queue_and_a_client_sees_it(
    env_factory: Any, subprocess_env: Any
) -> None:
    tags = [uuid.uuid4().hex[:8] for _ in range(2)]
    for t in tags:
        GATE[t] = asyncio.Event()
    env = await env_factory([roles_queued])  # the worker-role worker registers roles_q
    handles = [await env.client.start(roles_queued, t) for t in tags]

    async def one_waits_one_runs() -> list[dict[str, Any]] | None:
        rows = await limits.queue_stats(env.client.nc, env.client.js, env.client.names)
        mine = [r for r in rows if r["queue"] == "roles_q"]
        return (
            mine
            if (sum(r["waiting"] for r in mine), sum(r["active"] for r in mine)) == (1, 1)
            else None
        )

    await until(one_waits_one_runs, "one run admitted and one waiting")
    out = await polos("queues", "--json", env=subprocess_env)
    assert out.returncode == 0, out.stderr
    rows = [r for r in orjson.loads(out.stdout) if r["queue"] == "roles_q"]
    assert {(r["waiting"], r["active"], r["limit"]) for r in rows} == {(0, 1, 1), (1, 0, 1)}
    for t in tags:
        GATE[t].set()
    assert sorted([await h.result(timeout=20) for h in handles]) == sorted(tags)


# --------------------------------------------------------------------------- payloads


@workflow
async def roles_echo_big(ctx: WorkflowContext, text: str) -> str:
    return await ctx.step.run("double", lambda: text + text)


async def test_payloads_larger_than_a_message_both_ways(env_factory: Any) -> None:
    """A client starts a run with an input bigger than one message, the worker returns a bigger
    output: both go through the payload store, each side as its role."""
    env = await env_factory([roles_echo_big])
    text = "x" * (env.client.nc.max_payload + 1000)
    handle = await env.client.start(roles_echo_big, text)
    out = await handle.result(timeout=60)
    assert out == text + text
    info = await env.client.get(handle.run_id)
    assert info.status == "completed" and len(info.output) == 2 * len(text)


# --------------------------------------------------------------------------- schedules

FIRED: list[str] = []


@workflow
async def roles_tick(ctx: WorkflowContext, tag: str) -> str:
    FIRED.append(tag)
    return tag


async def test_a_client_keeps_schedules_the_scheduler_fires(env_factory: Any) -> None:
    env = await env_factory([roles_tick])
    tag = uuid.uuid4().hex[:8]
    await env.client.create_schedule("roles-every-second", roles_tick, "@every 1s", input=tag)
    assert [s["key"] for s in await env.client.list_schedules()] == ["roles-every-second"]

    async def fired() -> bool:
        return FIRED.count(tag) >= 2

    await until(fired, "two firings of the schedule")
    assert await env.client.delete_schedule("roles-every-second") is True
    assert await env.client.list_schedules() == []
    assert await env.client.delete_schedule("roles-every-second") is False
    await asyncio.sleep(0.5)  # a firing already on its way may still land
    settled = FIRED.count(tag)
    await asyncio.sleep(2.5)
    assert FIRED.count(tag) == settled, "the deleted schedule kept firing"


# --------------------------------------------------------------------------- analytics


@workflow
async def roles_plain(ctx: WorkflowContext, n: int) -> int:
    return await ctx.step.run("inc", lambda: n + 1)


async def test_the_service_role_exports_and_polos_sql_sees_the_runs(
    env_factory: Any, subprocess_env: Any, tmp_path: Path
) -> None:
    env = await env_factory([roles_plain])
    handle = await env.client.start(roles_plain, 1)
    assert await handle.result(timeout=20) == 2
    out = tmp_path / "export"
    export = await polos(
        "analytics", "export", "--dir", str(out), env=subprocess_env.as_role("service")
    )
    assert export.returncode == 0, export.stderr
    sql = await polos(
        "sql",
        f"select status from runs where run_id = '{handle.run_id}'",
        "--dir",
        str(out),
        "--format",
        "json",
        env=subprocess_env,
    )
    assert sql.returncode == 0, sql.stderr
    assert orjson.loads(sql.stdout) == [{"status": "completed"}]


# --------------------------------------------------------------------------- the topology


@workflow
async def roles_nothing(ctx: WorkflowContext, n: int) -> int:
    return n


@pytest.fixture
def bare(nats_server: SecuredServer) -> Any:
    """A namespace whose users exist but whose topology nobody created."""
    s = nats_server.namespace()
    yield s
    nats_server.release(s.prefix)


async def test_without_a_topology_workers_and_clients_say_what_is_missing(
    bare: RoleSettings, subprocess_env: Any
) -> None:
    with pytest.raises(TopologyMissingError) as client_err:
        await PolosClient.connect(settings=bare)
    with pytest.raises(TopologyMissingError) as worker_err:
        await Worker([roles_nothing], settings=bare.worker).start()
    for err in (client_err.value, worker_err.value):
        text = str(err)
        assert bare.prefix in text and "polos init" in text and "polos up" in text, text
        assert "\n" not in text
    # The CLI: one line, the exit status, no traceback and no "nats: timeout".
    env = {**subprocess_env, "POLOS_PREFIX": bare.prefix, "POLOS_NATS_URL": bare.client.nats_url}
    for args, role in (
        (("runs",), "client"),
        (("queues",), "client"),
        (("worker", "tests.workflows.marked"), "worker"),
    ):
        out = await polos(*args, env={**env, "POLOS_NATS_URL": bare.as_role(role).nats_url})
        assert out.returncode == 1, (args, out)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, out.stderr)
        assert "polos init" in lines[0] and "timeout" not in lines[0], lines[0]
    check = await polos("init", "--check", env=env)
    assert check.returncode == 1 and "polos init" in check.stderr
    # `polos init` (the service role) creates it and exits; then everyone finds it.
    made = await polos("init", env={**env, "POLOS_NATS_URL": bare.service.nats_url})
    assert made.returncode == 0, made.stderr
    assert "is ready" in made.stdout
    check = await polos("init", "--check", env=env)
    assert check.returncode == 0, check.stderr
    async with await PolosClient.connect(settings=bare) as client:
        assert await client.list_runs() == []


async def test_one_missing_bucket_is_named_and_recreated_by_a_service(
    bare: RoleSettings, env_factory: Any
) -> None:
    nc = await connect(bare.service, name="test-service")
    try:
        js = nc.jetstream()
        await ensure_topology(js, Names(bare.prefix), bare.service)
        await js.delete_key_value(Names(bare.prefix).slots_bucket)
        with pytest.raises(TopologyMissingError) as err:
            await PolosClient.connect(settings=bare)
        text = str(err.value)
        assert f"KV bucket {bare.prefix}_slots" in text and "concurrency slots" in text, text
        assert f"{bare.prefix}_runs" not in text  # only what is missing
        # Any service's start puts it back.
        await ensure_topology(js, Names(bare.prefix), bare.service)
        async with await PolosClient.connect(settings=bare):
            pass
    finally:
        await disconnect(nc)


async def test_the_server_holds_exactly_the_catalogued_streams_as_configured(
    env_factory: Any, settings: RoleSettings, llm: DevLLM
) -> None:
    """After every feature ran, the namespace's streams on the server are the topology's rows,
    each as its row configures it (so the permissions, generated from the rows, cover them)."""
    noted.config = dataclasses.replace(noted.config, base_url=llm.url)
    env = await env_factory([roles_memory_wf, agent_workflow, roles_echo_big])
    llm.script(Reply.tools(("memory_set", {"key": "k", "value": 1})), Reply.text("ok"))
    await (await env.client.start(roles_memory_wf, "cat1")).result(timeout=20)
    await (await env.client.start(roles_echo_big, "y" * (env.client.nc.max_payload + 1))).result(
        timeout=60
    )
    js = env.orchestrator.js
    names = Names(settings.prefix)
    all_names: list[str] = []
    while True:  # the names of every stream on the server, a page at a time
        page = orjson.loads(
            (
                await env.orchestrator.nc.request(
                    "$JS.API.STREAM.NAMES", orjson.dumps({"offset": len(all_names)}), timeout=5
                )
            ).data
        )
        all_names += page.get("streams") or []
        if len(all_names) >= page["total"] or not page.get("streams"):
            break
    on_server = {
        n
        for n in all_names
        if n.startswith((names.upper + "_", f"KV_{settings.prefix}_", f"OBJ_{settings.prefix}_"))
    }
    assert on_server == set(auth.namespace_streams(settings.prefix))
    for row in TOPOLOGY:
        info = await js.stream_info(row.stream(names))
        want = row.config(names, settings)
        assert sorted(info.config.subjects or []) == sorted(want.subjects or []), row.name
        for attr in (
            "deny_delete",
            "allow_msg_ttl",
            "allow_direct",
            "allow_rollup_hdrs",
            "max_msgs_per_subject",
            "retention",
        ):
            if getattr(want, attr) is not None:
                assert getattr(info.config, attr) == getattr(want, attr), (row.name, attr)


def test_the_docs_list_each_roles_grants_as_generated() -> None:
    text = (ROOT / "docs" / "operations.md").read_text()
    assert auth.describe_roles() in text, "regenerate the table: auth.describe_roles()"
