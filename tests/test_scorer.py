"""InfluenceScorer in one backward vs an explicit per-episode backward loop, in float64, on a random-init Llama
with peft LoRA on all linear projections."""

import copy

import pytest
import torch

from peft import LoraConfig, get_peft_model

from ippo.kernels import InfluenceScorer, validation_gradients
from conftest import DEVICE
from lora_models import batch, lora_parameters, per_token_loss, random_episodes, tiny_llama

LENGTHS = [1, 7, 12, 0, 4, 9]  # an episode of one token, and an empty one


def val_grads_of(model, seed=99):
    val = batch(random_episodes([10, 6, 8], seed=seed))
    return validation_gradients(model, per_token_loss(model, *val[:5]).sum())


def dot_with_val(grads, model, val_grads):
    """<grads of the LoRA parameters, val_grads>, parameters in named_parameters order."""
    names = [n for n, _ in model.named_parameters() if "lora_" in n]
    total = torch.zeros((), dtype=torch.float64, device=DEVICE)
    for name, grad in zip(names, grads):
        layer = name.split(".lora_")[0]
        val = val_grads[layer].A if ".lora_A." in name else val_grads[layer].B
        total += (grad.double() * val.double()).sum()
    return total


def per_episode_loop(model, episodes, val_grads):
    """The published method: one backward per episode, alone in its batch; empty episodes score 0."""
    scores = []
    for episode in episodes:
        if len(episode[0]) == 0:
            scores.append(torch.zeros((), dtype=torch.float64, device=DEVICE))
            continue
        loss = per_token_loss(model, *batch([episode])[:5]).sum()
        scores.append(dot_with_val(torch.autograd.grad(loss, lora_parameters(model)), model, val_grads))
    return torch.stack(scores)


def scored_backward(model, val_grads, input_ids, mask, position_ids, targets, weights, segment_ids, num_segments):
    with InfluenceScorer(model, val_grads, segment_ids, num_segments) as scorer:
        per_token_loss(model, input_ids, mask, position_ids, targets, weights).sum().backward()
    return scorer.scores


@pytest.mark.parametrize("padding", ["right", "left"])
def test_one_backward_equals_per_episode_loop(backend, padding):
    model = tiny_llama()
    val_grads = val_grads_of(model)
    episodes = random_episodes(LENGTHS)
    expected = per_episode_loop(model, episodes, val_grads)
    *inputs, segment_ids = batch(episodes, padding=padding, row_length=15)
    scores = scored_backward(model, val_grads, *inputs, segment_ids, len(episodes))
    assert scores.dtype == torch.float64
    torch.testing.assert_close(scores, expected, rtol=1e-9, atol=1e-12)
    assert expected.abs().min() == 0 and expected.abs().max() > 1e-3  # the empty episode, and real signal


def test_score_independent_of_batch_mates_and_grads_unchanged(backend):
    model = tiny_llama()
    val_grads = val_grads_of(model)
    episodes = random_episodes(LENGTHS)
    *inputs, segment_ids = batch(episodes)
    scores_all = scored_backward(model, val_grads, *inputs, segment_ids, len(episodes))
    with_scorer = [p.grad.clone() for p in lora_parameters(model)]
    model.zero_grad()
    per_token_loss(model, *inputs).sum().backward()  # plain peft backward, no scorer
    for ours, plain in zip(with_scorer, [p.grad for p in lora_parameters(model)]):
        torch.testing.assert_close(ours, plain, rtol=1e-12, atol=1e-14)
    subset = [episodes[i] for i in (4, 1)]
    *inputs, segment_ids = batch(subset, padding="left", row_length=20)
    scores_subset = scored_backward(model, val_grads, *inputs, segment_ids, 2)
    torch.testing.assert_close(scores_subset, scores_all[[4, 1]], rtol=1e-9, atol=1e-12)


