"""Triton kernel for the sketch projection: rows of x times a Rademacher matrix generated in registers.

    out[t, j] = (1 / sqrt(m)) * sum_c sign(j, c) x[t, c]        (sign from ``projection.py``)

The (m, d) matrix is regenerated tile by tile from its 32-bit salt and never touches memory.
Signs are exact in every float format, so the products are exact and accumulation is fp32.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ippo.kernels.projection import COL_MULT, FMIX_MULT1, FMIX_MULT2, ROW_MULT
from ippo.kernels.triton_utils import TL_DTYPE, dot_dtype

BLOCK_N = 64
BLOCK_K = 64
BLOCK_M = 32
_ROW_MULT = tl.constexpr(ROW_MULT)
_COL_MULT = tl.constexpr(COL_MULT)
_FMIX_MULT1 = tl.constexpr(FMIX_MULT1)
_FMIX_MULT2 = tl.constexpr(FMIX_MULT2)


@triton.jit
def _fmix32(h):
    h ^= h >> 16
    h *= _FMIX_MULT1
    h ^= h >> 13
    h *= _FMIX_MULT2
    h ^= h >> 16
    return h


@triton.jit(do_not_specialize=["salt"])  # a salt of 1 would otherwise become a constexpr without .to()
def project_rows_kernel(
    x_ptr, out_ptr, N, D, M, stride_xn, stride_xk, stride_on, stride_om, salt, inv_sqrt_m,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < N
    js = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    j_key = js.to(tl.uint32) * _ROW_MULT + salt.to(tl.uint32)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=ACC_DTYPE)
    for k0 in range(0, D, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < D
        x_tile = tl.load(x_ptr + rows[:, None] * stride_xn + k[None, :] * stride_xk,
                         mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        key = k[:, None].to(tl.uint32) * _COL_MULT + j_key[None, :]
        sign = 1.0 - 2.0 * (_fmix32(key) >> 31).to(tl.float32)  # (BLOCK_K, BLOCK_M), the P^T tile
        acc += tl.dot(x_tile.to(DOT_DTYPE), sign.to(DOT_DTYPE), input_precision="ieee", out_dtype=ACC_DTYPE)
    out_ok = row_ok[:, None] & (js < M)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_on + js[None, :] * stride_om, acc * inv_sqrt_m, mask=out_ok)


def project_rows(x: torch.Tensor, salt: int, m: int, acc: torch.dtype) -> torch.Tensor:
    """(N, m) = x @ P^T in ``acc`` (float32 or float64), P generated in-kernel from ``salt``."""
    n, d = x.shape
    out = torch.empty((n, m), dtype=acc, device=x.device)
    if n == 0:
        return out
    grid = (triton.cdiv(n, BLOCK_N), triton.cdiv(m, BLOCK_M))
    project_rows_kernel[grid](
        x, out, n, d, m, x.stride(0), x.stride(1), out.stride(0), out.stride(1), salt, 1.0 / math.sqrt(m),
        DOT_DTYPE=dot_dtype(x, acc=acc), ACC_DTYPE=TL_DTYPE[acc], BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_M=BLOCK_M,
    )
    return out
