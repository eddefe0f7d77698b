"""The benchmark runs end to end (tiny sizes: this checks it works, not how fast), and the
batch direct get it made faster still returns exactly what the log holds."""

from __future__ import annotations

import asyncio
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import nats
import orjson
import pytest
from nats.js.api import StorageType, StreamConfig

from polos._private.store import natspy, read_subject
from polos.testing import EmbeddedServer, fast_settings

ROOT = Path(__file__).resolve().parents[1]


def test_bench_quick_runs_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "polos_bench", "--quick", "--json", str(out)],
        cwd=str(ROOT),
        capture_output=True,
        text=True,
        timeout=120,
    )
    print(proc.stdout[-6000:])
    print(proc.stderr[-6000:])
    report = json.loads(out.read_text())
    assert not report["failed"], report["failed"]
    assert proc.returncode == 0, proc.stderr[-4000:]
    names = [f["name"] for f in report["figures"]]
    for expected in (
        "raw awaited JetStream publish p50",
        "step overhead p50",
        "replay of a run with",
        "10-step workflow end to end",
        "start -> first step",
        "workflows/s",
        "failover: SIGKILL",
        "suspended runs waiting",
    ):
        assert any(n.startswith(expected) or expected in n for n in names), (expected, names)
    for f in report["figures"]:
        assert f["value"] is not None and math.isfinite(f["value"]) and f["value"] > 0, f
    assert report["publish_p50_ms"] > 0
    # Throughput says what a run cost each process while the runs ran.
    rate = next(f for f in report["figures"] if "workflows/s" in f["name"])
    assert re.search(
        r"CPU ms per run: [0-9.]+ = orchestrator [0-9.]+, worker [0-9.]+", rate["note"]
    )
    # Figures that depend on features still being built are listed, never silently missing.
    from polos.workflow import Step

    if not hasattr(Step, "suspend"):
        assert any("suspend" in p for p in report["pending"])


