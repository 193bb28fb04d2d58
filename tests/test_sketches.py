"""gradient_sketches: exact layout against explicit projections, backend parity, unbiased JL estimates."""

import math

import pytest
import torch
from conftest import DEVICE
from test_influence_op import random_inputs

from ippo.kernels import gradient_sketches, influence_scores, sketch_lora_gradient
from ippo.kernels.projection import SIDE_IN, SIDE_OUT, projection_salt, rademacher_signs


def explicit_sketches(x, h, grad_y, grad_h, segment_ids, num_segments, k, seed, layer, scaling):
    """Per-episode gradients formed explicitly in float64 and projected with the materialized matrices."""
    r, d_in, d_out = h.shape[1], x.shape[1], grad_y.shape[1]
    m = k // (2 * r)
    p_in = rademacher_signs(projection_salt(seed, layer, SIDE_IN), m, d_in).double().to(DEVICE) / math.sqrt(m)
    p_out = rademacher_signs(projection_salt(seed, layer, SIDE_OUT), m, d_out).double().to(DEVICE) / math.sqrt(m)
    x, h, grad_y, grad_h = (t.double() for t in (x, h, grad_y, grad_h))
    rows = []
    for i in range(num_segments):
        sel = segment_ids == i
        grad_A = grad_h[sel].T @ x[sel]
        grad_B = scaling * grad_y[sel].T @ h[sel]
        rows.append(torch.cat([(grad_A @ p_in.T).flatten(), (p_out @ grad_B).flatten()]))
    return torch.stack(rows)


@pytest.mark.parametrize("shape,k", [((37, 70, 90, 3, 5), 6 * 8), ((100, 130, 64, 16, 4), 32 * 5),
                                     ((1, 1, 1, 1, 1), 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_sketch_matches_explicit_projection(backend, shape, k, dtype):
    generator = torch.Generator().manual_seed(11)
    args, segment_ids = random_inputs(*shape, dtype, generator)
    args = {key: args[key] for key in ("x", "h", "grad_y", "grad_h")}
    ours = gradient_sketches(**args, segment_ids=segment_ids, num_segments=shape[-1], k=k, seed=5, layer=3, scaling=0.5)
    reference = explicit_sketches(**args, segment_ids=segment_ids, num_segments=shape[-1], k=k, seed=5, layer=3,
                                  scaling=0.5)
    assert ours.shape == (shape[-1], k)
    tol = 1e-12 if dtype == torch.float64 else 2e-5  # fp32 sums of exact +-1 products of the input values
    torch.testing.assert_close(ours.double(), reference, rtol=tol, atol=tol * reference.abs().max().item())


def test_same_seed_same_sketch_other_seed_or_layer_other_sketch(backend):
    args, segment_ids = random_inputs(40, 24, 20, 4, 3, torch.float32, torch.Generator().manual_seed(2))
    args = {key: args[key] for key in ("x", "h", "grad_y", "grad_h")}

    def sketch(seed, layer):
        return gradient_sketches(**args, segment_ids=segment_ids, num_segments=3, k=64, seed=seed, layer=layer)

    assert torch.equal(sketch(1, 0), sketch(1, 0))
    assert not torch.allclose(sketch(1, 0), sketch(2, 0))
    assert not torch.allclose(sketch(1, 0), sketch(1, 1))


def test_inner_products_unbiased_and_error_shrinks_like_inverse_sqrt_k():
    """Over 300 projection seeds: mean estimate within 4 standard errors of s_i; the RMS error at 16x the
    width is about 4x smaller (1/sqrt(k))."""
    torch.manual_seed(0)
    n, d_in, d_out, r, episodes = 60, 48, 40, 2, 3
    args, segment_ids = random_inputs(n, d_in, d_out, r, episodes, torch.float64, torch.Generator().manual_seed(4))
    val_A, val_B = args.pop("val_A"), args.pop("val_B")
    exact = influence_scores(**args, val_A=val_A, val_B=val_B, segment_ids=segment_ids, num_segments=episodes)
    rms = {}
    for k in (8, 128):
        estimates = torch.stack([
            gradient_sketches(**args, segment_ids=segment_ids, num_segments=episodes, k=k, seed=seed)
            @ sketch_lora_gradient(val_A, val_B, k=k, seed=seed)
            for seed in range(300)])
        errors = estimates - exact
        standard_error = errors.std(dim=0) / math.sqrt(len(errors))
        assert (errors.mean(dim=0).abs() <= 4 * standard_error).all()
        rms[k] = errors.pow(2).mean().sqrt().item()
    assert 2.5 < rms[8] / rms[128] < 6.5, rms


@pytest.mark.parametrize("salt", [0, 1, 2**31 - 1, 2**31, 2**32 - 1])
def test_projection_at_edge_salts(backend, salt):
    """Salts 0 and 1 (which compilers like to specialize) and around 2^31 (int32 vs uint32) project alike."""
    from ippo.kernels.backends import select_backend
    from ippo.kernels.torch_backend import project_rows

    x = torch.randn(9, 70, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(DEVICE)
    signs = rademacher_signs(salt, 5, 70).double().to(DEVICE)
    expected = x @ signs.T / math.sqrt(5)
    got = select_backend(x.device)[1].project_rows(x, salt, 5, torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(project_rows(x, salt, 5, torch.float64), expected, rtol=1e-12, atol=1e-12)