def test_lora_dropout_active(backend):
    """Dropout masks differ per forward, so the reference takes per-episode gradients of the same forward."""
    model = tiny_llama(lora_dropout=0.3)
    model.train()
    val_grads = val_grads_of(model)
    episodes = random_episodes(LENGTHS)
    *inputs, segment_ids = batch(episodes)
    with InfluenceScorer(model, val_grads, segment_ids) as scorer:
        token_loss = per_token_loss(model, *inputs)
        token_loss.sum().backward(retain_graph=True)
        scores = scorer.scores
        expected = torch.stack([
            dot_with_val(torch.autograd.grad(token_loss[i].sum(), lora_parameters(model), retain_graph=True),
                         model, val_grads) for i in range(len(episodes))])
    torch.testing.assert_close(scores, expected, rtol=1e-9, atol=1e-12)
    model.eval()
    assert not torch.allclose(expected, per_episode_loop(model, episodes, val_grads))  # dropout did act


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_counts_each_layer_once(backend, use_reentrant):
    model = tiny_llama()
    val_grads = val_grads_of(model)
    episodes = random_episodes(LENGTHS)
    expected = per_episode_loop(model, episodes, val_grads)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    model.enable_input_require_grads()
    model.train()  # transformers checkpoints only in training mode
    *inputs, segment_ids = batch(episodes)
    scores = scored_backward(model, val_grads, *inputs, segment_ids, len(episodes))
    torch.testing.assert_close(scores, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_low_precision_within_twice_eager_error(backend, dtype):
    """flash-attention's rule at model level: vs the float64 loop, our error <= 2x that of the per-episode
    loop run in the same dtype (plus a floor of 1e-6 of the largest score)."""
    model64 = tiny_llama()
    val_grads = val_grads_of(model64)
    episodes = random_episodes(LENGTHS)
    reference = per_episode_loop(model64, episodes, val_grads)
    model = copy.deepcopy(model64).to(dtype)
    val_low = {name: type(v)(v.A.to(dtype), v.B.to(dtype)) for name, v in val_grads.items()}
    eager = per_episode_loop(model, episodes, val_low)
    *inputs, segment_ids = batch(episodes)
    scores = scored_backward(model, val_low, *inputs, segment_ids, len(episodes))
    assert scores.dtype == torch.float32
    our_error = (scores.double() - reference).abs().max().item()
    eager_error = (eager - reference).abs().max().item()
    assert our_error <= 2 * eager_error + 1e-6 * reference.abs().max().item(), (our_error, eager_error)


def test_nan_in_one_episode_leaves_the_others_finite(backend):
    model = tiny_llama()
    val_grads = val_grads_of(model)
    episodes = random_episodes(LENGTHS)
    episodes[2][2][5] = float("nan")  # a loss weight of episode 2
    *inputs, segment_ids = batch(episodes)
    scores = scored_backward(model, val_grads, *inputs, segment_ids, len(episodes))
    assert not torch.isfinite(scores[2])
    assert torch.isfinite(scores[[0, 1, 3, 4, 5]]).all()


def test_packed_episodes_in_a_tokenwise_model(backend):
    """Packed, interleaved episodes: a token-wise MLP mixes no tokens, so any packing is exact."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.Tanh(), torch.nn.Linear(20, 9)).double().to(DEVICE)
    model = get_peft_model(base, LoraConfig(r=5, lora_alpha=3, target_modules=["0", "2"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    x = torch.randn(1, 40, 12, dtype=torch.float64, device=DEVICE)
    weights = torch.randn(1, 40, 9, dtype=torch.float64, device=DEVICE)
    segment_ids = torch.randint(-1, 6, (1, 40), device=DEVICE)
    val_grads = validation_gradients(model, (model(torch.randn(8, 12, dtype=torch.float64, device=DEVICE)) ** 2).sum())
    with InfluenceScorer(model, val_grads, segment_ids, num_segments=7) as scorer:
        (model(x) * weights).sum().backward()
    expected = []
    for i in range(7):
        sel = segment_ids[0] == i
        loss = (model(x[:, sel]) * weights[:, sel]).sum()
        expected.append(dot_with_val(torch.autograd.grad(loss, lora_parameters(model), allow_unused=True,
                                                         materialize_grads=True), model, val_grads))
    torch.testing.assert_close(scorer.scores, torch.stack(expected), rtol=1e-9, atol=1e-12)


def test_bad_input():
    model = tiny_llama()
    val_grads = val_grads_of(model)
    *inputs, segment_ids = batch(random_episodes([3, 4]))
    some_layer = next(iter(val_grads))
    missing = {k: v for k, v in val_grads.items() if k != some_layer}
    with pytest.raises(ValueError, match="val_grads must have one entry per LoRA layer; missing"):
        InfluenceScorer(model, missing, segment_ids)
    wrong = dict(val_grads, **{some_layer: (val_grads[some_layer].A[:, :-1], val_grads[some_layer].B)})
    with pytest.raises(ValueError, match=r"val_grads\[.*\]\.A must have shape \(3, 24\) like lora_A.weight; got \(3, 23\)"):
        InfluenceScorer(model, wrong, segment_ids)
    with pytest.raises(ValueError, match=r"segment_ids must lie in \[-1, num_segments\) = \[-1, 1\)"):
        InfluenceScorer(model, val_grads, segment_ids, num_segments=1)
    with pytest.raises(ValueError, match="segment_ids must be an int32 or int64 tensor; got torch.float32"):
        InfluenceScorer(model, val_grads, segment_ids.float())
    with pytest.raises(ValueError, match="saw 8 tokens, but segment_ids has 10"):
        with InfluenceScorer(model, val_grads, torch.zeros(10, dtype=torch.long, device=DEVICE)):
            per_token_loss(model, *inputs).sum().backward()
    assert "forward" not in vars(model.base_model.model.model.layers[0].self_attn.q_proj)  # restored on error
    with pytest.raises(ValueError, match="model has no peft LoRA Linear layers"):
        InfluenceScorer(torch.nn.Linear(3, 3), {}, segment_ids)


def test_autocast_bf16_matches_eager_error(backend):
    """fp32 weights under bf16 autocast: the LoRA branch runs in bf16 like peft's; error as eager's."""
    model = tiny_llama()
    val_grads = val_grads_of(model)
    episodes = random_episodes(LENGTHS)
    reference = per_episode_loop(model, episodes, val_grads)
    model = model.float()
    val32 = {name: type(v)(v.A.float(), v.B.float()) for name, v in val_grads.items()}
    *inputs, segment_ids = batch(episodes)
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        eager = per_episode_loop(model, episodes, val32)
        scores = scored_backward(model, val32, *inputs, segment_ids, len(episodes))
    our_error = (scores.double() - reference).abs().max().item()
    eager_error = (eager - reference).abs().max().item()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)
    assert our_error <= 2 * eager_error + 1e-6 * reference.abs().max().item(), (our_error, eager_error)
