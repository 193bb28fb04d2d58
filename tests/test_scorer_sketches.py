"""InfluenceScorer(sketch_dim=k): whole-model gradient sketches from the scored backward, against per-episode
gradients sketched with ``sketch_gradients`` in float64; unbiased estimates of the scores with error ~ 1/sqrt(k);
scores and sketches from one backward equal to two; token_scores; scoring only (lora_grads=False); refusals."""

import math

import pytest
import torch
from conftest import DEVICE
from helpers import LENGTHS, batch, packed_token_model, random_episodes, tiny_model, val_grads_of

from ippo.kernels import InfluenceScorer, sketch_gradients, sketch_layer_index
from ippo.kernels.scorer import lora_linear_layers, lora_weights
from ippo.testing import episode_losses, lora_pairs, per_episode_gradients

K = 48  # a multiple of 2r = 6


def run(model, val_grads, episodes, padding="right", row_length=15, **kwargs):
    *inputs, segment_ids = batch(episodes, padding=padding, row_length=row_length)
    with InfluenceScorer(model, val_grads, segment_ids, len(episodes), **kwargs) as scorer:
        episode_losses(model, *inputs).sum().backward()
    return scorer


def loop_grads(model, episodes):
    input_ids, targets, weights, mask, _, _ = batch(episodes)
    return per_episode_gradients(model, input_ids, targets, weights, mask)


@pytest.mark.parametrize("padding", ["right", "left"])
def test_scorer_sketches_equal_per_episode_loop_sketches(backend, padding):
    model = tiny_model()
    episodes = random_episodes(LENGTHS)
    scorer = run(model, None, episodes, padding=padding, sketch_dim=K, sketch_seed=5)
    expected = torch.stack([sketch_gradients(g, K, seed=5) for g in loop_grads(model, episodes)])
    assert scorer.sketches.dtype == torch.float64 and scorer.sketches.shape == (len(LENGTHS), K)
    torch.testing.assert_close(scorer.sketches, expected, rtol=1e-9, atol=1e-12)
    assert (scorer.sketches[3] == 0).all() and expected.abs().max() > 1e-3  # the empty episode, and signal
    other_seed = run(model, None, episodes, padding=padding, sketch_dim=K, sketch_seed=6).sketches
    assert not torch.allclose(other_seed, scorer.sketches)


def test_packed_unsorted_segments(backend):
    """One packed row whose tokens interleave episodes (a token-wise model mixes no tokens)."""
    model, x, weights, segment_ids = packed_token_model()
    with InfluenceScorer(model, None, segment_ids, num_segments=7, sketch_dim=20, sketch_seed=1) as scorer:
        (model(x) * weights).sum().backward()
    names = list(lora_weights(model))
    params = [p for pair in lora_weights(model).values() for p in pair]
    expected = []
    for i in range(7):
        rows = segment_ids[0] == i
        grads = torch.autograd.grad((model(x[:, rows]) * weights[:, rows]).sum(), params, materialize_grads=True)
        expected.append(sketch_gradients({n: (grads[2 * j], grads[2 * j + 1]) for j, n in enumerate(names)}, 20, 1))
    torch.testing.assert_close(scorer.sketches, torch.stack(expected), rtol=1e-9, atol=1e-12)


def test_scores_and_sketches_from_one_backward_equal_two_backwards(backend):
    model = tiny_model()
    val_grads = val_grads_of(model)
    episodes = random_episodes(LENGTHS)
    both = run(model, val_grads, episodes, sketch_dim=K, sketch_seed=2)
    model.zero_grad()
    scores_only = run(model, val_grads, episodes)
    model.zero_grad()
    sketches_only = run(model, None, episodes, sketch_dim=K, sketch_seed=2)
    torch.testing.assert_close(both.scores, scores_only.scores, rtol=0, atol=0)
    # Without val_grads the LoRA GEMMs are r wide, not 2r (the validation gradient folded in): h and grad_h may
    # round differently, so the sketches agree to rounding only.
    torch.testing.assert_close(both.sketches, sketches_only.sketches, rtol=1e-12, atol=1e-14)


def test_whole_model_sketch_unbiased_with_error_like_inverse_sqrt_k():
    """Over 100 seeds, sketch_gradients(G_i) . sketch_gradients(V) (what scorer.sketches @ sketch_gradients(V)
    computes, test above) has mean within 4 standard errors of s_i, and RMS error 4x smaller at 16x k."""
    model = tiny_model()
    val_grads = val_grads_of(model)
    episodes = random_episodes([7, 12, 9])
    grads = loop_grads(model, episodes)
    exact = torch.stack([sum((g.A * v.A).sum() + (g.B * v.B).sum() for g, v in zip(gi.values(), val_grads.values()))
                         for gi in grads])
    rms = {}
    for k in (6, 96):
        estimates = torch.stack([torch.stack([sketch_gradients(g, k, seed) for g in grads])
                                 @ sketch_gradients(val_grads, k, seed) for seed in range(100)])
        errors = estimates - exact
        assert (errors.mean(0).abs() <= 4 * errors.std(0) / math.sqrt(len(errors))).all()
        rms[k] = errors.pow(2).mean().sqrt().item()
    assert 2.5 < rms[6] / rms[96] < 6.5, rms


