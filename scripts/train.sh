#!/usr/bin/env bash
# The main job: set up the environment, then train the embedded default end to end on the test bed
# (--preset testbed: SmolLM2-135M-Instruct on 2-step arith, a 4-step SFT warm start, cached; then 8 iterations of
# I-PPO on grpo), writing runs/ippo-seed0/ (metrics, report, checkpoint); measured time: see the README.
# Extra arguments go to `ippo train` and win over the preset (see `ippo train --help`); --resume continues a
# killed run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec ippo train --preset testbed "$@"
