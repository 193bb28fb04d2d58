"""Triton kernels for the gradient sketches: the projection alone, and the fused per-episode sketch.

``project_rows``: rows of x times a Rademacher matrix generated in registers,

    out[t, c] = (1 / sqrt(m)) * sum_k sign(c, k) x[t, k]        (sign from ``projection.py``)

``segment_sketch``: one episode's sketch half in one program, with no (tokens x r x m) tensor anywhere,

    out[s, j, c] = scale * sum_{t in episode s} coef[t, j] * (P z[t])[c]

Program (s, c-block) walks episode s's tokens (``order[offsets[s]:offsets[s+1]]``, tokens grouped by episode
on the host by ``ops.segment_order``: any order of segment ids works, padding is skipped), BLOCK_N at a time:
it projects them in registers, u = z_tile P^T (BLOCK_N x BLOCK_M, signs regenerated as in ``project_rows``),
and adds coef_tile^T @ u (r x BLOCK_M) to a register accumulator; the accumulator is stored once. Every
output element is owned by one program and summed in a fixed order, so the result is deterministic (no
atomics) and an episode's NaN stays in its own row. Memory beyond the output: the (N,) int64 order and the
(S + 1,) offsets. Work: the projection of each valid token once, plus its rank-r outer products; parallelism
is S x ceil(m / BLOCK_M) programs (a long episode is one program's loop: split it over tokens with a second
reduction stage if few long episodes leave the GPU idle).

The (m, d) matrix is regenerated tile by tile from its 32-bit salt and never touches memory.
Signs are exact in every float format, so the projection's products are exact and accumulation is fp32
(fp64 for fp64 inputs); the outer products run in the accumulation dtype (IEEE fp32, no TF32).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ippo.kernels.projection import COL_MULT, FMIX_MULT1, FMIX_MULT2, ROW_MULT
from ippo.kernels.triton_utils import TL_DTYPE, dot_dtype, rank_block

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


@triton.jit
def _sign_tile(k, j_key):
    """(BLOCK_K, BLOCK_M) tile of P^T as +-1.0: sign(j, c) of ``projection.py`` for columns c = k and the
    rows' keys j_key = j * ROW_MULT + salt (the 1 / sqrt(m) is applied by the caller)."""
    key = k[:, None].to(tl.uint32) * _COL_MULT + j_key[None, :]
    return 1.0 - 2.0 * (_fmix32(key) >> 31).to(tl.float32)


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
        sign = _sign_tile(k, j_key)
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


SEGMENT_BLOCK_N = 32


@triton.jit(do_not_specialize=["salt"])
def segment_sketch_kernel(
    z_ptr, coef_ptr, order_ptr, offsets_ptr, out_ptr, D, M, R,
    stride_zn, stride_zk, stride_cn, stride_cr, stride_os, stride_or, stride_om, salt, out_scale,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, R_PAD: tl.constexpr,
):
    seg = tl.program_id(0)
    pid_m = tl.program_id(1)
    start = tl.load(offsets_ptr + seg)
    end = tl.load(offsets_ptr + seg + 1)
    js = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    j_key = js.to(tl.uint32) * _ROW_MULT + salt.to(tl.uint32)
    ranks = tl.arange(0, R_PAD)
    rank_ok = ranks < R
    acc = tl.zeros((R_PAD, BLOCK_M), dtype=ACC_DTYPE)
    for t0 in range(start, end, BLOCK_N):
        p = t0 + tl.arange(0, BLOCK_N)
        p_ok = p < end
        tokens = tl.load(order_ptr + p, mask=p_ok, other=0).to(tl.int64)
        u = tl.zeros((BLOCK_N, BLOCK_M), dtype=ACC_DTYPE)
        for k0 in range(0, D, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < D
            z_tile = tl.load(z_ptr + tokens[:, None] * stride_zn + k[None, :] * stride_zk,
                             mask=p_ok[:, None] & k_ok[None, :], other=0.0)
            sign = _sign_tile(k, j_key)
            u += tl.dot(z_tile.to(DOT_DTYPE), sign.to(DOT_DTYPE), input_precision="ieee", out_dtype=ACC_DTYPE)
        c = tl.load(coef_ptr + tokens[:, None] * stride_cn + ranks[None, :] * stride_cr,
                    mask=p_ok[:, None] & rank_ok[None, :], other=0.0)
        acc += tl.dot(tl.trans(c.to(ACC_DTYPE)), u, input_precision="ieee", out_dtype=ACC_DTYPE)
    out_ok = rank_ok[:, None] & (js < M)[None, :]
    tl.store(out_ptr + seg * stride_os + ranks[:, None] * stride_or + js[None, :] * stride_om, acc * out_scale,
             mask=out_ok)


def segment_sketch(z, coef, order, offsets, salt: int, scale: float, out: torch.Tensor) -> None:
    """out (S, r, m) = scale * per episode sum_t coef[t] (x) (P z[t]), fused (see module docstring); ``out``
    may be any strided view (the B half of a sketch is written transposed)."""
    num_segments, r, m = out.shape
    if num_segments == 0 or m == 0:
        return
    n, d = z.shape
    acc = out.dtype
    grid = (num_segments, triton.cdiv(m, BLOCK_M))
    segment_sketch_kernel[grid](
        z, coef, order, offsets, out, d, m, r,
        z.stride(0), z.stride(1), coef.stride(0), coef.stride(1), out.stride(0), out.stride(1), out.stride(2),
        salt, float(scale) / math.sqrt(m),
        DOT_DTYPE=dot_dtype(z, acc=acc), ACC_DTYPE=TL_DTYPE[acc],
        BLOCK_N=SEGMENT_BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_M=BLOCK_M, R_PAD=rank_block(r),
    )
