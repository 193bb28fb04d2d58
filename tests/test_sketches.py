"""gradient_sketches: exact layout against explicit projections, backend parity, unbiased JL estimates."""

import math
import zlib

import pytest
import torch
from conftest import DEVICE
from helpers import random_inputs

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


# ---- the fused per-episode reduction (segment_sketch) -------------------------------------------------------

def layout(name, n, episodes, generator):
    """segment ids (n,) of a layout: sorted ragged episodes, padding on both sides, empty episodes, an
    unsorted interleaving, all padding."""
    if name == "sorted ragged":
        return torch.sort(torch.randint(0, episodes, (n,), generator=generator)).values
    if name == "padded":  # -1 on both sides of sorted episodes, some of them empty
        ids = torch.sort(torch.randint(0, episodes, (n - 10,), generator=generator)).values
        return torch.cat([torch.full((4,), -1), ids, torch.full((6,), -1)])
    if name == "empty episodes":
        ids = torch.randint(0, episodes // 2, (n,), generator=generator) * 2  # odd episodes empty
        ids[::5] = -1
        return ids
    if name == "unsorted":
        return torch.randint(-1, episodes, (n,), generator=generator)
    if name == "all padding":
        return torch.full((n,), -1)
    raise ValueError(name)


LAYOUTS = ["sorted ragged", "padded", "empty episodes", "unsorted", "all padding"]


@pytest.mark.parametrize("name", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_fused_sketch_matches_float64_definition_on_every_layout(backend, name, dtype):
    """Every backend's fused reduction against per-episode gradients formed and projected explicitly in float64;
    dims off every block size (d 70 / 45, m = 40 > one c-block, r = 3)."""
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    n, episodes, r, k = 75, 6, 3, 2 * 3 * 40
    args, _ = random_inputs(n, 70, 45, r, episodes, dtype, generator)
    args = {key: args[key] for key in ("x", "h", "grad_y", "grad_h")}
    segment_ids = layout(name, n, episodes, generator).to(DEVICE)
    ours = gradient_sketches(**args, segment_ids=segment_ids, num_segments=episodes, k=k, seed=9, layer=4,
                             scaling=1.7)
    reference = explicit_sketches(**args, segment_ids=segment_ids, num_segments=episodes, k=k, seed=9, layer=4,
                                  scaling=1.7)
    assert ours.dtype == dtype and ours.shape == (episodes, k)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(ours.double(), reference, rtol=tol, atol=tol * max(1.0, reference.abs().max().item()))
    empty = [i for i in range(episodes) if not (segment_ids == i).any()]
    assert (ours[empty] == 0).all()


def test_no_tokens_and_no_episodes(backend):
    args, _ = random_inputs(0, 8, 8, 2, 1, torch.float32, torch.Generator().manual_seed(0))
    args = {key: args[key] for key in ("x", "h", "grad_y", "grad_h")}
    ids = torch.zeros(0, dtype=torch.long, device=DEVICE)
    assert torch.equal(gradient_sketches(**args, segment_ids=ids, num_segments=3, k=8), torch.zeros(3, 8))
    assert gradient_sketches(**args, segment_ids=ids, num_segments=0, k=8).shape == (0, 8)


def test_fused_sketch_nan_stays_in_its_episode_and_is_deterministic(backend):
    args, _ = random_inputs(40, 20, 24, 4, 3, torch.float32, torch.Generator().manual_seed(3))
    args = {key: args[key] for key in ("x", "h", "grad_y", "grad_h")}
    segment_ids = torch.tensor([2, 0, 1, -1] * 10, device=DEVICE)  # unsorted, with padding
    x = args.pop("x").clone()
    x[2, 3] = float("nan")  # episode 1
    x[3, 0] = float("inf")  # padding
    first = gradient_sketches(x, **args, segment_ids=segment_ids, num_segments=4, k=32)
    assert torch.isfinite(first[[0, 2, 3]]).all() and not torch.isfinite(first[1]).all()
    assert (first[3] == 0).all()
    again = gradient_sketches(x, **args, segment_ids=segment_ids, num_segments=4, k=32)
    assert torch.equal(first.nan_to_num(), again.nan_to_num())  # same order of sums: bit-identical


def old_segment_outer_sum_sketches(x, h, grad_y, grad_h, segment_ids, num_segments, k, seed=0, layer=0):
    """The previous reduction (kept here only to show the memory test catches it): per chunk of tokens the
    (tokens x r x m) outer products, then index_add_ per episode."""
    from ippo.kernels.torch_backend import project_rows

    r = h.shape[1]
    m = k // (2 * r)
    u = project_rows(x, projection_salt(seed, layer, SIDE_IN), m, torch.float32)
    w = project_rows(grad_y, projection_salt(seed, layer, SIDE_OUT), m, torch.float32)

    def outer_sum(a, b):
        buf = torch.zeros(num_segments + 1, a.shape[1] * b.shape[1], device=a.device)
        chunk = max(1, (1 << 22) // (a.shape[1] * b.shape[1]))
        for start in range(0, a.shape[0], chunk):
            rows = slice(start, start + chunk)
            buf.index_add_(0, segment_ids[rows] + 1, (a[rows, :, None] * b[rows, None, :]).flatten(1))
        return buf[1:]

    return torch.cat([outer_sum(grad_h, u), outer_sum(w, h)], dim=1)


def test_no_tokens_x_r_x_m_tensor(backend):
    """N = 4096 tokens, r = 64, m = 128 (k = 16384): a (N x r x m) fp32 tensor would take 134 MB. The op's peak
    memory beyond its inputs must stay within 3 (N x m) buffers plus the output; the previous outer-product
    path (16 MB chunks of it) does not."""
    from ippo.testing import peak_memory

    n, d, r, m, episodes = 4096, 64, 64, 128, 4
    k = 2 * r * m
    assert n * r * m * 4 > 100e6
    args, segment_ids = random_inputs(n, d, d, r, episodes, torch.float32, torch.Generator().manual_seed(0))
    args = {key: args[key].contiguous() for key in ("x", "h", "grad_y", "grad_h")}
    bound = 3 * n * m * 4 + episodes * k * 4
    ours, peak = peak_memory(lambda: gradient_sketches(**args, segment_ids=segment_ids, num_segments=episodes, k=k),
                             DEVICE)
    assert peak <= bound, (peak, bound)
    if DEVICE == "cpu":
        old, old_peak = peak_memory(lambda: old_segment_outer_sum_sketches(**args, segment_ids=segment_ids,
                                                                          num_segments=episodes, k=k))
        assert old_peak > bound, (old_peak, bound)
        torch.testing.assert_close(ours, old, rtol=1e-4, atol=1e-3)  # same sketch (same seed) as before


def shrink_reference(sketch, r, k_small):
    from sketch_accuracy import shrink_sketches

    return shrink_sketches(sketch, r, k_small)


def test_smaller_k_is_a_rescaled_slice_of_a_larger_one():
    """sign(c, j) does not depend on m, so the k' sketch is the first m' projection rows of the k sketch, times
    sqrt(m / m'): what benchmarks/sketch_accuracy.py uses to score every k from one backward."""
    args, segment_ids = random_inputs(50, 30, 20, 2, 3, torch.float64, torch.Generator().manual_seed(8))
    args = {key: args[key] for key in ("x", "h", "grad_y", "grad_h")}
    big = gradient_sketches(**args, segment_ids=segment_ids, num_segments=3, k=64, seed=3, layer=1)
    small = gradient_sketches(**args, segment_ids=segment_ids, num_segments=3, k=16, seed=3, layer=1)
    torch.testing.assert_close(shrink_reference(big, 2, 16), small, rtol=1e-12, atol=1e-12)
