"""Measure export throughput: ``python -m analytics.throughput --events 100000``.

Starts its own nats-server (embedded, temp store), fills the run-history stream with N events
shaped like real runs (10-step workflows; every fifth step an LLM call with its messages and
usage, as the agent records them), then times ``Exporter.export_once`` (read by sequence +
Parquet write), a DuckDB query over the ``runs`` and ``llm_calls`` views, and the span
follower over the same history (spans counted, not sent). Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
import uuid
from pathlib import Path

from polos import history as ev
from polos._private.ops.server import EmbeddedServer
from polos._private.store import Names, ensure_topology
from polos._private.store import connect as connect_nats
from polos.config import Settings


def _run_events(run_id: str, t: float) -> list[ev.Event]:
    out: list[ev.Event] = [
        ev.RunRequested(run_id=run_id, workflow="bench_agent", input={"n": 10}, at=t),
        ev.RunClaimed(run_id=run_id, worker_id="w1", attempt=1, at=t),
    ]
    for i in range(10):
        if i % 5 == 4:
            out.append(
                ev.StepCompleted(
                    key=f"llm:{i}",
                    kind="llm",
                    name="dev-small",
                    duration_ms=40.0,
                    at=t,
                    output={"content": "ok", "tool_calls": [], "reasoning": None},
                    meta={
                        "agent": "a",
                        "provider": "devllm",
                        "model": "dev-small",
                        "messages": [{"role": "user", "content": "x" * 200}] * 3,
                        "tools_offered": ["a", "b"],
                        "usage": {
                            "prompt_tokens": 300,
                            "completion_tokens": 20,
                            "cached_tokens": 0,
                            "total_tokens": 320,
                        },
                        "latency_ms": 40.0,
                        "finish_reason": "stop",
                        "cost_usd": 0.0004,
                    },
                )
            )
        else:
            out.append(
                ev.StepCompleted(
                    key=f"s{i}",
                    kind="run",
                    name="step",
                    output=i,
                    duration_ms=0.5,
                    started_at=t,
                    at=t,
                )
            )
    out.append(ev.RunCompleted(run_id=run_id, output=10, at=t))
    return out


async def measure(events: int, keep: bool) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="polos-export-bench-"))
    server = EmbeddedServer(tmp / "nats", port=0)
    server.start()
    try:
        settings = Settings(nats_url=server.url, prefix=f"b{uuid.uuid4().hex[:8]}")
        names = Names(settings.prefix)
        nc = await connect_nats(settings, "export-bench")
        js = nc.jetstream()
        await ensure_topology(js, names, settings)
        t0 = time.perf_counter()
        n = 0
        now = time.time()
        while n < events:
            run_id = uuid.uuid4().hex
            for e in _run_events(run_id, now):
                if n >= events:
                    break
                await nc.publish(names.run_subject(run_id, e.KIND), ev.encode(e))
                n += 1
        await nc.flush()
        while (await js.stream_info(names.runs_stream)).state.messages < events:
            await asyncio.sleep(0.05)
        fill = time.perf_counter() - t0
        size = (await js.stream_info(names.runs_stream)).state.bytes
        print(f"filled {events:,} events ({size / 1e6:.1f} MB) in {fill:.2f} s")

        from .export import Exporter
        from .sql import connect

        out = tmp / "export"
        async with Exporter(settings, out, nc=nc) as exporter:
            result = await exporter.export_once()
            again = await exporter.export_once()
        disk = sum(f.stat().st_size for f in out.rglob("*.parquet"))
        print(
            f"export: {result.total:,} events in {result.seconds:.2f} s = "
            f"{result.per_second:,.0f} events/s; {len(result.files)} files, "
            f"{disk / 1e6:.1f} MB Parquet; second run: {again.total} events in "
            f"{again.seconds * 1000:.1f} ms"
        )
        con = connect(out)
        t1 = time.perf_counter()
        row = con.execute(
            "select count(*), count(*) filter (where status = 'completed') from runs"
        ).fetchall()[0]
        t2 = time.perf_counter()
        cost = con.execute(
            "select sum(total_tokens), round(sum(cost_usd), 2) from llm_calls"
        ).fetchall()[0]
        t3 = time.perf_counter()
        print(
            f"duckdb: runs view {row[0]:,} runs ({row[1]:,} completed) in "
            f"{(t2 - t1) * 1000:.0f} ms; llm_calls tokens/cost {cost} in {(t3 - t2) * 1000:.0f} ms"
        )
        from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

        class Counting(SpanExporter):
            spans = 0

            def export(self, spans: object) -> SpanExportResult:
                Counting.spans += len(spans)  # type: ignore[arg-type]
                return SpanExportResult.SUCCESS

        from .spans import SpanFollower

        async with SpanFollower(settings, exporter=Counting(), nc=nc) as follower:
            t4 = time.perf_counter()
            handled = await follower.process_available()
            t5 = time.perf_counter()
        print(
            f"spans: {handled:,} events -> {Counting.spans:,} spans in {t5 - t4:.2f} s = "
            f"{handled / (t5 - t4):,.0f} events/s"
        )
        await nc.close()
    finally:
        server.stop()
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"kept {tmp}")


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m analytics.throughput")
    p.add_argument("--events", type=int, default=100_000)
    p.add_argument("--keep", action="store_true", help="keep the temp directory")
    args = p.parse_args()
    asyncio.run(measure(args.events, args.keep))


if __name__ == "__main__":
    main()