def test_sketched_scores_estimate_scores():
    """At k = 6000 (torch backend; the others are checked against it above) the estimate from the scorer's own
    sketches is close to its exact scores."""
    model = tiny_model()
    val_grads = val_grads_of(model)
    scorer = run(model, val_grads, random_episodes(LENGTHS), sketch_dim=6000, sketch_seed=3)
    estimate = scorer.sketches @ sketch_gradients(val_grads, 6000, seed=3, model=model)
    scale = scorer.scores.abs().max()
    assert (estimate - scorer.scores).abs().max() < 0.1 * scale


def test_token_scores_sum_to_scores_and_are_zero_on_padding(backend):
    model = tiny_model()
    val_grads = val_grads_of(model)
    episodes = random_episodes(LENGTHS)
    *_, segment_ids = batch(episodes, padding="left", row_length=15)
    scorer = run(model, val_grads, episodes, padding="left")
    tokens = scorer.token_scores
    assert tokens.shape == segment_ids.shape and tokens.dtype == torch.float64
    assert (tokens[segment_ids < 0] == 0).all()
    per_episode = torch.zeros(len(episodes), dtype=torch.float64, device=DEVICE).index_add_(
        0, segment_ids.clamp_min(0).flatten(), tokens.flatten())
    torch.testing.assert_close(per_episode, scorer.scores, rtol=1e-12, atol=1e-14)


def test_scoring_only_skips_lora_grads(backend):
    """lora_grads=False: the same scores and sketches, the LoRA .grad untouched, the rest of the gradient the same."""
    model = tiny_model()
    val_grads = val_grads_of(model)
    episodes = random_episodes(LENGTHS)
    model.get_input_embeddings().weight.requires_grad_(True)
    full = run(model, val_grads, episodes, sketch_dim=K)
    embedding_grad = model.get_input_embeddings().weight.grad.clone()
    model.zero_grad(set_to_none=True)
    lean = run(model, val_grads, episodes, sketch_dim=K, lora_grads=False)
    torch.testing.assert_close(lean.scores, full.scores, rtol=0, atol=0)
    torch.testing.assert_close(lean.sketches, full.sketches, rtol=0, atol=0)
    assert all(module.weight.grad is None for module, _ in lora_pairs(model, val_grads))
    torch.testing.assert_close(model.get_input_embeddings().weight.grad, embedding_grad, rtol=1e-12, atol=1e-14)


def test_backward_runs_the_registered_sketch_op():
    model = tiny_model()
    with torch.profiler.profile() as profile:
        run(model, val_grads_of(model), random_episodes([3, 4]), sketch_dim=K)
    calls = {event.key: event.count for event in profile.key_averages()}
    assert calls.get("ippo::gradient_sketches") == calls.get("ippo::lora_token_influence") == 14


def test_layer_order_is_the_models_and_checked():
    model = tiny_model()
    val_grads = val_grads_of(model)
    names = list(lora_linear_layers(model))
    assert list(val_grads) == names and sketch_layer_index(names) == {n: i for i, n in enumerate(names)}
    shuffled = dict(reversed(list(val_grads.items())))
    assert torch.equal(sketch_gradients(shuffled, K, model=model), sketch_gradients(val_grads, K))
    assert not torch.allclose(sketch_gradients(shuffled, K), sketch_gradients(val_grads, K))  # dict order counts
    scorer = InfluenceScorer(model, None, torch.zeros(2, 3, dtype=torch.long, device=DEVICE), sketch_dim=K)
    assert scorer.sketch_layers == tuple(names)
    with pytest.raises(ValueError, match=r"grads must have one entry per LoRA layer of model; missing \["):
        sketch_gradients(dict(list(val_grads.items())[1:]), K, model=model)


def test_bad_sketch_arguments():
    model = tiny_model()
    val_grads = val_grads_of(model)
    ids = torch.zeros(2, 3, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="nothing to compute: val_grads is None and sketch_dim is None"):
        InfluenceScorer(model, None, ids)
    with pytest.raises(ValueError, match=r"sketch_dim must be a positive int, a multiple of 2 \* r .*\(2r in \[6\]\); "
                                         r"got 40, not a multiple for layer"):
        InfluenceScorer(model, val_grads, ids, sketch_dim=40)
    for bad in (0, -6, 6.0, True):
        with pytest.raises(ValueError, match="sketch_dim must be a positive int"):
            InfluenceScorer(model, val_grads, ids, sketch_dim=bad)
    for bad in (-1, 2**63, 1.5):
        with pytest.raises(ValueError, match=r"sketch_seed must be an int in \[0, 2\*\*63\)"):
            InfluenceScorer(model, val_grads, ids, sketch_dim=K, sketch_seed=bad)
    with pytest.raises(ValueError, match="lora_grads must be True or False"):
        InfluenceScorer(model, val_grads, ids, lora_grads=None)
    with pytest.raises(ValueError, match=r"sketch_gradients: sketch_dim must be .*got 10"):
        sketch_gradients(val_grads, 10)
    sketches_only = InfluenceScorer(model, None, ids, sketch_dim=K)
    with pytest.raises(RuntimeError, match="scores needs validation gradients"):
        _ = sketches_only.scores
    with pytest.raises(RuntimeError, match="sketches need sketch_dim=k"):
        _ = InfluenceScorer(model, val_grads, ids).sketches
