"""Pure-PyTorch backend: runs on any device, and is the reference the other backends are tested against.

Every backend exposes the same four primitives; the ops in ``ops.py`` build on them:

* ``token_influence(x, h, grad_y, grad_h, val_A, val_B, scaling, out)``:
  out[t] += grad_h[t] . (val_A @ x[t]) + scaling * grad_y[t] . (val_B @ h[t])   for t < N
* ``lora_token_influence(h, x_va, g_vb, grad_h, scaling, out)``: the same from rank-r tensors only,
  out[t] += grad_h[t] . x_va[t] + scaling * h[t] . g_vb[t]   (x_va = x V_A^T, g_vb = grad_y V_B, all (N, r))
* ``project_rows(x, salt, m)``: (N, m) rows of x projected by the Rademacher matrix of ``salt``,
  x @ P^T with P = sign / sqrt(m) (see ``projection.py``).
* ``segment_sketch(z, coef, order, offsets, salt, scale, out)``: the per-episode sketch reduction,
  out[s, j, c] = scale * sum_{t in episode s} coef[t, j] * (P z[t])[c]   (out: an (S, r, m) view, written),
  episode s's tokens being order[offsets[s]:offsets[s + 1]] (``ops.segment_order``).

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


def lora_token_influence(h, x_va, g_vb, grad_h, scaling: float, out: torch.Tensor) -> None:
    """out (N,) += grad_h . x_va + scaling * h . g_vb, row by row, in out.dtype; all inputs (N, r)."""
    acc = out.dtype
    out += torch.linalg.vecdot(grad_h.to(acc), x_va.to(acc))
    out.add_(torch.linalg.vecdot(h.to(acc), g_vb.to(acc)), alpha=scaling)


def project_rows(x: torch.Tensor, salt: int, m: int, acc: torch.dtype) -> torch.Tensor:
    """(N, m) = x @ P^T with the (m, d) projection of ``salt`` built on the fly (m x d, never m x params)."""
    signs = rademacher_signs(salt, m, x.shape[1], device=x.device).to(acc)
    return (x.to(acc) @ signs.T) / math.sqrt(m)


def segment_sketch(z, coef, order, offsets, salt: int, scale: float, out: torch.Tensor, project=project_rows) -> None:
    """out (S, r, m) = scale * per episode sum_t coef[t] (x) (P z[t]), as one (r x n_s) @ (n_s x m) product per
    episode over its tokens gathered in order: transient memory O(tokens x m) (the projected rows), never
    (tokens x r x m). Reads ``offsets`` on the host (one device sync). ``project`` is the backend's
    ``project_rows`` (the cuda backend reuses this reduction with its own projection)."""
    num_segments, r, m = out.shape
    if num_segments == 0:
        return
    acc = out.dtype
    bounds = offsets.tolist()
    tokens = order[bounds[0]:bounds[-1]]
    u = project(z, salt, m, acc)[tokens]  # (valid tokens, m): padding rows are never read, so their NaNs stay out
    c = coef[tokens].to(acc)
    counts = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    sums = torch.empty((num_segments, r, m), dtype=acc, device=out.device)
    for s, (c_s, u_s) in enumerate(zip(c.split(counts), u.split(counts))):
        torch.mm(c_s.T, u_s, out=sums[s])
    out.copy_(sums.mul_(scale) if scale != 1.0 else sums)
