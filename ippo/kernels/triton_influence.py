"""Triton kernels for the per-token LoRA influence: ``token_influence``, the hot loop of every influence op, and
``lora_token_influence``, the scorer's combine of rank-r tensors (its GEMMs already gave x V_A^T and grad_y V_B).

One program owns BLOCK_N tokens. It streams x (BLOCK_N x d_in) and grad_y (BLOCK_N x d_out) once,
tile by tile, against the validation gradients and keeps only rank-r accumulators:

    a = x V_A^T  (BLOCK_N x r),   b = grad_y V_B  (BLOCK_N x r)
    out[t] += sum_j grad_h[t, j] a[t, j] + scaling * sum_j h[t, j] b[t, j]

Products run on tensor cores in the input precision for fp16/bf16 (fp32 accumulation) and in
IEEE fp32 for fp32 inputs (no TF32), so the error stays within that of eager torch at the same dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ippo.kernels.triton_utils import TL_DTYPE, dot_dtype, rank_block

BLOCK_N = 32  # 32 tokens a program: enough programs to fill an H100 at 8K tokens
BLOCK_K = 64
COMBINE_BLOCK_N = 128  # the combine is elementwise on (N, r): wider blocks, fewer programs


@triton.jit
def token_influence_kernel(
    x_ptr, h_ptr, gy_ptr, gh_ptr, va_ptr, vb_ptr, out_ptr,
    N, D_IN, D_OUT, R,
    stride_xn, stride_xk, stride_hn, stride_hr, stride_gyn, stride_gyk, stride_ghn, stride_ghr,
    stride_var, stride_vak, stride_vbk, stride_vbr,
    scaling,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = (pid * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < N
    ranks = tl.arange(0, R_PAD)
    rank_ok = ranks < R
    cols = tl.arange(0, BLOCK_K)

    a = tl.zeros((BLOCK_N, R_PAD), dtype=ACC_DTYPE)
    for k0 in range(0, D_IN, BLOCK_K):
        k = k0 + cols
        k_ok = k < D_IN
        x_tile = tl.load(x_ptr + rows[:, None] * stride_xn + k[None, :] * stride_xk,
                         mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        va_t = tl.load(va_ptr + ranks[None, :] * stride_var + k[:, None] * stride_vak,
                       mask=rank_ok[None, :] & k_ok[:, None], other=0.0)
        a += tl.dot(x_tile.to(DOT_DTYPE), va_t.to(DOT_DTYPE), input_precision="ieee", out_dtype=ACC_DTYPE)

    b = tl.zeros((BLOCK_N, R_PAD), dtype=ACC_DTYPE)
    for k0 in range(0, D_OUT, BLOCK_K):
        k = k0 + cols
        k_ok = k < D_OUT
        gy_tile = tl.load(gy_ptr + rows[:, None] * stride_gyn + k[None, :] * stride_gyk,
                          mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        vb_tile = tl.load(vb_ptr + k[:, None] * stride_vbk + ranks[None, :] * stride_vbr,
                          mask=k_ok[:, None] & rank_ok[None, :], other=0.0)
        b += tl.dot(gy_tile.to(DOT_DTYPE), vb_tile.to(DOT_DTYPE), input_precision="ieee", out_dtype=ACC_DTYPE)

    rank_mask = row_ok[:, None] & rank_ok[None, :]
    gh = tl.load(gh_ptr + rows[:, None] * stride_ghn + ranks[None, :] * stride_ghr, mask=rank_mask, other=0.0)
    h = tl.load(h_ptr + rows[:, None] * stride_hn + ranks[None, :] * stride_hr, mask=rank_mask, other=0.0)
    token = tl.sum(gh.to(ACC_DTYPE) * a, axis=1) + scaling * tl.sum(h.to(ACC_DTYPE) * b, axis=1)
    previous = tl.load(out_ptr + rows, mask=row_ok, other=0.0)
    tl.store(out_ptr + rows, previous + token, mask=row_ok)


def token_influence(x, h, grad_y, grad_h, val_A, val_B, scaling: float, out: torch.Tensor) -> None:
    """out (N,) += per-token influence (see module docstring); inputs may be strided, any float dtype."""
    n, d_in = x.shape
    d_out, r = val_B.shape
    if n == 0:
        return
    dot = dot_dtype(x, grad_y, val_A, val_B, acc=out.dtype)
    token_influence_kernel[(triton.cdiv(n, BLOCK_N),)](
        x, h, grad_y, grad_h, val_A, val_B, out,
        n, d_in, d_out, r,
        x.stride(0), x.stride(1), h.stride(0), h.stride(1), grad_y.stride(0), grad_y.stride(1),
        grad_h.stride(0), grad_h.stride(1),
        val_A.stride(0), val_A.stride(1), val_B.stride(0), val_B.stride(1),
        float(scaling),
        DOT_DTYPE=dot, ACC_DTYPE=TL_DTYPE[out.dtype],
        BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, R_PAD=rank_block(r),
    )


@triton.jit
def lora_token_influence_kernel(
    h_ptr, xa_ptr, gb_ptr, gh_ptr, out_ptr, N, R,
    stride_hn, stride_hr, stride_xan, stride_xar, stride_gbn, stride_gbr, stride_ghn, stride_ghr,
    scaling,
    ACC_DTYPE: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = (pid * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    ranks = tl.arange(0, R_PAD)
    mask = (rows < N)[:, None] & (ranks < R)[None, :]
    gh = tl.load(gh_ptr + rows[:, None] * stride_ghn + ranks[None, :] * stride_ghr, mask=mask, other=0.0)
    xa = tl.load(xa_ptr + rows[:, None] * stride_xan + ranks[None, :] * stride_xar, mask=mask, other=0.0)
    h = tl.load(h_ptr + rows[:, None] * stride_hn + ranks[None, :] * stride_hr, mask=mask, other=0.0)
    gb = tl.load(gb_ptr + rows[:, None] * stride_gbn + ranks[None, :] * stride_gbr, mask=mask, other=0.0)
    token = (tl.sum(gh.to(ACC_DTYPE) * xa.to(ACC_DTYPE), axis=1)
             + scaling * tl.sum(h.to(ACC_DTYPE) * gb.to(ACC_DTYPE), axis=1))
    previous = tl.load(out_ptr + rows, mask=rows < N, other=0.0)
    tl.store(out_ptr + rows, previous + token, mask=rows < N)


def lora_token_influence(h, x_va, g_vb, grad_h, scaling: float, out: torch.Tensor) -> None:
    """out (N,) += grad_h . x_va + scaling * h . g_vb per row; inputs (N, r), may be strided, any float dtype."""
    n, r = h.shape
    if n == 0:
        return
    lora_token_influence_kernel[(triton.cdiv(n, COMBINE_BLOCK_N),)](
        h, x_va, g_vb, grad_h, out, n, r,
        h.stride(0), h.stride(1), x_va.stride(0), x_va.stride(1), g_vb.stride(0), g_vb.stride(1),
        grad_h.stride(0), grad_h.stride(1),
        float(scaling),
        ACC_DTYPE=TL_DTYPE[out.dtype], BLOCK_N=COMBINE_BLOCK_N, R_PAD=triton.next_power_of_2(r),
    )
