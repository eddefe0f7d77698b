"""The tables of BENCHMARKS.md from one sitting's results (the JSON files run_all.sh writes).

    python bench/peers/table.py /tmp/peers/results

Prints two Markdown tables: ``python -m bench`` in each durability mode (every value as the
range over the runs, beside its ratio to the floor of its own run), and the peers (the range
over the rounds of each script).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

MODES = {
    "interval": "single node, sync 10 s",
    "always": "single node, **sync always**",
    "cluster": "3-node cluster, R3",
}
# (label, figure name prefix, how to show it)
FIGURES: list[tuple[str, str, str]] = [
    ("awaited publish p50 (the floor)", "raw awaited JetStream publish p50", "ms"),
    ("awaited publish p99", "raw awaited JetStream publish p99", "ms"),
    ("pipelined publish", "raw pipelined JetStream publish", "rate"),
    ("step overhead p50", "step overhead p50", "ms"),
    ("10-step workflow end to end, sequential p50", "10-step workflow end to end", "ms"),
    ("  the same, as wf/s one at a time", "10-step workflow end to end", "seq"),
    ("  each further step", "  e2e part: per further step", "ms"),
    ("start -> first step p50", "start -> first step runs p50", "ms"),
    (
        "1,000 started at once, 1 worker",
        "10-step workflows/s, 1,000 started at once, 1 worker process",
        "wfs",
    ),
    (
        "1,000 started at once, 2 workers",
        "10-step workflows/s, 1,000 started at once, 2 worker",
        "wfs",
    ),
    (
        "200 started at once, 1 worker",
        "10-step workflows/s, 200 started at once, 1 worker process",
        "wfs",
    ),
    ("resume -> next step p50", "resume -> next step runs p50", "ms"),
    ("10,000 runs started and suspended", "10,000 runs started and suspended", "wfs"),
    ("time to resume all 10,000", "time to resume all 10,000", "s"),
    ("replay of a 1,000-step run", "replay of a run with 1000", "ms"),
    ("failover, default settings", "failover: SIGKILL -> standby claims (default", "s"),
    ("export to Parquet", "analytics export to Parquet", "rate"),
]


def rng(values: list[float], fmt: str) -> str:
    if not values:
        return "–"
    lo, hi = fmt.format(min(values)), fmt.format(max(values))
    return lo if lo == hi else f"{lo}–{hi}"


def figure(report: dict[str, Any], prefix: str) -> dict[str, Any] | None:
    return next((f for f in report["figures"] if f["name"].startswith(prefix)), None)


def bench_table(runs: dict[str, list[dict[str, Any]]]) -> str:
    head = "| figure | " + " | ".join(f"{MODES[m]} | × floor" for m in runs) + " |"
    lines = [head, "| --- |" + " ---: | ---: |" * len(runs)]
    loads = {
        m: [r.get("load_average_at_end", "?").split()[0] for r in rs] for m, rs in runs.items()
    }
    for label, prefix, kind in FIGURES:
        cells = []
        for reports in runs.values():
            vals, ratios = [], []
            for r in reports:
                f = figure(r, prefix)
                p = r["publish_p50_ms"]
                if f is None or f["value"] is None:
                    continue
                v = f["value"]
                if kind == "seq":
                    m = re.search(r"([\d.]+) wf/s sequential", f["note"])
                    if not m:
                        continue
                    v = float(m.group(1))
                    ratios.append(1000 / v / p)
                elif kind == "ms":
                    ratios.append(v / p)
                elif kind == "wfs":
                    ratios.append(1000 / v / p)
                elif kind == "s":
                    v = v / 1000
                vals.append(v)
            fmt = {
                "ms": "{:.2f} ms",
                "seq": "{:.0f} wf/s",
                "wfs": "{:.0f} wf/s",
                "s": "{:.1f} s",
                "rate": "{:,.0f}/s",
            }[kind]
            cells += [rng(vals, fmt), rng(ratios, "{:.1f}") if ratios else ""]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append(
        "| load average (1 min) at the end of each run | "
        + " | ".join(f"{', '.join(v)} | " for v in loads.values())
        + "|"
    )
    return "\n".join(lines)


def peer_table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| system | durability (as run) | sequential wf/s | concurrent wf/s (1,000 started) "
        "| per-step ms (p50) | fsync floor ms | per step × floor | load average |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results:
        rs = r["rounds"]
        lines.append(
            f"| {r['system']} {r['version']} ({r['mode'] or 'defaults'}) | {r['durability']} | "
            f"{rng([x['seq_wfs'] for x in rs], '{:.1f}')} | "
            f"{rng([x['conc_wfs'] for x in rs], '{:.1f}')} | "
            f"{rng([x['step_ms_p50'] for x in rs], '{:.2f}')} | "
            f"{r['floors_ms']['fsync 60 B p50']:.3f} | "
            f"{rng([x['step_ms_p50'] / r['floors_ms']['fsync 60 B p50'] for x in rs], '{:.1f}')} | "
            f"{r['load_average_start'].split()[0]} → {r['load_average_end'].split()[0]} |"
        )
    return "\n".join(lines)


def main(directory: str) -> int:
    d = Path(directory)
    runs: dict[str, list[dict[str, Any]]] = {}
    peers = []
    for path in sorted(d.glob("*.json")):
        data = json.loads(path.read_text())
        m = re.match(r"bench-(\w+)-\d+\.json$", path.name)
        if m and "figures" in data:
            runs.setdefault(m.group(1), []).append(data)
        elif "rounds" in data:
            peers.append(data)
    order = {m: i for i, m in enumerate(MODES)}
    runs = dict(sorted(runs.items(), key=lambda kv: order.get(kv[0], 99)))
    if runs:
        print(bench_table(runs), end="\n\n")
    if peers:
        print(peer_table(peers))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "."))
