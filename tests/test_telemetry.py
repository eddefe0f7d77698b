"""OpenTelemetry spans from the log, with the SDK's in-memory exporter and a real nats-server:
gen_ai attributes, one trace per root run across child runs and waits, exact span counts after a
worker SIGKILL and a replay on another worker, and no re-emission after a follower restart."""

from __future__ import annotations

import asyncio
import collections
from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from polos import events as ev
from polos._private import jetstream as jsl
from polos._private.telemetry import (
    SpanFollower,
    run_span_id,
    step_span_id,
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
        "run support_agent": 1, "chat dev-small": 3, "execute_tool lookup_order": 1,
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
        last = (await jsl.load_state(env.client.nc, env.client.names, handle.run_id)).last_seq
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
    assert names == collections.Counter(
        {f"step s{i}": 1 for i in range(1, 11)} | {"run marked": 1}
    )
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
    names: jsl.Names = env.client.names
    js = env.orchestrator.js  # histories written as the services write them
    parent = await env.client.start(plain_steps, 1)
    await parent.result(timeout=15)
    # A grandchild chain written the way child runs are requested (no root id on the
    # grandchild: the follower finds the root through the parent).
    child = f"c1{parent.run_id[:10]}"
    grandchild = f"c2{parent.run_id[:10]}"
    await env.orchestrator.request_run(ev.RunRequested(
        run_id=child, workflow="plain_steps", input=1, parent_run_id=parent.run_id,
        parent_step="s0", root_run_id=parent.run_id, source="child"))
    await env.client.get_handle(child).result(timeout=15)
    await env.orchestrator.request_run(ev.RunRequested(
        run_id=grandchild, workflow="plain_steps", input=0, parent_run_id=child, source="child"))
    await env.client.get_handle(grandchild).result(timeout=15)
    # A wait that ends: suspended, then woken, on a run that then fails.
    waiter = "w1" + parent.run_id[:10]
    seq = await jsl.append(js, names, waiter, ev.RunRequested(run_id=waiter, workflow="manual"),
                           expected_last_seq=0, msg_id=f"{waiter}/req")
    for event in (
        ev.RunClaimed(run_id=waiter, worker_id="w-a", attempt=1),
        ev.RunSuspended(run_id=waiter, step="approval", kind="suspend", data={"x": 1}),
        ev.RunWoken(run_id=waiter, step="approval", reason="resume"),
        ev.RunClaimed(run_id=waiter, worker_id="w-b", attempt=2),
        ev.StepAttemptFailed(key="pay", kind="run", name="pay", attempt=1,
                             error={"type": "IOError", "message": "down"}, retry_in=0.0),
        ev.StepFailed(key="pay", kind="run", name="pay",
                      error={"type": "IOError", "message": "down"}, attempts=2),
        ev.RunFailed(run_id=waiter, error={"type": "StepFailedError", "message": "pay"}),
    ):
        seq = await jsl.append(js, names, waiter, event, expected_last_seq=seq,
                               msg_id=f"{waiter}/{type(event).__name__}/{seq}")

    exporter = InMemorySpanExporter()
    # A small batch and a tiny run cache: the follower must rebuild what it forgot from the log.
    async with SpanFollower(env.as_role("service"), exporter=exporter, batch=3, cache_size=1) as follower:
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
    assert set(waiter_spans) == {"run manual", "wait suspend approval", "step pay attempt 1",
                                 "step pay"}
    assert waiter_spans["wait suspend approval"].attributes["polos.wait.woken_by"] == "resume"
    assert waiter_spans["step pay"].status.status_code == StatusCode.ERROR
    assert waiter_spans["run manual"].status.status_code == StatusCode.ERROR
    assert [e.name for e in waiter_spans["run manual"].events] == [
        "claimed", "suspended", "woken", "claimed"]
    print(f"\n{len(spans)} spans, {follower.stats.batches} batches, events {follower.stats.by_type}")


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
        subprocess.run, [sys.executable, "-m", "polos", "telemetry", "--once"],
        env=subprocess_env.as_role("service"), capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert '"name": "run plain_steps"' in proc.stdout
    assert '"service.name": "polos-test"' in proc.stdout
    assert "4 events -> 2 spans" in proc.stdout
