#!/usr/bin/env bash
# The main job: sets up .venv if needed, then runs the demo on the embedded model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/lynx-compile demo "$@"
