#!/usr/bin/env bash
# Issue 19 step 4: the training comparison on the test bed (--preset testbed, reports/testbed-calibration): grpo
# (the base), I-PPO with the paper's score, I-PPO with a score variant (reports/score-variants) and the random-keep
# control, all on the grpo base, same seeds (same SFT warm starts and eval problems), one `ippo compare` sweep per
# reward-noise level, whose report.md gives per arm the mean and 95% t interval over seeds of the final eval (200
# problems, sampled and greedy) and the paired differences vs grpo. Every arm gets the same training wall-clock,
# 600 s on one thread (grpo fits 7-9 iterations, the filtered arms 5-8: the filter's validation gradient and scoring
# pass cost iterations; --iterations 16 is room, not a target; evals only at the start and the end); run two lanes
# at most, so that every run shares the machine alike. Resumable: run it again.
# Usage: bash reports/testbed-comparison/run.sh NOISE SEEDS VARIANT [OUT_ROOT]
#   e.g. bash reports/testbed-comparison/run.sh 0.3 0,1,2,3,4 centred    (16-18 minutes per run on one thread, measured)
set -euo pipefail
cd "$(dirname "$0")/../.."
noise=$1 seeds=$2 variant=$3 root=${4:-runs/testbed-comparison}
exec "${PYTHON:-.venv/bin/python}" -m ippo.train.cli compare --preset testbed --reward-noise "$noise" \
  --algos "grpo,ippo,ippo:score=$variant,ippo:keep_by=random" --seeds "$seeds" --wall-budget 600 --iterations 16 \
  --eval-every 16 --threads 1 --no-progress --resume \
  --out "$root/noise$noise"
