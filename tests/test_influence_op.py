"""ippo.kernels.influence_scores, and the scorer's combine lora_token_influence, against the definition, in float64, on
fresh random ragged inputs."""

import zlib

import pytest
import torch
from conftest import DEVICE
from helpers import folded_inputs, random_inputs

from ippo.kernels import influence_scores
from ippo.kernels.ops import segment_sum

# (N tokens, d_in, d_out, r, episodes): ragged, degenerate, and dims that are no multiple of any block.
SHAPES = [(0, 8, 8, 2, 3), (1, 1, 1, 1, 1), (37, 70, 90, 3, 5), (200, 130, 64, 16, 7), (64, 33, 17, 7, 1),
          (129, 65, 200, 5, 40)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def definition(x, h, grad_y, grad_h, val_A, val_B, segment_ids, num_segments, scaling, dtype):
    """s_i = <sum_t grad_h_t x_t^T, V_A> + <scaling sum_t grad_y_t h_t^T, V_B>, per-episode gradients formed
    explicitly, every operation in ``dtype`` (float64: the reference; the input dtype: eager torch's error)."""
    x, h, grad_y, grad_h, val_A, val_B = (t.to(dtype) for t in (x, h, grad_y, grad_h, val_A, val_B))
    scores = []
    for i in range(num_segments):
        rows = segment_ids == i
        grad_A = grad_h[rows].T @ x[rows]
        grad_B = (grad_y[rows].T @ h[rows]) * scaling
        scores.append((grad_A * val_A).sum() + (grad_B * val_B).sum())
    return torch.stack(scores) if scores else torch.zeros(0, dtype=dtype, device=x.device)


@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_float64_definition(backend, shape, dtype):
    """flash-attention's rule: error vs float64 at most 2x that of eager torch in the same dtype."""
    generator = torch.Generator().manual_seed(zlib.crc32(f"{shape}{dtype}".encode()))
    args, segment_ids = random_inputs(*shape, dtype, generator)
    num_segments, scaling = shape[-1], 0.37
    ours = influence_scores(**args, segment_ids=segment_ids, num_segments=num_segments, scaling=scaling)
    assert ours.dtype == torch.float32 and ours.shape == (num_segments,)
    reference = definition(**args, segment_ids=segment_ids, num_segments=num_segments, scaling=scaling,
                           dtype=torch.float64)
    eager = definition(**args, segment_ids=segment_ids, num_segments=num_segments, scaling=scaling, dtype=dtype)
    our_error = (ours.double() - reference).abs().max().item() if num_segments else 0.0
    eager_error = (eager.double() - reference).abs().max().item() if num_segments else 0.0
    floor = 1e-6 * max(1.0, reference.abs().max().item() if num_segments else 0.0)
    assert our_error <= 2 * eager_error + floor, (our_error, eager_error)


@pytest.mark.parametrize("shape", SHAPES[1:4], ids=[str(s) for s in SHAPES[1:4]])
def test_float64_inputs_are_exact(backend, shape):
    generator = torch.Generator().manual_seed(7)
    args, segment_ids = random_inputs(*shape, torch.float64, generator)
    ours = influence_scores(**args, segment_ids=segment_ids, num_segments=shape[-1], scaling=1.5)
    reference = definition(**args, segment_ids=segment_ids, num_segments=shape[-1], scaling=1.5, dtype=torch.float64)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)


def test_nan_stays_in_its_episode(backend):
    generator = torch.Generator().manual_seed(3)
    args, _ = random_inputs(30, 20, 24, 4, 3, torch.float32, generator)
    segment_ids = torch.tensor([0] * 10 + [1] * 10 + [2] * 8 + [-1] * 2, device=DEVICE)
    x = args.pop("x").clone()
    x[12, 3] = float("nan")   # episode 1
    x[29, 0] = float("inf")   # padding
    scores = influence_scores(x, **args, segment_ids=segment_ids, num_segments=4)
    assert torch.isfinite(scores[[0, 2, 3]]).all() and not torch.isfinite(scores[1])
    assert scores[3] == 0  # empty episode


def test_scaling_only_scales_the_B_term(backend):
    generator = torch.Generator().manual_seed(5)
    args, segment_ids = random_inputs(50, 16, 12, 3, 4, torch.float64, generator)
    with_b = influence_scores(**args, segment_ids=segment_ids, num_segments=4, scaling=2.0)
    args_a = dict(args, val_B=torch.zeros_like(args["val_B"]))
    a_only = influence_scores(**args_a, segment_ids=segment_ids, num_segments=4, scaling=2.0)
    b_half = influence_scores(**args, segment_ids=segment_ids, num_segments=4, scaling=1.0) - a_only
    torch.testing.assert_close(with_b - a_only, 2 * b_half)


# ---- lora_token_influence: the scorer's combine of the folded GEMMs' rank-r outputs ----------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lora_token_influence_matches_float64_definition(backend, shape, dtype):
    """The scorer's path: the combine of the folded GEMMs' outputs (rounded to ``dtype``, as the scorer's are),
    summed per episode, vs the float64 definition of the scores; flash-attention's rule: error at most 2x that of
    eager torch forming the per-episode gradients in ``dtype``."""
    generator = torch.Generator().manual_seed(zlib.crc32(f"fold{shape}{dtype}".encode()))
    args, folded, segment_ids = folded_inputs(*shape, dtype, generator)
    num_segments = shape[-1]
    tokens = torch.ops.ippo.lora_token_influence(**folded, scaling=0.37)
    assert tokens.dtype == torch.float32 and tokens.shape == (shape[0],)
    ours = segment_sum(tokens, segment_ids, num_segments).double()
    reference = definition(**args, segment_ids=segment_ids, num_segments=num_segments, scaling=0.37,
                           dtype=torch.float64)
    eager = definition(**args, segment_ids=segment_ids, num_segments=num_segments, scaling=0.37, dtype=dtype)
    our_error = (ours - reference).abs().max().item() if num_segments else 0.0
    eager_error = (eager.double() - reference).abs().max().item() if num_segments else 0.0
    floor = 1e-6 * max(1.0, reference.abs().max().item() if num_segments else 0.0)
    assert our_error <= 2 * eager_error + floor, (our_error, eager_error)


@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
def test_lora_token_influence_equals_token_influence_in_float64(backend, shape):
    """Fed x V_A^T and grad_y V_B, the combine is ``token_influence`` (the trainers' op) to float64 rounding, token by
    token (ragged ids with padding, empty episodes, no tokens, one token, r = 1)."""
    args, folded, segment_ids = folded_inputs(*shape, torch.float64, torch.Generator().manual_seed(11))
    tokens = torch.ops.ippo.lora_token_influence(**folded, scaling=0.37)
    assert tokens.dtype == torch.float64
    torch.testing.assert_close(tokens, torch.ops.ippo.token_influence(*args.values(), 0.37), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(segment_sum(tokens, segment_ids, shape[-1]),
                               influence_scores(**args, segment_ids=segment_ids, num_segments=shape[-1],
                                                scaling=0.37), rtol=1e-12, atol=1e-12)


def test_lora_token_influence_nan_stays_in_its_token(backend):
    _, folded, _ = folded_inputs(30, 20, 24, 4, 3, torch.float32, torch.Generator().manual_seed(3))
    folded = {k: v.clone() for k, v in folded.items()}
    folded["x_va"][12, 3] = float("nan")
    folded["g_vb"][29, 0] = float("inf")
    tokens = torch.ops.ippo.lora_token_influence(**folded)
    assert (~torch.isfinite(tokens)).nonzero().flatten().tolist() == [12, 29]
