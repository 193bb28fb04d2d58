"""Which backend runs the influence kernels, and why the others don't.

IPPO_BACKEND=torch|triton|cuda names one: if it cannot run on the tensors' device, the op raises.
Unset (or ``auto``): triton on CUDA devices (torch, with one warning, when triton cannot run);
torch on every other device.
"""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType

import torch

ENV_VAR = "IPPO_BACKEND"
BACKEND_NAMES = ("torch", "triton", "cuda")
_MODULES = {"torch": "ippo.kernels.torch_backend", "triton": "ippo.kernels.triton_backend",
            "cuda": "ippo.kernels.cuda_backend"}
_warned: set[str] = set()


def triton_interpret() -> bool:
    """Whether TRITON_INTERPRET asks for Triton's CPU interpreter (any value but unset, "" and "0")."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unavailable_reason(name: str, device_type: str) -> str | None:
    """None if backend ``name`` can run on tensors of ``device_type``, else why not (one line)."""
    if name == "torch":
        return None
    if name == "triton":
        try:
            importlib.import_module("triton")
        except ImportError as err:
            return f"triton is not importable ({err}); pip install triton"
        if device_type == "cuda" or (device_type == "cpu" and triton_interpret()):
            return None
        if device_type == "cpu":
            return "triton runs CPU tensors only in its interpreter: set TRITON_INTERPRET=1"
        return f"triton does not run on {device_type} tensors"
    if name == "cuda":
        from ippo.kernels import cuda_backend

        reason = cuda_backend.build_problem()
        if reason is not None:
            return reason
        if device_type != "cuda":
            return f"the cuda backend runs only CUDA tensors, got {device_type} tensors"
        return None
    raise ValueError(f"{ENV_VAR} must be one of auto, {', '.join(BACKEND_NAMES)}; got {name!r}")


def _module(name: str) -> ModuleType:
    return importlib.import_module(_MODULES[name])


def requested_backend() -> str:
    """The value of IPPO_BACKEND, lower-cased; ``auto`` when unset."""
    name = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if name != "auto" and name not in BACKEND_NAMES:
        raise ValueError(f"{ENV_VAR} must be one of auto, {', '.join(BACKEND_NAMES)}; got {name!r}")
    return name


def select_backend(device: torch.device):
    """(name, backend) for tensors on ``device``, following IPPO_BACKEND (see module docstring)."""
    name = requested_backend()
    if name != "auto":
        reason = unavailable_reason(name, device.type)
        if reason is not None:
            raise RuntimeError(f"{ENV_VAR}={name} cannot run on {device.type} tensors: {reason}")
        return name, _module(name)
    if device.type == "cuda":
        reason = unavailable_reason("triton", "cuda")
        if reason is None:
            return "triton", _module("triton")
        if "triton" not in _warned:
            _warned.add("triton")
            warnings.warn(f"ippo: triton backend unavailable ({reason}); using the slower torch backend",
                          RuntimeWarning, stacklevel=3)
    return "torch", _module("torch")
