"""The cuda backend: CUDA C++ kernels from csrc/, compiled into ``ippo._C`` where nvcc exists.

Same primitives as ``torch_backend`` (same math as the Triton kernels); ``lora_token_influence`` is the torch
one (an elementwise combine), and ``segment_sketch`` is not fused here yet: it is the torch reduction over this
backend's ``project_rows`` (O(tokens x m) transient memory).
Tensors cross into the extension as raw device pointers + dtype codes + strides, with the current torch
CUDA stream as an integer handle, so ``ippo._C`` does not link libtorch (see csrc/README.md).
"""

from __future__ import annotations

import functools
import math
import re

import torch

BUILD_HINT = "build it with `IPPO_BUILD_CUDA=1 pip install -e .` on a machine with nvcc (CUDA toolkit)"
# Must match ippo::DType in csrc/kernels.h.
DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}
NO_DEVICE = "built, no device"


def _extension():
    from ippo import _C

    return _C


def _import_error() -> str | None:
    try:
        _extension()
    except ImportError as err:
        return f"not built ({err}); {BUILD_HINT}"
    return None


def _arch_summary(ext) -> str:
    sass = [a for a in ext.archs if a.startswith("sm_")]
    ptx = [a for a in ext.archs if a.startswith("compute_")]
    text = ",".join(sass) or "no machine code"
    if ptx:
        text += f" (+PTX {','.join(ptx)})"
    return text


def _runs_on(archs: list[str], major: int, minor: int) -> bool:
    """Whether a fatbinary with ``archs`` has code for a compute capability major.minor device:
    sm_XY runs on X.Z for Z >= Y (sm_XYa only on X.Y); compute_XY PTX is JIT-compiled for any cc >= X.Y."""
    cc = 10 * major + minor
    for arch in archs:
        m = re.fullmatch(r"(sm|compute)_(\d+)(\d)([af]?)", arch)
        if not m:
            continue
        a_major, a_minor, suffix = int(m.group(2)), int(m.group(3)), m.group(4)
        if m.group(1) == "compute" and not suffix and cc >= 10 * a_major + a_minor:
            return True
        if m.group(1) == "sm" and a_major == major and (minor == a_minor if suffix else minor >= a_minor):
            return True
    return False


@functools.lru_cache(maxsize=None)
def _device_problem() -> str | None:
    ext = _extension()
    count, why = ext.device_status()
    if count == 0:
        driver = ext.driver_version()  # e.g. 12040 = CUDA 12.4; 0: no driver
        major, minor = (int(v) for v in ext.cuda_version.split("."))
        if driver and driver < 1000 * major + 10 * minor:
            return (f"built with CUDA {ext.cuda_version}, but the driver supports only CUDA "
                    f"{driver // 1000}.{driver % 1000 // 10}: update the NVIDIA driver or rebuild with an older "
                    f"CUDA toolkit ({why})")
        return f"{NO_DEVICE} ({'no CUDA driver; ' if not driver else ''}{why})"
    info = ext.device_info(0)
    if not _runs_on(list(ext.archs), info["major"], info["minor"]):
        return (f"built for {_arch_summary(ext)}, which cannot run on {info['name']} "
                f"(sm_{info['major']}{info['minor']}); rebuild with TORCH_CUDA_ARCH_LIST="
                f"\"{info['major']}.{info['minor']}\" IPPO_BUILD_CUDA=1 pip install -e .")
    return None


def build_problem() -> str | None:
    """None if ``ippo._C`` was built and can run here, else why not (one line), with how to fix it.

    Starts with "not built" when the extension is missing and with "built, no device" when it was built
    but this machine has no usable CUDA device (no GPU or no driver).
    """
    return _import_error() or _device_problem()


def describe() -> str:
    """One line for ``python -m ippo.info``: what ``ippo._C`` was built for and whether it runs here."""
    problem = _import_error()
    if problem is not None:
        return problem
    ext = _extension()
    built = f"built for {_arch_summary(ext)}, CUDA {ext.cuda_version} (cudart static)"
    problem = _device_problem()
    if problem is not None and problem.startswith(NO_DEVICE):
        return f"{NO_DEVICE}: {built}; {problem[len(NO_DEVICE):].strip(' ()')}"
    if problem is not None:
        return problem
    count, _ = ext.device_status()
    names = sorted({ext.device_info(i)["name"] for i in range(count)})
    return f"{built}; runs on cuda tensors ({count} device{'s' * (count > 1)}: {', '.join(names)})"


