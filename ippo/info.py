"""``python -m ippo.info``: versions, devices, and which influence backends run here (and why not)."""

from __future__ import annotations

import importlib.metadata
import platform

import torch

import ippo
from ippo.kernels import cuda_backend
from ippo.kernels.backends import BACKEND_NAMES, ENV_VAR, requested_backend, unavailable_reason


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def report() -> str:
    lines = [f"ippo {ippo.__version__} | python {platform.python_version()} | torch {torch.__version__} | "
             f"triton {_version('triton')} | transformers {_version('transformers')} | peft {_version('peft')}"]
    has_cuda = torch.cuda.is_available()
    lines.append(f"CUDA device: {torch.cuda.get_device_name() if has_cuda else 'none'}")
    lines.append(f"{ENV_VAR}={requested_backend()} (auto: triton on CUDA tensors, torch on CPU tensors)")
    for name in BACKEND_NAMES:
        reasons = {device: unavailable_reason(name, device) for device in ("cpu", "cuda")}
        where = [device for device, reason in reasons.items() if reason is None]
        if name == "cuda":
            status = cuda_backend.describe()
        elif where:
            status = "runs on " + " and ".join(f"{d} tensors" for d in where)
        else:
            status = "unavailable"
        lines.append(f"{name} backend: {status}")
        if name != "cuda":
            lines += [f"    not on {device} tensors: {reason}" for device, reason in reasons.items() if reason]
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
