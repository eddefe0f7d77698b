#!/usr/bin/env bash
# The tests, on a fresh machine: makes .venv, installs Polos with the test extras, then runs
# the linter, the formatter's check, the type checker (on everything that ships, strict on
# polos/), the layer contracts (import-linter) and the test suite against real nats-servers.
set -euo pipefail
cd "$(dirname "$0")"
source ./bootstrap.sh
"$PY" -m ruff check .
"$PY" -m ruff format --check .
"$PY" -m mypy polos services analytics bench ui
"$PY" -c "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
# Two workers, each a whole test file at a time (a file's module fixtures are built once): the
# suite mostly waits on servers and processes (a serial run keeps the load average under 1).
exec "$PY" -m pytest -q -n 2 --dist loadfile "$@"
