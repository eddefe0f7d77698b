# Sourced by demo.sh and test.sh: find Python >= 3.11, make .venv, install Polos into it.
# Sets PY to the environment's interpreter. Re-running is cheap: pip skips what is installed.
PYTHON_BIN="${PYTHON:-}"
if [ -z "$PYTHON_BIN" ]; then
  for candidate in python3.13 python3.12 python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      PYTHON_BIN="$candidate"; break
    fi
  done
fi
if [ -z "$PYTHON_BIN" ]; then
  echo "Polos needs Python 3.11 or newer" >&2; exit 1
fi
if [ ! -x .venv/bin/python ]; then
  if ! "$PYTHON_BIN" -m venv .venv >/dev/null 2>&1; then
    # Debian without python3-venv: fall back to an environment-less install.
    rm -rf .venv
    echo "note: python -m venv is unavailable; installing into $PYTHON_BIN's site-packages" >&2
  fi
fi
if [ -x .venv/bin/python ]; then PY="$PWD/.venv/bin/python"; else PY="$PYTHON_BIN"; fi
if [ ! -f .venv/.polos-installed ] || [ pyproject.toml -nt .venv/.polos-installed ]; then
  "$PY" -m pip install --quiet --disable-pip-version-check --upgrade pip >/dev/null 2>&1 || true
  "$PY" -m pip install --quiet --disable-pip-version-check -e '.[test]'
  if [ -d .venv ]; then touch .venv/.polos-installed; fi
fi
export PY
