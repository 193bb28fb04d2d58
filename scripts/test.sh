#!/usr/bin/env bash
# Set up the environment, then run the whole test suite (Triton kernels through its CPU interpreter).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m ippo.info
export TRITON_INTERPRET="${TRITON_INTERPRET:-1}"
exec python -m pytest -q tests "$@"
