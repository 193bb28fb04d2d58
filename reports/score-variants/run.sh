#!/usr/bin/env bash
# Issue 19 item 3: the score variants probed on the test bed's warm start (the calibration's lead, s2-sft4, with grpo's
# advantages: the comparison's base, reports/testbed-calibration), same draws for every variant. Resumable:
# run it again with the same arguments to continue (probe --resume). Usage:
#   bash reports/score-variants/run.sh SEED [OUT_ROOT]      (about 100 s per draw on one thread)
#   bash reports/score-variants/run.sh SEED OUT_ROOT WIDTH  (deflated alone at --deflate-dim WIDTH, same draws: how
#                                                            its AUCs move with the sketch width; ~50 s per draw)
set -euo pipefail
cd "$(dirname "$0")/../.."
seed=$1 root=${2:-runs/score-variants} width=${3:-}
if [ -n "$width" ]; then
  out="$root/probe-noise0.3-seed$seed-deflate$width" scores=(--score deflated --deflate-dim "$width")
else
  out="$root/probe-noise0.3-seed$seed" scores=(--variants answer,centred,deflated)
fi
resume=()
[ -f "$out/probe.json" ] && resume=(--resume)
# The test bed's sampling (--preset testbed), spelled out: the preset's eval and iteration defaults are no probe's.
exec "${PYTHON:-.venv/bin/python}" -m ippo.train.cli probe --seed "$seed" --arith-steps 2 --sft-steps 4 \
  --ippo-base grpo --temperature 1.0 --prompts-per-iter 4 --samples-per-prompt 8 --max-new-tokens 48 \
  --reward-noise 0.3 --draws 30 --no-stability "${scores[@]}" --threads 1 --no-progress "${resume[@]}" --out "$out"