# ---- the backend primitives -------------------------------------------------------------------------

def _check_cuda(op: str, tensors: dict[str, torch.Tensor]) -> torch.device:
    problem = build_problem()
    if problem is not None:
        raise RuntimeError(f"cuda backend ({op}): {problem}")
    devices = {t.device for t in tensors.values()}
    if len(devices) != 1 or next(iter(devices)).type != "cuda":
        raise RuntimeError(f"cuda backend ({op}): needs all tensors on one CUDA device; got "
                           + ", ".join(f"{n} on {t.device}" for n, t in tensors.items()))
    for name, t in tensors.items():
        if t.dtype not in DTYPE_CODES:
            raise RuntimeError(f"cuda backend ({op}): {name} has unsupported dtype {t.dtype}")
    return devices.pop()


def _mat(t: torch.Tensor) -> tuple[int, int, int, int]:
    return (t.data_ptr(), DTYPE_CODES[t.dtype], t.stride(0), t.stride(1))


def token_influence(x, h, grad_y, grad_h, val_A, val_B, scaling: float, out: torch.Tensor) -> None:
    """out (N,) += grad_h[t] . (val_A x[t]) + scaling * grad_y[t] . (val_B h[t]); any strides, fp16/bf16/fp32/fp64
    inputs, out float32 (or float64) = the accumulation dtype. Runs on the current stream of the tensors' device."""
    device = _check_cuda("token_influence", dict(x=x, h=h, grad_y=grad_y, grad_h=grad_h, val_A=val_A, val_B=val_B,
                                                 out=out))
    if out.dtype not in (torch.float32, torch.float64):
        raise RuntimeError(f"cuda backend: out must be float32 or float64; got {out.dtype}")
    n, d_in = x.shape
    d_out, r = val_B.shape
    if n == 0:
        return
    _extension().token_influence(
        _mat(x), _mat(h), _mat(grad_y), _mat(grad_h), _mat(val_A), _mat(val_B),
        out.data_ptr(), DTYPE_CODES[out.dtype], out.stride(0), n, d_in, d_out, r, float(scaling),
        device.index, torch.cuda.current_stream(device).cuda_stream)


def lora_token_influence(h, x_va, g_vb, grad_h, scaling: float, out: torch.Tensor) -> None:
    """out (N,) += grad_h . x_va + scaling * h . g_vb: ``torch_backend.lora_token_influence`` (an elementwise
    combine of (N, r) tensors: no kernel of this backend's own)."""
    from ippo.kernels import torch_backend

    _check_cuda("lora_token_influence", dict(h=h, x_va=x_va, g_vb=g_vb, grad_h=grad_h, out=out))
    torch_backend.lora_token_influence(h, x_va, g_vb, grad_h, scaling, out)


def project_rows(x: torch.Tensor, salt: int, m: int, acc: torch.dtype) -> torch.Tensor:
    """(N, m) = x @ P^T in ``acc`` (float32 or float64), P = sign / sqrt(m) generated in the kernel from ``salt``."""
    device = _check_cuda("project_rows", dict(x=x))
    if acc not in (torch.float32, torch.float64):
        raise RuntimeError(f"cuda backend: acc must be float32 or float64; got {acc}")
    n, d = x.shape
    out = torch.empty((n, m), dtype=acc, device=x.device)
    if n == 0 or m == 0:
        return out
    _extension().project_rows(
        _mat(x), out.data_ptr(), DTYPE_CODES[acc], out.stride(0), out.stride(1), n, d, m, int(salt) & 0xFFFFFFFF,
        1.0 / math.sqrt(m), device.index, torch.cuda.current_stream(device).cuda_stream)
    return out


def segment_sketch(z, coef, order, offsets, salt: int, scale: float, out: torch.Tensor) -> None:
    """out (S, r, m) = scale * per episode sum_t coef[t] (x) (P z[t]): ``torch_backend.segment_sketch`` with the
    projection of this backend's ``project_rows`` kernel (the fused reduction is the triton backend's)."""
    from ippo.kernels import torch_backend

    torch_backend.segment_sketch(z, coef, order, offsets, salt, scale, out, project=project_rows)
