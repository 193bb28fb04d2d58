#!/usr/bin/env bash
# Set up the environment, then run the main job: score episodes in one backward, checked against the loop.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec python -m ippo.demo "$@"
