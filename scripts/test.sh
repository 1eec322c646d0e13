#!/usr/bin/env bash
# Run the test suite: sets up the virtual environment if needed, then pytest.
#   bash scripts/test.sh [pytest args...]     e.g.  bash scripts/test.sh -m slow
# SWINKIT_VENV picks the environment (default .venv). pytest's exit code is kept as is,
# so "no tests collected" (5) fails too.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
venv="${SWINKIT_VENV:-.venv}"
ensure_venv "$venv"
exec "$venv/bin/python" -m pytest "$@"
