#!/usr/bin/env bash
# Main job: set up the virtual environment if needed, then run swinkit end to end.
# SWINKIT_VENV picks the environment (default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
venv="${SWINKIT_VENV:-.venv}"
ensure_venv "$venv"
"$venv/bin/swinkit" info swin_tiny_patch4_window7_224
