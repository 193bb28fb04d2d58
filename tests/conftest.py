import os
import sys
from pathlib import Path

import torch

# Without a GPU, Triton kernels run on CPU tensors through Triton's interpreter, which must be on
# before triton is imported; with one they compile.
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")

import pytest  # noqa: E402

from ippo.kernels.backends import unavailable_reason  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# benchmarks/ is a folder of scripts, not a package: its modules (baselines.py) import by their own names, as in
# benchmarks/ itself. Appended, so no benchmark module shadows anything.
sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.fixture(params=["torch", "triton", "cuda"])
def backend(request, monkeypatch):
    """Each backend that can run on this machine's device; the others are skipped with the reason."""
    reason = unavailable_reason(request.param, torch.device(DEVICE).type)
    if reason is not None:
        pytest.skip(f"{request.param} backend unavailable: {reason}")
    monkeypatch.setenv("IPPO_BACKEND", request.param)
    return request.param