def test_suspended_runs_with_copies(tmp_path: Path) -> None:
    """Most of the waiting runs written as copies of a real one: the copies count as suspended
    runs (their control events arrive), the orchestrator restarts past them, and the started
    runs are still resumed and completed through the services."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "polos_bench",
            "--quick",
            "--only",
            "suspend",
            "--suspended-runs",
            "300",
            "--started-runs",
            "40",
            "--json",
            str(out),
        ],
        cwd=str(ROOT),
        capture_output=True,
        text=True,
        timeout=120,
    )
    print(proc.stdout[-4000:])
    report = json.loads(out.read_text())
    assert proc.returncode == 0 and not report["failed"], (report["failed"], proc.stderr[-3000:])
    by_name = {f["name"]: f for f in report["figures"]}
    started = by_name["40 runs started and suspended"]
    assert "260 copies of a suspended run waiting already" in started["note"]
    assert re.search(r"CPU ms per run: [0-9.]+ = orchestrator", started["note"]), started["note"]
    assert "memory with 300 suspended runs: nats-server RSS" in by_name
    assert "resume -> next step runs p50 with 300 suspended runs waiting" in by_name
    resumed = by_name["time to resume 40 of the 300 suspended runs"]
    assert resumed["value"] > 0
    # 300 runs' control events are in the stream: three each, the copies included.
    read = next(f for f in report["figures"] if f["name"].startswith("history read"))
    stored = int(read["name"].split(", ")[1].split(" msgs")[0].replace(",", ""))
    assert stored >= 3 * 300, read["name"]


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--suspended-runs", "0"], "--suspended-runs must be at least 1"),
        (["--suspended-runs", "10", "--started-runs", "11"], "--started-runs must be between 1"),
        (["--started-runs", "0"], "--started-runs must be between 1"),
    ],
)
def test_bench_rejects_bad_sizes(args: list[str], error: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "polos_bench", "--only", "suspend", *args],
        cwd=str(ROOT),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and error in proc.stdout, proc.stdout + proc.stderr


def test_polos_bench_subcommand_is_registered() -> None:
    from polos.cli import COMMANDS, build_parser

    parser = build_parser()
    assert "bench" in COMMANDS
    args = parser.parse_args(["bench", "--quick", "--only", "publish"])
    assert args.quick and args.only == ["publish"]


def test_polos_bench_rejects_unknown_figure() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "polos_bench", "--only", "nonsense"],
        cwd=str(ROOT),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "unknown figure" in proc.stdout


async def test_read_subject_returns_exactly_the_log(plain_nats_server: EmbeddedServer) -> None:
    """Batches over 1,000, filters, start_seq, limit, and many concurrent reads on one
    connection (they share one inbox subscription) each get their own messages.

    On a server without authentication: the stream is a raw one of this test, not part of any
    namespace's topology, so no role may create it (and the reads are not a role's concern)."""
    settings = fast_settings(plain_nats_server.url)
    nc = await nats.connect(plain_nats_server.url)
    js = nc.jetstream()
    stream = f"{settings.prefix.upper()}_READTEST"
    p = settings.prefix
    await js.add_stream(
        StreamConfig(
            name=stream, subjects=[f"{p}.rt.>"], storage=StorageType.FILE, allow_direct=True
        )
    )
    try:
        futs = []
        for i in range(2500):
            subj = f"{p}.rt.{'a' if i % 3 else 'b'}.{i % 7}"
            futs.append(
                await js.publish_async(
                    subj, orjson.dumps({"i": i}), headers={"Nats-Msg-Id": f"m{i}"}
                )
            )
        await asyncio.gather(*futs)

        everything = await read_subject(nc, stream, f"{p}.rt.>")
        assert [m.seq for m in everything] == list(range(1, 2501))
        assert [orjson.loads(m.data)["i"] for m in everything] == list(range(2500))
        assert everything[5].headers is not None and everything[5].headers["Nats-Msg-Id"] == "m5"
        assert everything[5].subject == f"{p}.rt.a.5" and everything[5].time

        only_b = await read_subject(nc, stream, f"{p}.rt.b.*")
        assert [orjson.loads(m.data)["i"] for m in only_b] == list(range(0, 2500, 3))

        tail = await read_subject(nc, stream, f"{p}.rt.>", start_seq=2401)
        assert [m.seq for m in tail] == list(range(2401, 2501))

        limited = await read_subject(nc, stream, f"{p}.rt.>", start_seq=10, limit=1500)
        assert [m.seq for m in limited] == list(range(10, 1510))

        assert await read_subject(nc, stream, f"{p}.rt.nothing.>") == []

        filters = [f"{p}.rt.a.{k}" for k in range(7)] * 3
        results = await asyncio.gather(*(read_subject(nc, stream, f) for f in filters))
        for f, msgs in zip(filters, results, strict=True):
            assert msgs and all(m.subject == f for m in msgs)
            assert [m.seq for m in msgs] == sorted(m.seq for m in msgs)
        assert sum(len(r) for r in results[:7]) == len(everything) - len(only_b)
    finally:
        await js.delete_stream(stream)
        await nc.close()


def test_fast_header_parser_matches_nats_py() -> None:
    """The faster parser Polos installs gives nats-py's results on any input, odd ones too."""
    import random

    reference = natspy.NATS_HEADER_PARSER
    if reference is None:  # nats-py changed: Polos left its own parser in place
        pytest.skip("fast header parser not installed")
    from nats.aio.client import Client

    assert Client._parse_header_lines is natspy.parse_header_lines
    rnd = random.Random(7)
    alphabet = [
        b"a",
        b"Z",
        b":",
        b" ",
        b"\t",
        b"\r\n",
        b"\r",
        b"\n",
        b"\x1c",
        b"\x1f",
        b"\x00",
        b"\xc3\xa9",
        b"\xff",
        b"-",
        b"\x0b",
        b"\x0c",
        b"\x85",
        b"\xa0",
        b"\xc2\x85",
        b"\xc2\xa0",
        b"Nats-Msg-Id",
        b"123",
    ]
    for _ in range(20_000):
        raw = b"".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 30)))
        assert natspy.parse_header_lines(raw) == reference(raw), raw
