#!/usr/bin/env bash
# Set up the environment, lint, then run the whole test suite (without a GPU, Triton kernels run in its CPU
# interpreter: tests/conftest.py sets TRITON_INTERPRET=1; tests that need a device say why they skip).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check .
python -m ippo.info
exec python -m pytest -q tests "$@"
