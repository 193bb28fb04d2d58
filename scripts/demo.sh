#!/usr/bin/env bash
# Set up the environment, then run the one-minute kernel demo (the main job is scripts/train.sh): score a batch
# of episodes in one backward and check the scores against the per-episode loop's.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec python -m ippo.demo "$@"
