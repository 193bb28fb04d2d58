"""The cuda backend: CUDA C++ kernels from csrc/, compiled into ``ippo._C`` where nvcc exists."""

from __future__ import annotations

BUILD_HINT = "build it with `IPPO_BUILD_CUDA=1 pip install -e .` on a machine with nvcc (CUDA toolkit)"


def build_problem() -> str | None:
    """None if ``ippo._C`` was built with CUDA kernels, else why not, with how to build it."""
    try:
        from ippo import _C  # noqa: F401
    except ImportError as err:
        return f"not built ({err}); {BUILD_HINT}"
    return None
