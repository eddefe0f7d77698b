#!/usr/bin/env bash
# The tests, on a fresh machine: makes .venv, installs Polos with the test extras, then runs
# the linter, the type checker (strict on polos/) and the test suite against real nats-servers.
set -euo pipefail
cd "$(dirname "$0")"
source ./bootstrap.sh
"$PY" -m ruff check .
"$PY" -m mypy polos services ui
exec "$PY" -m pytest -q "$@"
