"""The random projection behind the gradient sketches, defined once for every backend.

The sketch of a LoRA layer uses two Rademacher matrices, P_in (m x d_in) and P_out (m x d_out),
P[j, c] = sign(j, c) / sqrt(m). They are never stored: each backend regenerates sign(j, c) where it
needs it from a 32-bit integer hash, so the torch, triton and cuda backends give the same sketch
for the same (seed, layer):

    key(j, c)  = (j * 0x9E3779B1 + c * 0x85EBCA77 + salt)   mod 2^32
    sign(j, c) = +1 if fmix32(key) < 2^31 else -1            (fmix32: MurmurHash3's finalizer)
    salt       = fmix32(fmix32(seed mod 2^32) ^ fmix32(seed >> 32) ^ fmix32(4 * layer + side + 1))

with side 0 for P_in and 1 for P_out. E[P^T P] = I, so inner products of sketches are unbiased.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
ROW_MULT = 0x9E3779B1
COL_MULT = 0x85EBCA77
FMIX_MULT1 = 0x85EBCA6B
FMIX_MULT2 = 0xC2B2AE35
SIDE_IN = 0
SIDE_OUT = 1
SEED_LIMIT = 2**63  # seeds travel as int64 through the torch op schema
LAYER_LIMIT = 2**29  # 4 * layer + side + 1 stays below 2^31


def fmix32(h: int) -> int:
    """MurmurHash3's 32-bit finalizer on a Python int."""
    h &= MASK32
    h ^= h >> 16
    h = (h * FMIX_MULT1) & MASK32
    h ^= h >> 13
    h = (h * FMIX_MULT2) & MASK32
    h ^= h >> 16
    return h


def projection_salt(seed: int, layer: int, side: int) -> int:
    """32-bit salt of the projection matrix for (seed, layer, side); side 0 = P_in, 1 = P_out.
    0 <= seed < SEED_LIMIT and 0 <= layer < LAYER_LIMIT (checked by the ops)."""
    return fmix32(fmix32(seed & MASK32) ^ fmix32(seed >> 32) ^ fmix32(4 * layer + side + 1))


def _fmix32_tensor(h: torch.Tensor) -> torch.Tensor:
    """fmix32 on an int64 tensor holding values in [0, 2^32); int64 products wrap, low bits stay exact."""
    h = h ^ (h >> 16)
    h = (h * FMIX_MULT1) & MASK32
    h = h ^ (h >> 13)
    h = (h * FMIX_MULT2) & MASK32
    return h ^ (h >> 16)


def rademacher_signs(salt: int, m: int, d: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The (m, d) matrix of sign(j, c) in {-1, +1} as float32 (the projection is this / sqrt(m))."""
    j = torch.arange(m, dtype=torch.int64, device=device)[:, None]
    c = torch.arange(d, dtype=torch.int64, device=device)[None, :]
    key = (j * ROW_MULT + c * COL_MULT + salt) & MASK32
    top_bit = _fmix32_tensor(key) >> 31
    return (1 - 2 * top_bit).to(torch.float32)
