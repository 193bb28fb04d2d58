"""Helpers shared by the Triton kernels: torch -> tl dtypes, the tl.dot operand dtype, rank tile sizes."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ippo.kernels.backends import triton_interpret

TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
            torch.float64: tl.float64}


def dot_dtype(*tensors: torch.Tensor, acc: torch.dtype):
    """tl.dot operand dtype: fp16/bf16 when every operand is that dtype (tensor cores, exact products,
    fp32 sums); else the accumulation dtype, fp32 in IEEE mode (no TF32) or fp64.

    Triton's CPU interpreter computes bf16 dots wrongly, so there bf16 runs as fp32: the same
    numbers, since bf16 x bf16 products are exact in fp32.
    """
    dtypes = {t.dtype for t in tensors}
    if acc == torch.float32 and len(dtypes) == 1 and dtypes <= {torch.float16, torch.bfloat16}:
        if not (dtypes == {torch.bfloat16} and triton_interpret()):
            return TL_DTYPE[dtypes.pop()]
    return TL_DTYPE[acc]


def rank_block(r: int) -> int:
    """Tile side for r ranks: tl.dot needs power-of-two tile sides of at least 16."""
    return max(16, triton.next_power_of_2(r))
