"""Per-episode LoRA weight gradients from the scored backward (``InfluenceScorer(episode_grads=True)``, the op
``segment_lora_gradients``), against per-episode backwards in float64: padded rows (either side), packed unsorted
segments, empty and one-token episodes, non-finite rows kept out of ``weighted_gradient``; opcheck; refusals."""

import gc
import weakref

import pytest
import torch
from conftest import DEVICE
from helpers import LENGTHS, batch, packed_token_model, random_episodes, random_inputs, tiny_model, val_grads_of

from ippo.kernels import InfluenceScorer, segment_lora_gradients
from ippo.kernels.scorer import lora_weights
from ippo.testing import episode_losses, per_episode_gradients


def run(model, val_grads, episodes, padding="right", **kwargs):
    *inputs, segment_ids = batch(episodes, padding=padding, row_length=15)
    with InfluenceScorer(model, val_grads, segment_ids, len(episodes), episode_grads=True, **kwargs) as scorer:
        episode_losses(model, *inputs).sum().backward()
    return scorer


@pytest.mark.parametrize("padding", ["right", "left"])
def test_episode_gradients_equal_per_episode_backwards(backend, padding):
    model = tiny_model()
    val_grads = val_grads_of(model)
    episodes = random_episodes(LENGTHS)
    scorer = run(model, val_grads, episodes, padding=padding)
    input_ids, targets, weights, mask, _, _ = batch(episodes)
    expected = per_episode_gradients(model, input_ids, targets, weights, mask)
    got = scorer.episode_gradients
    assert list(got) == list(lora_weights(model))
    for name, grads in got.items():
        assert grads.A.dtype == torch.float64 and grads.A.shape[0] == len(LENGTHS)
        for part in range(2):
            torch.testing.assert_close(grads[part], torch.stack([e[name][part] for e in expected]),
                                       rtol=1e-10, atol=1e-13)
    assert all((g[3] == 0).all() for grads in got.values() for g in grads)  # the empty episode
    # the scores are their dot products with V, and the dense gradient their sum
    dots = sum((g.A * val_grads[n].A).sum((1, 2)) + (g.B * val_grads[n].B).sum((1, 2)) for n, g in got.items())
    torch.testing.assert_close(dots, scorer.scores, rtol=1e-10, atol=1e-13)
    for name, weight in lora_weights(model).items():
        torch.testing.assert_close(got[name].A.sum(0), weight.A.grad, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(got[name].B.sum(0), weight.B.grad, rtol=1e-10, atol=1e-13)


def test_weighted_gradient_is_the_gradient_of_the_weighted_loss(backend):
    model = tiny_model()
    episodes = random_episodes(LENGTHS)
    scorer = run(model, val_grads_of(model), episodes, lora_grads=False)
    w = torch.tensor([0.5, -2.0, 0.0, 1.0, 3.0, 0.0], dtype=torch.float64, device=DEVICE)
    *inputs, _ = batch(episodes, row_length=15)
    params = [p for pair in lora_weights(model).values() for p in pair]
    # one backward per episode, summed in float64 (one backward of sum_i w_i l_i rounds differently: the tiny
    # Llama's RMSNorm computes in float32, so its backward is linear in w only to ~1e-8)
    expected = [0.0] * len(params)
    for i in range(len(episodes)):
        grads = torch.autograd.grad(episode_losses(model, *inputs)[i], params, materialize_grads=True)
        expected = [e + w[i] * g for e, g in zip(expected, grads)]
    got = [g for pair in scorer.weighted_gradient(w).values() for g in pair]
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-13)
    assert all(p.grad is None for p in params)  # lora_grads=False: .grad untouched


def test_weighted_gradient_leaves_out_zero_weight_episodes():
    """A dropped (weight 0) episode whose gradient is not finite does not turn the sum into NaN."""
    model = tiny_model()
    scorer = run(model, val_grads_of(model), random_episodes(LENGTHS))
    first = next(iter(scorer.episode_gradients.values()))
    first.A[1] = float("nan")
    w = torch.ones(len(LENGTHS), dtype=torch.float64, device=DEVICE)
    w[1] = 0
    assert all(g.isfinite().all() for pair in scorer.weighted_gradient(w).values() for g in pair)
    with pytest.raises(ValueError, match="weights must be a"):
        scorer.weighted_gradient(w[:3])


