"""Pure-PyTorch backend: runs on any device, and is the reference the other backends are tested against.

Every backend exposes the same two primitives; the ops in ``ops.py`` build on them:

* ``token_influence(x, h, grad_y, grad_h, val_A, val_B, scaling, out)``:
  out[t] += grad_h[t] . (val_A @ x[t]) + scaling * grad_y[t] . (val_B @ h[t])   for t < N
* ``project_rows(x, salt, m)``: (N, m) rows of x projected by the Rademacher matrix of ``salt``,
  x @ P^T with P = sign / sqrt(m) (see ``projection.py``).

Both compute in ``out.dtype`` / the returned dtype: float32, or float64 for float64 inputs.
"""

from __future__ import annotations

import math

import torch

from ippo.kernels.projection import rademacher_signs


def token_influence(x, h, grad_y, grad_h, val_A, val_B, scaling: float, out: torch.Tensor) -> None:
    """out (N,) += per-token influence; a = x V_A^T and b = grad_y V_B are (N, r), never wider."""
    acc = out.dtype
    a = x.to(acc) @ val_A.to(acc).T
    b = grad_y.to(acc) @ val_B.to(acc)
    out += (grad_h.to(acc) * a).sum(-1) + scaling * (h.to(acc) * b).sum(-1)


def project_rows(x: torch.Tensor, salt: int, m: int, acc: torch.dtype) -> torch.Tensor:
    """(N, m) = x @ P^T with the (m, d) projection of ``salt`` built on the fly (m x d, never m x params)."""
    signs = rademacher_signs(salt, m, x.shape[1], device=x.device).to(acc)
    return (x.to(acc) @ signs.T) / math.sqrt(m)
