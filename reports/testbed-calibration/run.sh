#!/usr/bin/env bash
# Issue 19's test-bed calibration sweep: one `ippo compare` sweep per candidate preset, resumable (run it again to
# go on; finished runs are skipped). Usage: bash reports/testbed-calibration/run.sh CANDIDATE SEEDS ALGOS [OUT_ROOT]
#   CANDIDATE: s3-sft20 | s3-sft20-lr3e-4 | s2-sft10 | s3-sft10 | s2-sft6 | s2-sft6-lr2e-4 | s2-sft4 | s2-sft3 |
#   s2-sft4-mb32 | s2-sft4-p8e1 | s2-sft4-p8e1-it8   (see README.md)
# Every candidate: temperature 1.0, 4 prompts x 8 samples, 20 iterations on one thread (a fixed count, not a wall
# budget: the machine is shared, so wall-clock per iteration varies; each run's metrics.jsonl has its training
# wall-clock), eval of the same 100 held-out problems at iterations 0, 10 and 20 (2 samples at 0.6 + greedy).
set -euo pipefail
cd "$(dirname "$0")/../.."
candidate=$1 seeds=$2 algos=$3 root=${4:-runs/calib}
case $candidate in
  s3-sft20) preset=(--arith-steps 3 --sft-steps 20 --lr 1e-4) ;;
  s3-sft20-lr3e-4) preset=(--arith-steps 3 --sft-steps 20 --lr 3e-4) ;;
  s2-sft10) preset=(--arith-steps 2 --sft-steps 10 --lr 1e-4) ;;
  s3-sft10) preset=(--arith-steps 3 --sft-steps 10 --lr 1e-4) ;;
  s2-sft6) preset=(--arith-steps 2 --sft-steps 6 --lr 1e-4) ;;
  s2-sft6-lr2e-4) preset=(--arith-steps 2 --sft-steps 6 --lr 2e-4) ;;
  s2-sft4) preset=(--arith-steps 2 --sft-steps 4 --lr 1e-4) ;;
  s2-sft3) preset=(--arith-steps 2 --sft-steps 3 --lr 1e-4) ;;
  s2-sft4-mb32) preset=(--arith-steps 2 --sft-steps 4 --lr 3e-4 --minibatch 32) ;;
  s2-sft4-p8e1) preset=(--arith-steps 2 --sft-steps 4 --lr 1e-4 --prompts-per-iter 8 --epochs 1 --iterations 16
    --eval-every 8 --eval-size 200 --final-eval-size 200) ;;
  s2-sft4-p8e1-it8) preset=(--arith-steps 2 --sft-steps 4 --lr 1e-4 --prompts-per-iter 8 --epochs 1 --iterations 8
    --eval-every 4 --eval-size 200 --final-eval-size 200) ;;
  *) echo "unknown candidate $candidate" >&2; exit 2 ;;
esac
exec "${PYTHON:-.venv/bin/python}" -m ippo.train.cli compare --algos "$algos" --seeds "$seeds" \
  --temperature 1.0 --prompts-per-iter 4 --samples-per-prompt 8 --max-new-tokens 48 --iterations 20 \
  --wall-budget 0 --eval-size 100 --final-eval-size 100 --eval-k 2 --eval-every 10 --no-eval-base \
  --threads 1 --no-progress "${preset[@]}" --resume --out "$root/$candidate"
