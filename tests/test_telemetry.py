"""OpenTelemetry spans from the log, with the SDK's in-memory exporter and a real nats-server:
gen_ai attributes, one trace per root run across child runs and waits, exact span counts after a
worker SIGKILL and a replay on another worker, and no re-emission after a follower restart."""

from __future__ import annotations

import asyncio
import collections
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from polos import PolosClient, Worker
from polos import history as ev
from polos._private.ops import auth
from polos._private.ops.server import default_config
from polos._private.store import Names, append, connect, load_state
from polos.config import Settings
from polos.testing import EmbeddedServer, fast_settings
from polos_analytics.spans import (
    POSITION_KEY,
    SpanFollower,
    run_span_id,
    step_span_id,
    telemetry_bucket,
    trace_id_for,
)
from tests.helpers import counts, kill, marks, spawn, stop, until
from tests.test_analytics_workflows import plain_steps, support_agent
from tests.workflows.marked import Job

WORKER = ["-m", "polos_services.worker", "tests.workflows.marked"]


def _by_name(spans: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for s in spans:
        assert s.name not in out, f"span {s.name} emitted twice"
        out[s.name] = s
    return out


async def test_agent_run_spans_follow_gen_ai_conventions(env_factory: Any) -> None:
    env = await env_factory([support_agent])
    h = await env.client.start(support_agent, "o-9")
    await h.result(timeout=15)
    exporter = InMemorySpanExporter()
    async with SpanFollower(env.as_role("service"), exporter=exporter) as follower:
        handled = await follower.process_available()
    assert handled == 8
    all_spans = exporter.get_finished_spans()
    assert collections.Counter(s.name for s in all_spans) == {
        "run support_agent": 1,
        "chat dev-small": 3,
        "execute_tool lookup_order": 1,
        "execute_tool refund": 1,
    }
    spans = {s.name: s for s in all_spans}
    assert {s.context.trace_id for s in all_spans} == {trace_id_for(h.run_id)}
    run = spans["run support_agent"]
    assert run.parent is None and run.context.span_id == run_span_id(h.run_id)
    assert run.attributes["polos.status"] == "completed"
    assert run.attributes["polos.steps"] == 5
    assert [e.name for e in run.events] == ["claimed"]
    for s in all_spans:
        if s is not run:
            assert s.parent is not None and s.parent.span_id == run_span_id(h.run_id)
            assert s.start_time <= s.end_time
    llm = [s for s in all_spans if s.name == "chat dev-small"]
    assert len(llm) == 3
    first = min(llm, key=lambda s: s.attributes["polos.seq"])
    assert first.context.span_id == step_span_id(h.run_id, "llm:1")
    attrs = first.attributes
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.request.model"] == "dev-small"
    assert attrs["gen_ai.system"] == "devllm"
    assert attrs["gen_ai.usage.input_tokens"] == 100
    assert attrs["gen_ai.usage.output_tokens"] == 20
    assert tuple(attrs["gen_ai.response.finish_reasons"]) == ("tool_calls",)
    assert tuple(attrs["gen_ai.request.tools"]) == ("lookup_order", "refund", "escalate")
    assert tuple(attrs["polos.llm.tool_calls"]) == ("lookup_order",)
    assert attrs["polos.cost_usd"] == 0.001
    tool = spans["execute_tool refund"]
    assert tool.attributes["gen_ai.tool.name"] == "refund"
    assert tool.attributes["gen_ai.tool.call.id"] == "call_2"
    assert tool.attributes["polos.tool.decision"] == "llm:2"
    assert tool.status.status_code == StatusCode.OK


async def test_crash_and_replay_emit_each_span_once(
    env_factory: Any, subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    log = tmp_path / "marks.log"
    subprocess_env["POLOS_TEST_LOG"] = str(log)
    env = await env_factory([], with_worker=False)
    exporter = InMemorySpanExporter()
    follower = SpanFollower(env.as_role("service"), exporter=exporter)
    await follower.start()
    stop_follow = asyncio.Event()
    following = asyncio.create_task(follower.follow(stop_follow))
    w1 = spawn(WORKER, subprocess_env.as_role("worker"), tmp_path / "w1.out")
    w2 = None
    try:
        handle = await env.client.start("marked", Job(steps=10, step_seconds=0.05))
        await until(lambda: "start 5" in marks(log), 30, "step 5 to start")
        kill(w1)  # SIGKILL mid-step 5: steps 1-4 are on the log, step 5 is in flight
        w2 = spawn(WORKER, subprocess_env.as_role("worker"), tmp_path / "w2.out")
        assert await handle.result(timeout=30) == sum(i * i for i in range(1, 11))
        # The follower ran during the crash and the replay; let it reach the end of the log.
        last = (await load_state(env.client.nc, env.client.names, handle.run_id)).last_seq
        await until(lambda: follower.position >= last, 20, "the follower to catch up")
    finally:
        stop_follow.set()
        await asyncio.wait_for(following, 10)
        await follower.stop()
        stop(w1)
        if w2:
            stop(w2)
    started, _ = counts(log)
    spans = exporter.get_finished_spans()
    names = collections.Counter(s.name for s in spans)
    print(f"\nstep 5 started {started['5']}x across the crash; spans: {dict(names)}")
    assert started["5"] >= 1
    assert names == collections.Counter({f"step s{i}": 1 for i in range(1, 11)} | {"run marked": 1})
    run = next(s for s in spans if s.name == "run marked")
    claims = [e for e in run.events if e.name == "claimed"]
    assert [e.attributes["attempt"] for e in claims] == [1, 2]
    assert len({e.attributes["worker_id"] for e in claims}) == 2
    assert run.attributes["polos.attempts"] == 2 and run.attributes["polos.workers"] == 2

    # A restarted follower resumes from the saved position: nothing is emitted again.
    again = InMemorySpanExporter()
    async with SpanFollower(env.as_role("service"), exporter=again) as restarted:
        assert restarted.position >= last
        assert await restarted.process_available() == 0
    assert again.get_finished_spans() == ()


async def test_child_runs_and_waits_share_the_root_trace(env_factory: Any) -> None:
    env = await env_factory([plain_steps])
    names: Names = env.client.names
    js = env.orchestrator.js  # histories written as the services write them
    parent = await env.client.start(plain_steps, 1)
    await parent.result(timeout=15)
    # A grandchild chain written the way child runs are requested (no root id on the
    # grandchild: the follower finds the root through the parent).
    child = f"c1{parent.run_id[:10]}"
    grandchild = f"c2{parent.run_id[:10]}"
    await env.orchestrator.request_run(
        ev.RunRequested(
            run_id=child,
            workflow="plain_steps",
            input=1,
            parent_run_id=parent.run_id,
            parent_step="s0",
            root_run_id=parent.run_id,
            source="child",
        )
    )
    await env.client.get_handle(child).result(timeout=15)
    await env.orchestrator.request_run(
        ev.RunRequested(
            run_id=grandchild, workflow="plain_steps", input=0, parent_run_id=child, source="child"
        )
    )
    await env.client.get_handle(grandchild).result(timeout=15)
    # A wait that ends: suspended, then woken, on a run that then fails.
    waiter = "w1" + parent.run_id[:10]
    seq = await append(
        js,
        names,
        waiter,
        ev.RunRequested(run_id=waiter, workflow="manual"),
        expected_last_seq=0,
        msg_id=f"{waiter}/req",
    )
    for event in (
        ev.RunClaimed(run_id=waiter, worker_id="w-a", attempt=1),
        ev.RunSuspended(run_id=waiter, step="approval", kind="suspend", data={"x": 1}),
        ev.RunWoken(run_id=waiter, step="approval", reason="resume"),
        ev.RunClaimed(run_id=waiter, worker_id="w-b", attempt=2),
        ev.StepAttemptFailed(
            key="pay",
            kind="run",
            name="pay",
            attempt=1,
            error={"type": "IOError", "message": "down"},
            retry_in=0.0,
        ),
        ev.StepFailed(
            key="pay",
            kind="run",
            name="pay",
            error={"type": "IOError", "message": "down"},
            attempts=2,
        ),
        ev.RunFailed(run_id=waiter, error={"type": "StepFailedError", "message": "pay"}),
    ):
        seq = await append(
            js,
            names,
            waiter,
            event,
            expected_last_seq=seq,
            msg_id=f"{waiter}/{type(event).__name__}/{seq}",
        )

    exporter = InMemorySpanExporter()
    # A small batch and a tiny run cache: the follower must rebuild what it forgot from the log.
    async with SpanFollower(
        env.as_role("service"), exporter=exporter, batch=3, cache_size=1
    ) as follower:
        await follower.process_available()
    spans = exporter.get_finished_spans()
    root_trace = trace_id_for(parent.run_id)
    runs = {s.attributes["polos.run_id"]: s for s in spans if s.name.startswith("run ")}
    assert set(runs) >= {parent.run_id, child, grandchild, waiter}
    assert {runs[r].context.trace_id for r in (parent.run_id, child, grandchild)} == {root_trace}
    assert runs[child].parent.span_id == step_span_id(parent.run_id, "s0")
    assert runs[grandchild].parent.span_id == run_span_id(child)
    assert runs[grandchild].attributes["polos.root_run_id"] == parent.run_id

    waiter_spans = _by_name(s for s in spans if s.attributes["polos.run_id"] == waiter)
    assert set(waiter_spans) == {
        "run manual",
        "wait suspend approval",
        "step pay attempt 1",
        "step pay",
    }
    assert waiter_spans["wait suspend approval"].attributes["polos.wait.woken_by"] == "resume"
    assert waiter_spans["step pay"].status.status_code == StatusCode.ERROR
    assert waiter_spans["run manual"].status.status_code == StatusCode.ERROR
    assert [e.name for e in waiter_spans["run manual"].events] == [
        "claimed",
        "suspended",
        "woken",
        "claimed",
    ]
    print(
        f"\n{len(spans)} spans, {follower.stats.batches} batches, events {follower.stats.by_type}"
    )


async def test_telemetry_command_uses_standard_otel_environment(
    env_factory: Any, subprocess_env: dict[str, str]
) -> None:
    import subprocess
    import sys

    env = await env_factory([plain_steps])
    h = await env.client.start(plain_steps, 1)
    await h.result(timeout=15)
    subprocess_env.update(OTEL_TRACES_EXPORTER="console", OTEL_SERVICE_NAME="polos-test")
    proc = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "polos", "telemetry", "--once"],
        env=subprocess_env.as_role("service"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert '"name": "run plain_steps"' in proc.stdout
    assert '"service.name": "polos-test"' in proc.stdout
    assert "4 events -> 2 spans" in proc.stdout


# --------------------------------------------------------------------------- a real collector


class Collector:
    """A small OTLP/HTTP collector (POST /v1/traces, protobuf bodies decoded with
    opentelemetry-proto). Not listening until ``up()`` (connections are refused); then it
    answers 503 to the first ``fail`` requests and accepts the rest, counting spans by id."""

    def __init__(self) -> None:
        import socket

        with socket.socket() as s:  # a free port, left unbound: "down" refuses connections
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.received: collections.Counter[tuple[bytes, bytes]] = collections.Counter()
        self.names: dict[bytes, str] = {}
        self.fail = 0
        self.refused = 0
        self._server: Any = None

    def up(self, fail: int = 0) -> None:
        import http.server
        import threading

        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
            ExportTraceServiceResponse,
        )

        collector = self
        collector.fail = fail

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path != "/v1/traces":
                    self.send_error(404)
                    return
                if collector.fail > 0:
                    collector.fail -= 1
                    collector.refused += 1
                    self.send_error(503, "collector warming up")
                    return
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                for rs in request.resource_spans:
                    for ss in rs.scope_spans:
                        for span in ss.spans:
                            collector.received[(span.trace_id, span.span_id)] += 1
                            collector.names[span.span_id] = span.name
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def down(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def span_names(self) -> collections.Counter[str]:
        return collections.Counter(self.names[s] for (_, s) in self.received)


@pytest.fixture(scope="module")
def secured(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[EmbeddedServer, dict[str, Any]]]:
    """A nats-server with authentication on (the default of `polos up`), users per role."""
    d = tmp_path_factory.mktemp("auth")
    creds = auth.ensure_credentials(d / "credentials.json", list(_PREFIXES.values()))
    conf = auth.write_server_config(d / "nats-auth.conf", default_config(), creds)
    server = EmbeddedServer(d / "data", port=0, config=conf)
    server.start()
    yield server, creds
    server.stop()


_PREFIXES = {name: f"{name}{uuid.uuid4().hex[:8]}" for name in ("otlp", "noexp")}


def _as(secured: tuple[EmbeddedServer, dict[str, Any]], prefix: str, role: str) -> Settings:
    server, creds = secured
    return fast_settings(auth.url_for(creds, f"{prefix}-{role}", server.url), prefix=prefix)


@pytest.fixture
async def roles_stack(
    request: pytest.FixtureRequest, secured: tuple[EmbeddedServer, dict[str, Any]]
) -> AsyncIterator[dict[str, Any]]:
    """Services as the service user, a worker serving plain_steps as the worker user, a client
    as the client user, on the namespace the test names."""
    from polos_services.orchestrator import Orchestrator
    from polos_services.scheduler import Scheduler

    prefix = _PREFIXES[request.param]
    orch = Orchestrator(_as(secured, prefix, "service"))
    await orch.start()
    sched = Scheduler(_as(secured, prefix, "service"))
    await sched.start()
    worker = Worker([plain_steps], settings=_as(secured, prefix, "worker"))
    await worker.start()
    client = await PolosClient.connect(settings=_as(secured, prefix, "client"))
    service = _as(secured, prefix, "service")
    env = dict(os.environ)
    env.update(service.to_env())
    env.update(PYTHONPATH=str(Path(__file__).resolve().parents[1]), PYTHONUNBUFFERED="1")
    yield {"client": client, "service": service, "env": env}
    await client.close()
    await worker.stop()
    await sched.stop()
    await orch.stop()


async def _position(service: Settings) -> int | None:
    """The span follower's saved position, read as the service user."""
    import nats.js.errors

    nc = await connect(service, name="test-position")
    try:
        kv = await nc.jetstream().key_value(telemetry_bucket(Names(service.prefix)))
        try:
            entry = await kv.get(POSITION_KEY)
        except nats.js.errors.KeyNotFoundError:
            return None
        return int((entry.value or b"0").decode())
    except nats.js.errors.BucketNotFoundError:
        return None
    finally:
        await nc.close()


def _otlp_env(env: dict[str, str], collector: Collector) -> dict[str, str]:
    return {
        **env,
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_SERVICE_NAME": "polos-test",
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        # The exporter's own retries stay short; the follower's back-off does the rest.
        "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "0.5",
    }


@pytest.mark.parametrize("roles_stack", ["otlp"], indirect=True)
async def test_collector_down_then_up_every_span_arrives_once(
    roles_stack: dict[str, Any], tmp_path: Path
) -> None:
    client: PolosClient = roles_stack["client"]
    service: Settings = roles_stack["service"]
    runs = [await client.start(plain_steps, n) for n in (2, 3)]
    for h in runs:
        await h.result(timeout=15)
    collector = Collector()
    env = _otlp_env(roles_stack["env"], collector)
    follow = ["-m", "polos", "telemetry"]
    first_out, second_out = tmp_path / "follower1.out", tmp_path / "follower2.out"
    first = spawn(follow, env, first_out)
    second = None
    try:
        # Collector down (connections refused): the follower retries, logs it once, and keeps
        # its position before the spans it could not send.
        await until(lambda: "did not accept" in first_out.read_text(), 30, "the outage line")
        await asyncio.sleep(0.5)  # a few more failed tries
        assert await _position(service) in (None, 0)
        kill(first)  # SIGKILL mid-outage: what it read but never sent is not lost
        second = spawn(follow, env, second_out)
        await until(lambda: "did not accept" in second_out.read_text(), 30, "the outage line")
        collector.up(fail=3)  # up, but answering 503 at first
        expected = {"run plain_steps": 2, "step s0": 2, "step s1": 2, "step s2": 1}
        await until(lambda: collector.span_names() == expected, 30, "every span at the collector")
        # While up, new runs go straight through.
        late = await client.start(plain_steps, 1)
        await late.result(timeout=15)
        expected = {"run plain_steps": 3, "step s0": 3, "step s1": 2, "step s2": 1}
        await until(lambda: collector.span_names() == expected, 30, "the new run's spans")
        last = max(
            [(await load_state(client.nc, client.names, h.run_id)).last_seq for h in (*runs, late)]
        )

        async def caught_up() -> bool:
            return (await _position(service) or 0) >= last

        deadline = asyncio.get_running_loop().time() + 20
        while not await caught_up():
            assert asyncio.get_running_loop().time() < deadline, "position never advanced"
            await asyncio.sleep(0.05)
    finally:
        stop(first)
        if second is not None:
            stop(second)
    assert second.returncode == 0, second_out.read_text()
    log = second_out.read_text()
    print(f"\ncollector refused {collector.refused} requests; follower log:\n{log}")
    assert collector.refused == 3
    assert set(collector.received.values()) == {1}, "a span arrived twice"
    assert len(collector.received) == 9
    # One line when it started failing, one when it recovered; none of the exporter's own.
    assert log.count("did not accept") == 1
    assert log.count("accepts spans again") == 1
    assert "opentelemetry.exporter" not in log

    # A restarted follower resumes after what the collector accepted: nothing is sent twice.
    proc = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "polos", "telemetry", "--once"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "0 events -> 0 spans" in proc.stdout
    assert len(collector.received) == 9 and set(collector.received.values()) == {1}
    collector.down()


_NO_OTLP = """
import sys
class NoOtlp:
    # What a machine without opentelemetry-exporter-otlp sees: the import fails.
    def find_spec(self, name, path=None, target=None):
        if name.startswith("opentelemetry.exporter.otlp"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, NoOtlp())
from polos.cli import main
sys.argv = ["polos", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize("roles_stack", ["noexp"], indirect=True)
async def test_follower_without_its_exporter_refuses_to_start(
    roles_stack: dict[str, Any], tmp_path: Path
) -> None:
    client: PolosClient = roles_stack["client"]
    service: Settings = roles_stack["service"]
    h = await client.start(plain_steps, 2)
    await h.result(timeout=15)
    collector = Collector()
    collector.up()
    env = _otlp_env(roles_stack["env"], collector)
    try:
        for args in (["telemetry"], ["telemetry", "--once"]):
            proc = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-c", _NO_OTLP, *args],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            print(proc.stderr)
            assert proc.returncode == 2, proc.stderr
            assert proc.stderr.count("\n") == 1, proc.stderr  # one line, no traceback
            assert "opentelemetry-exporter-otlp-proto-http" in proc.stderr
            assert "does not start" in proc.stderr
        # The grpc transport without its extra is refused the same way.
        proc = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-c", _NO_OTLP, "telemetry", "--once"],
            env={**env, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 2 and "polos[grpc]" in proc.stderr, proc.stderr
        # Nothing was consumed: no position, no span sent.
        assert await _position(service) in (None, 0)
        assert not collector.received
        # With the exporter there (installing it later), every span of the log goes out.
        proc = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "polos", "telemetry", "--once"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        assert collector.span_names() == {"run plain_steps": 1, "step s0": 1, "step s1": 1}
        assert set(collector.received.values()) == {1}
    finally:
        collector.down()


async def test_once_gives_up_on_a_dead_collector_without_moving(env_factory: Any) -> None:
    from polos_analytics.spans import ExportStalled

    env = await env_factory([plain_steps])
    h = await env.client.start(plain_steps, 1)
    await h.result(timeout=15)

    class Refusing(InMemorySpanExporter):
        calls = 0

        def export(self, spans: Any) -> SpanExportResult:
            Refusing.calls += 1
            return SpanExportResult.FAILURE

    async with SpanFollower(env.as_role("service"), exporter=Refusing()) as follower:
        with pytest.raises(ExportStalled, match="position stays at seq 0"):
            await follower.process_available(give_up_after=0.3)
        assert follower.position == 0 and Refusing.calls >= 2
    # The spans were not lost: the next follower sends every one of them.
    ok = InMemorySpanExporter()
    async with SpanFollower(env.as_role("service"), exporter=ok) as follower:
        await follower.process_available()
    assert collections.Counter(s.name for s in ok.get_finished_spans()) == {
        "run plain_steps": 1,
        "step s0": 1,
    }


async def test_an_outage_mid_batch_loses_and_repeats_nothing(env_factory: Any) -> None:
    env = await env_factory([plain_steps])
    for n in (3, 4):
        await (await env.client.start(plain_steps, n)).result(timeout=15)

    class Flaky(InMemorySpanExporter):
        """Accepts a chunk, refuses the next three tries, then accepts again."""

        calls = 0

        def export(self, spans: Any) -> SpanExportResult:
            Flaky.calls += 1
            if 2 <= Flaky.calls <= 4:
                return SpanExportResult.FAILURE
            return super().export(spans)

    flaky = Flaky()
    # Chunks of two spans inside batches of five events: the outage falls mid-batch.
    async with SpanFollower(
        env.as_role("service"), exporter=flaky, batch=5, export_chunk=2
    ) as follower:
        await follower.process_available()
        last = follower.position
    ids = collections.Counter(s.context.span_id for s in flaky.get_finished_spans())
    assert set(ids.values()) == {1}
    assert collections.Counter(s.name for s in flaky.get_finished_spans()) == {
        "run plain_steps": 2,
        "step s0": 2,
        "step s1": 2,
        "step s2": 2,
        "step s3": 1,
    }
    assert Flaky.calls > 5
    async with SpanFollower(env.as_role("service"), exporter=InMemorySpanExporter()) as restarted:
        assert restarted.position == last
        assert await restarted.process_available() == 0
