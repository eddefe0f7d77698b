"""How many times a system asks the kernel to flush to disk per workflow: counted, not read
from its documentation.

Runs one benchmark script (and every process it starts: servers, workers) twice under
``strace -f -c``, with ``--seq-runs`` LOW and then HIGH sequential runs and nothing else that
differs, and prints (calls in the second - calls in the first) / (HIGH - LOW) for each of the
flush system calls (``fsync``, ``fdatasync``, ``sync_file_range``, ``syncfs``, ``msync``).
Start-up, warm-up and shut-down are the same in both and cancel out. strace slows everything
down, so no timing from these runs means anything; only the counts do.

    python bench/peers/fsyncs.py -- /tmp/peers/dbos/bin/python bench/peers/bench_dbos.py
    python bench/peers/fsyncs.py --low 10 --high 60 -- .venv/bin/python bench/peers/bench_polos.py --sync always

Needs ``strace`` (Debian: ``apt-get install strace``).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CALLS = ("fsync", "fdatasync", "sync_file_range", "syncfs", "msync")


def count(cmd: list[str], runs: int, out: Path) -> dict[str, int]:
    summary = out / f"strace-{runs}.txt"
    proc = subprocess.run(
        [
            "strace",
            "-f",
            "-qq",
            "-c",
            "-o",
            str(summary),
            "-e",
            f"trace={','.join(CALLS)}",
            *cmd,
            "--rounds",
            "1",
            "--concurrent",
            "1",
            "--seq-runs",
            str(runs),
        ],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(
            f"{' '.join(cmd)} failed under strace:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
        )
    calls: dict[str, int] = dict.fromkeys(CALLS, 0)
    for line in summary.read_text().splitlines():
        # % time  seconds  usecs/call  calls  [errors]  syscall
        m = re.match(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$", line)
        if m and m.group(2) in calls:
            calls[m.group(2)] += int(m.group(1))
    return calls


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--low", type=int, default=10)
    p.add_argument("--high", type=int, default=60)
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- then the benchmark script's command")
    args = p.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        p.error("give the benchmark script's command after --")
    if shutil.which("strace") is None:
        raise SystemExit("strace is not installed (Debian: apt-get install strace)")
    with tempfile.TemporaryDirectory(prefix="fsyncs-") as d:
        low, high = count(cmd, args.low, Path(d)), count(cmd, args.high, Path(d))
    n = args.high - args.low
    per = {c: (high[c] - low[c]) / n for c in CALLS if high[c] or low[c]}
    total = sum(per.values())
    detail = ", ".join(f"{c} {v:.1f}" for c, v in per.items()) or "none"
    print(
        f"{' '.join(cmd)}: {total:.1f} flush calls per 10-step workflow ({detail}); "
        f"{args.low} runs: {sum(low.values())}, {args.high} runs: {sum(high.values())}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