def test_packed_unsorted_segments(backend):
    """One packed row whose tokens interleave episodes and padding (a token-wise model mixes no tokens)."""
    model, x, weights, segment_ids = packed_token_model()
    with InfluenceScorer(model, None, segment_ids, num_segments=7, sketch_dim=20, episode_grads=True) as scorer:
        (model(x) * weights).sum().backward()
    params = [p for pair in lora_weights(model).values() for p in pair]
    got = [g for pair in scorer.episode_gradients.values() for g in pair]
    for i in range(7):  # episode 6 has no token: zeros
        rows = segment_ids[0] == i
        expected = torch.autograd.grad((model(x[:, rows]) * weights[:, rows]).sum(), params, materialize_grads=True)
        for e, g in zip(expected, got):
            torch.testing.assert_close(g[i], e, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_op_against_float64_reference_and_opcheck(dtype):
    args, segment_ids = random_inputs(33, 20, 12, 3, 5, dtype, torch.Generator().manual_seed(3))
    x, h, grad_y, grad_h = (args[k] for k in ("x", "h", "grad_y", "grad_h"))
    grad_A, grad_B = segment_lora_gradients(x, h, grad_y, grad_h, segment_ids, 5, 0.5)
    assert grad_A.shape == (5, 3, 20) and grad_B.shape == (5, 12, 3)
    assert grad_A.dtype == grad_B.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    d = [t.double() for t in (x, h, grad_y, grad_h)]
    for i in range(5):
        rows = segment_ids == i
        ref_A, ref_B = d[3][rows].T @ d[0][rows], 0.5 * d[2][rows].T @ d[1][rows]
        # float32 accumulation of dtype-rounded inputs: the error of a same-precision eager GEMM, at most
        tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad_A[i].double(), ref_A, **tol)
        torch.testing.assert_close(grad_B[i].double(), ref_B, **tol)
    torch.library.opcheck(torch.ops.ippo.segment_lora_gradients.default, (x, h, grad_y, grad_h, segment_ids, 5, 0.5))


def test_op_degenerate_inputs():
    args, segment_ids = random_inputs(0, 20, 12, 3, 4, torch.float32, torch.Generator().manual_seed(1))
    grad_A, grad_B = segment_lora_gradients(args["x"], args["h"], args["grad_y"], args["grad_h"], segment_ids, 4)
    assert grad_A.shape == (4, 3, 20) and not grad_A.any() and not grad_B.any()
    args, segment_ids = random_inputs(9, 20, 12, 3, 4, torch.float32, torch.Generator().manual_seed(1))
    none = torch.full_like(segment_ids, -1)  # every token padding: zeros, whatever padding holds
    args["x"][0] = float("nan")
    grad_A, grad_B = segment_lora_gradients(args["x"], args["h"], args["grad_y"], args["grad_h"], none, 2)
    assert grad_A.shape == (2, 3, 20) and not grad_A.any() and not grad_B.any()
    grad_A, _ = segment_lora_gradients(args["x"], args["h"], args["grad_y"], args["grad_h"], none, 0)
    assert grad_A.shape == (0, 3, 20)


def test_bad_arguments():
    args, segment_ids = random_inputs(9, 20, 12, 3, 4, torch.float32, torch.Generator().manual_seed(1))
    x, h, grad_y, grad_h = (args[k] for k in ("x", "h", "grad_y", "grad_h"))
    with pytest.raises(ValueError, match="segment_ids must lie in"):
        segment_lora_gradients(x, h, grad_y, grad_h, segment_ids, 2)
    with pytest.raises(ValueError, match="grad_h has shape"):
        segment_lora_gradients(x, h, grad_y, grad_h[:, :2], segment_ids, 4)
    with pytest.raises(ValueError, match="scaling must be"):
        segment_lora_gradients(x, h, grad_y, grad_h, segment_ids, 4, float("nan"))
    model = tiny_model()
    with pytest.raises(ValueError, match="episode_grads must be True or False"):
        InfluenceScorer(model, val_grads_of(model), torch.zeros(2, 3, dtype=torch.long), episode_grads=1)
    scorer = run(model, val_grads_of(model), random_episodes([2, 3]))
    scorer.episode_grads = False
    with pytest.raises(RuntimeError, match="episode_grads=True"):
        scorer.episode_gradients  # noqa: B018


@pytest.mark.parametrize("episode_grads", [True, False])
def test_a_used_scorer_is_freed_by_reference_counting(episode_grads):
    """No reference cycle holds a scorer (and its buffers: rows x LoRA parameters with episode_grads) after its
    backward: dropping the last reference frees it at once, not at the next run of the cycle collector."""
    model = tiny_model()
    gc.collect()
    gc.disable()
    try:
        if episode_grads:
            scorer = run(model, val_grads_of(model), random_episodes(LENGTHS))
        else:
            *inputs, segment_ids = batch(random_episodes(LENGTHS), row_length=15)
            with InfluenceScorer(model, val_grads_of(model), segment_ids, len(LENGTHS), sketch_dim=12) as scorer:
                episode_losses(model, *inputs).sum().backward()
        assert scorer.scores.isfinite().all()
        freed = weakref.ref(scorer)
        del scorer
        assert freed() is None
    finally:
        gc.enable()
