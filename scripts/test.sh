#!/usr/bin/env bash
# The test command: sets up .venv if needed, then ruff and the whole pytest suite (CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest -q "$@"
