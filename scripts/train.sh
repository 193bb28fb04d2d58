#!/usr/bin/env bash
# The main job: set up the environment, then train the embedded default end to end (SmolLM2-135M-Instruct on
# the arith task: SFT warm start, cached; then I-PPO), writing runs/ippo-seed0/ (metrics, report, checkpoint);
# about 9 minutes on 2 CPU cores after the set-up (8.5 measured, see the README).
# Extra arguments go to `ippo train` (see `ippo train --help`); --resume continues a killed run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec ippo train "$@"
