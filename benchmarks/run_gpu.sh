#!/usr/bin/env bash
# One command for a GPU machine without internet (torch, triton, CUDA toolkit, pybind11, cmake installed):
# builds ippo (with the CUDA extension), runs the GPU tests, the CUDA parity script and the benchmark suite,
# the end-to-end I-PPO iteration breakdown, and writes results, tables and plots to OUT_DIR. At most
# 490 s of stage limits (about 8 minutes on one H100).
#   bash benchmarks/run_gpu.sh OUT_DIR
# Each stage has its own time limit, so one slow stage cannot eat the others; a stage's failure is reported
# and the next stage still runs. Subset of benchmark configurations: IPPO_BENCH_CONFIGS="name,name".
# The benchmarks stage runs the whole suite, long studies included (IPPO_BENCH_FULL=1), and writes to OUT_DIR.
set -uo pipefail
out="${1:?usage: bash benchmarks/run_gpu.sh OUT_DIR}"
cd "$(dirname "$0")/.."
mkdir -p "$out"
export PYTHONUNBUFFERED=1 IPPO_BENCH_OUT="$out" IPPO_BENCH_FULL=1  # the long studies too (benchmarks/conftest.py)
status=0
stage() {  # stage NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s)"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - start))s"
  [ "$rc" = 0 ] || status=1
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
stage install 90 pip install -e . --no-build-isolation --no-deps
stage info 10 python -m ippo.info
stage tests 75 python -m pytest -q -x tests/test_influence_op.py tests/test_sketches.py tests/test_op_contract.py \
  tests/test_scorer.py tests/test_baselines.py  # tests/test_cuda_backend.py: run by cuda_parity
stage cuda_parity 45 python benchmarks/run_cuda_parity.py "$out"
stage benchmarks 180 python -m pytest benchmarks/ --benchmark-only -q -p no:cacheprovider
stage e2e_ippo 75 python benchmarks/e2e_ippo_iteration.py "$out" --prompts 32  # 256 episodes, the paper's buffer
stage report 15 python benchmarks/report.py "$out/cuda.json" --out "$out"
exit $status
