#!/usr/bin/env bash
# The whole comparison in one sitting, one system at a time (never two at once: they share the
# cores): `python -m bench` in each durability mode, then every peer script, Polos in each mode.
# Run from the repository with its .venv made (source ./bootstrap.sh) and the peers installed
# (bench/peers/install.sh). Output: one log and one JSON per run in $OUT.
#   bench/peers/run_all.sh [OUT]        ROUNDS=3 BENCH_RUNS=2 to change the counts;
#   QUICK=1 runs everything at its --quick size (checks the set-up, measures nothing)
set -uo pipefail
PEERS="${PEERS:-/tmp/peers}"
OUT="${1:-/tmp/peers/results-$(date -u +%Y%m%dT%H%M%S)}"
ROUNDS="${ROUNDS:-3}"
BENCH_RUNS="${BENCH_RUNS:-2}"
PY="${PY:-.venv/bin/python}"
RESTATE_SERVER="${RESTATE_SERVER:-$PEERS/restate-server/node_modules/@restatedev/restate-server-linux-x64/bin/restate-server}"
QUICK_ARGS=(); [ -n "${QUICK:-}" ] && QUICK_ARGS=(--quick)
mkdir -p "$OUT"
failed=0
run() {  # NAME COMMAND...: one run, its output to NAME.log and the terminal
  local name=$1; shift
  echo "=== $name $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/sitting.log"
  "$@" 2>&1 | tee "$OUT/$name.log" | grep -E '^(round|\||durability|FAILED|Traceback)'
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || { echo "FAILED: $name (exit $rc)" | tee -a "$OUT/sitting.log"; failed=1; }
}
{ "$PY" -c 'import polos._private.ops.server as s, subprocess; print(subprocess.run([s.server_binary(), "--version"], capture_output=True, text=True).stdout.strip())'
  nproc; uname -r; "$PY" --version; grep -m1 'model name' /proc/cpuinfo; } > "$OUT/machine.txt" 2>&1
for i in $(seq 1 "$BENCH_RUNS"); do
  for mode in interval always cluster; do
    args=(--sync "$mode"); [ "$mode" = cluster ] && args=(--cluster)
    run "bench-$mode-$i" "$PY" -m bench "${args[@]}" "${QUICK_ARGS[@]}" --json "$OUT/bench-$mode-$i.json"
  done
done
P=(--rounds "$ROUNDS" "${QUICK_ARGS[@]}")
run polos-interval "$PY" bench/peers/bench_polos.py "${P[@]}" --json "$OUT/polos-interval.json"
run polos-always "$PY" bench/peers/bench_polos.py --sync always "${P[@]}" --json "$OUT/polos-always.json"
run polos-cluster "$PY" bench/peers/bench_polos.py --cluster "${P[@]}" --json "$OUT/polos-cluster.json"
run restate "$PEERS/restate/bin/python" bench/peers/bench_restate.py --server "$RESTATE_SERVER" "${P[@]}" --json "$OUT/restate.json"
run langgraph "$PEERS/langgraph/bin/python" bench/peers/bench_langgraph.py "${P[@]}" --json "$OUT/langgraph.json"
run langgraph-sync "$PEERS/langgraph/bin/python" bench/peers/bench_langgraph.py --durability sync "${P[@]}" --json "$OUT/langgraph-sync.json"
run dbos "$PEERS/dbos/bin/python" bench/peers/bench_dbos.py "${P[@]}" --json "$OUT/dbos.json"
run temporal "$PEERS/temporal/bin/python" bench/peers/bench_temporal.py --rounds 2 "${QUICK_ARGS[@]}" --json "$OUT/temporal.json"
run temporal-memory "$PEERS/temporal/bin/python" bench/peers/bench_temporal.py --in-memory --rounds 2 "${QUICK_ARGS[@]}" --json "$OUT/temporal-memory.json"
echo "done $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg); results in $OUT" | tee -a "$OUT/sitting.log"
exit $failed
