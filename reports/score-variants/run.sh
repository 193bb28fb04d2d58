#!/usr/bin/env bash
# Issue 19 item 3: the score variants probed on the test bed's warm start (the calibration's lead, s2-sft4, with grpo's
# advantages: the comparison's base, reports/testbed-calibration), same draws for every variant. Resumable:
# run it again with the same arguments to continue (probe --resume). Usage:
#   bash reports/score-variants/run.sh SEED [OUT_ROOT]      (about 3-4 minutes per draw on one thread)
set -euo pipefail
cd "$(dirname "$0")/../.."
seed=$1 root=${2:-runs/score-variants}
out="$root/probe-noise0.3-seed$seed"
resume=()
[ -f "$out/probe.json" ] && resume=(--resume)
exec "${PYTHON:-.venv/bin/python}" -m ippo.train.cli probe --seed "$seed" --arith-steps 2 --sft-steps 4 --ippo-base grpo \
  --temperature 1.0 --prompts-per-iter 4 --samples-per-prompt 8 --max-new-tokens 48 --reward-noise 0.3 \
  --draws 30 --no-stability --variants answer,centred,deflated --threads 1 --no-progress "${resume[@]}" --out "$out"
