"""InfluenceScorer in one backward vs an explicit per-episode backward loop, in float64, on a random-init Llama
with peft LoRA on all linear projections; and its refusals of misuse."""

import copy
import re

import pytest
import torch
from conftest import DEVICE
from helpers import LENGTHS, batch, random_episodes, tiny_model, val_grads_of
from peft import LoraConfig, get_peft_model

from ippo.kernels import InfluenceScorer, lora_weights, segment_ids_from_mask, validation_gradients
from ippo.testing import episode_losses, init_lora_B, lora_pairs, loss_influence, per_episode_loop


def reference(model, val_grads, episodes):
    """The per-episode loop (empty episodes score 0)."""
    input_ids, targets, weights, mask, _, _ = batch(episodes)
    return per_episode_loop(model, val_grads, input_ids, targets, weights, mask)


def scored_backward(model, val_grads, input_ids, targets, weights, mask, position_ids, segment_ids, num_segments=None):
    with InfluenceScorer(model, val_grads, segment_ids, num_segments) as scorer:
        episode_losses(model, input_ids, targets, weights, mask, position_ids).sum().backward()
    return scorer.scores


@pytest.mark.parametrize("padding", ["right", "left"])
def test_one_backward_equals_per_episode_loop(backend, padding):
    model = tiny_model()
    val_grads = val_grads_of(model)
    episodes = random_episodes(LENGTHS)
    expected = reference(model, val_grads, episodes)
    scores = scored_backward(model, val_grads, *batch(episodes, padding=padding, row_length=15), len(episodes))
    assert scores.dtype == torch.float64
    torch.testing.assert_close(scores, expected, rtol=1e-9, atol=1e-12)
    assert expected.abs().min() == 0 and expected.abs().max() > 1e-3  # the empty episode, and real signal


def test_score_independent_of_batch_mates_and_grads_unchanged(backend):
    model = tiny_model()
    val_grads = val_grads_of(model)
    episodes = random_episodes(LENGTHS)
    inputs = batch(episodes)
    scores_all = scored_backward(model, val_grads, *inputs, len(episodes))
    lora_weights = [module.weight for module, _ in lora_pairs(model, val_grads)]
    with_scorer = [w.grad.clone() for w in lora_weights]
    model.zero_grad()
    episode_losses(model, *inputs[:5]).sum().backward()  # plain peft backward, no scorer
    for ours, plain in zip(with_scorer, [w.grad for w in lora_weights]):
        torch.testing.assert_close(ours, plain, rtol=1e-12, atol=1e-14)
    subset = [episodes[i] for i in (4, 1)]
    scores_subset = scored_backward(model, val_grads, *batch(subset, padding="left", row_length=20), 2)
    torch.testing.assert_close(scores_subset, scores_all[[4, 1]], rtol=1e-9, atol=1e-12)


def test_lora_dropout_active(backend):
    """Dropout masks differ per forward, so the reference takes per-episode gradients of the same forward."""
    model = tiny_model(dropout=0.3)
    model.train()
    val_grads = val_grads_of(model)
    episodes = random_episodes(LENGTHS)
    *inputs, segment_ids = batch(episodes)
    pairs = lora_pairs(model, val_grads)
    with InfluenceScorer(model, val_grads, segment_ids) as scorer:
        losses = episode_losses(model, *inputs)
        losses.sum().backward(retain_graph=True)
        scores = scorer.scores
        expected = torch.stack([loss_influence(loss, pairs, retain_graph=True) for loss in losses])
    torch.testing.assert_close(scores, expected, rtol=1e-9, atol=1e-12)
    model.eval()
    assert not torch.allclose(expected, reference(model, val_grads, episodes))  # dropout did act


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_counts_each_layer_once(backend, use_reentrant):
    model = tiny_model()
    val_grads = val_grads_of(model)
    episodes = random_episodes(LENGTHS)
    expected = reference(model, val_grads, episodes)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    model.enable_input_require_grads()
    model.train()  # transformers checkpoints only in training mode
    scores = scored_backward(model, val_grads, *batch(episodes), len(episodes))
    torch.testing.assert_close(scores, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_low_precision_within_twice_eager_error(backend, dtype):
    """flash-attention's rule at model level: vs the float64 loop, our error <= 2x that of the per-episode
    loop run in the same dtype (plus a floor of 1e-6 of the largest score)."""
    model64 = tiny_model()
    val_grads = val_grads_of(model64)
    episodes = random_episodes(LENGTHS)
    expected = reference(model64, val_grads, episodes)
    model = copy.deepcopy(model64).to(dtype)
    val_low = {name: type(v)(v.A.to(dtype), v.B.to(dtype)) for name, v in val_grads.items()}
    eager = reference(model, val_low, episodes)
    scores = scored_backward(model, val_low, *batch(episodes), len(episodes))
    assert scores.dtype == torch.float32
    our_error = (scores.double() - expected).abs().max().item()
    eager_error = (eager.double() - expected).abs().max().item()
    assert our_error <= 2 * eager_error + 1e-6 * expected.abs().max().item(), (our_error, eager_error)


def test_nan_in_one_episode_leaves_the_others_finite(backend):
    model = tiny_model()
    val_grads = val_grads_of(model)
    episodes = random_episodes(LENGTHS)
    episodes[2][2][5] = float("nan")  # a loss weight of episode 2
    scores = scored_backward(model, val_grads, *batch(episodes), len(episodes))
    assert not torch.isfinite(scores[2])
    assert torch.isfinite(scores[[0, 1, 3, 4, 5]]).all()


def test_packed_episodes_in_a_tokenwise_model(backend):
    """Packed, interleaved episodes: a token-wise MLP mixes no tokens, so any packing is exact."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.Tanh(), torch.nn.Linear(20, 9)).double().to(DEVICE)
    model = get_peft_model(base, LoraConfig(r=5, lora_alpha=3, target_modules=["0", "2"]))
    init_lora_B(model, 0.3)
    x = torch.randn(1, 40, 12, dtype=torch.float64, device=DEVICE)
    weights = torch.randn(1, 40, 9, dtype=torch.float64, device=DEVICE)
    segment_ids = torch.randint(-1, 6, (1, 40), device=DEVICE)
    val_grads = validation_gradients(model, (model(torch.randn(8, 12, dtype=torch.float64, device=DEVICE)) ** 2).sum())
    with InfluenceScorer(model, val_grads, segment_ids, num_segments=7) as scorer:
        (model(x) * weights).sum().backward()
    pairs = lora_pairs(model, val_grads)
    expected = [loss_influence((model(x[:, segment_ids[0] == i]) * weights[:, segment_ids[0] == i]).sum(), pairs)
                for i in range(7)]
    torch.testing.assert_close(scorer.scores, torch.stack(expected), rtol=1e-9, atol=1e-12)


def test_bad_input():
    model = tiny_model()
    val_grads = val_grads_of(model)
    *inputs, segment_ids = batch(random_episodes([3, 4]))
    some_layer = next(iter(val_grads))
    missing = {k: v for k, v in val_grads.items() if k != some_layer}
    with pytest.raises(ValueError, match="val_grads must have one entry per LoRA layer; missing"):
        InfluenceScorer(model, missing, segment_ids)
    wrong = dict(val_grads, **{some_layer: (val_grads[some_layer].A[:, :-1], val_grads[some_layer].B)})
    with pytest.raises(ValueError, match=r"\.A must have shape \(3, 24\) like lora_A.weight; got \(3, 23\)"):
        InfluenceScorer(model, wrong, segment_ids)
    with pytest.raises(ValueError, match=r"segment_ids must lie in \[-1, num_segments\) = \[-1, 1\)"):
        InfluenceScorer(model, val_grads, segment_ids, num_segments=1)
    with pytest.raises(ValueError, match="segment_ids must be an int32 or int64 tensor; got torch.float32"):
        InfluenceScorer(model, val_grads, segment_ids.float())
    with pytest.raises(ValueError, match="model has no peft LoRA Linear layers"):
        InfluenceScorer(torch.nn.Linear(3, 3), {}, segment_ids)


def forwards(model):
    """{LoRA layer name: its instance forward, or None}: what a scorer patches and must restore."""
    return {name: vars(module).get("forward") for name, module in model.named_modules() if hasattr(module, "lora_A")}


@pytest.mark.parametrize("shape", [(10,), (4, 2), (1, 8)], ids=str)
def test_segment_ids_must_be_shaped_like_the_batch(shape):
    """A (2, 4) batch: segment_ids of 10 tokens, or of its 8 tokens in another shape, are refused."""
    model = tiny_model()
    val_grads = val_grads_of(model)
    inputs = batch(random_episodes([3, 4]))[:5]
    message = (f"got input of shape (2, 4, 24), i.e. tokens (2, 4), but segment_ids has shape {shape}; "
               "pass segment_ids shaped like the batch's input_ids")
    with pytest.raises(ValueError, match=re.escape(message)):
        with InfluenceScorer(model, val_grads, torch.zeros(shape, dtype=torch.long, device=DEVICE), 1):
            episode_losses(model, *inputs).sum().backward()
    assert not any(forwards(model).values())  # restored on error


def test_packed_segment_ids_accept_one_row(backend):
    """(N,) segment_ids for a (1, N) batch: the packed layout."""
    model = tiny_model()
    val_grads = val_grads_of(model)
    *inputs, segment_ids = batch(random_episodes([5]))
    expected = scored_backward(model, val_grads, *inputs, segment_ids)
    assert torch.equal(scored_backward(model, val_grads, *inputs, segment_ids.reshape(-1)), expected)


def test_a_scorer_is_entered_once():
    model = tiny_model()
    val_grads = val_grads_of(model)
    *inputs, segment_ids = batch(random_episodes([3, 4]))
    scorer = InfluenceScorer(model, val_grads, segment_ids)
    with scorer:
        episode_losses(model, *inputs).sum().backward()
    with pytest.raises(RuntimeError, match="this scorer was already entered"):
        with scorer:
            episode_losses(model, *inputs).sum().backward()
    assert not any(forwards(model).values())


def test_nested_scorers_refused_and_forwards_restored():
    """A second scorer on the same layers is refused; both exits leave the forwards as they were, including
    an instance forward set before the scorer (e.g. an accelerate hook)."""
    model = tiny_model()
    val_grads = val_grads_of(model)
    *inputs, segment_ids = batch(random_episodes([3, 4]))
    hooked = model.base_model.model.model.layers[0].self_attn.q_proj
    hooked.forward = hook = hooked.forward  # an instance forward set by someone else, e.g. a hook
    before = forwards(model)
    outer = InfluenceScorer(model, val_grads, segment_ids)
    with outer:
        with pytest.raises(RuntimeError, match="is already scored by another active InfluenceScorer; nested"):
            with InfluenceScorer(model, val_grads, segment_ids):
                pass
        episode_losses(model, *inputs).sum().backward()
    assert forwards(model) == before and vars(hooked)["forward"] is hook
    assert outer.scores.abs().max() > 0
    with InfluenceScorer(model, val_grads, segment_ids) as again:  # usable again after the exit
        episode_losses(model, *inputs).sum().backward()
    torch.testing.assert_close(again.scores, outer.scores)


def test_exception_inside_the_context_restores_every_forward():
    model = tiny_model()
    val_grads = val_grads_of(model)
    _, segment_ids = batch(random_episodes([3, 4]))[4:]
    with pytest.raises(KeyError):
        with InfluenceScorer(model, val_grads, segment_ids):
            assert all(forwards(model).values())
            raise KeyError("boom")
    assert not any(forwards(model).values())


def test_merge_adapter_inside_the_context_is_refused():
    model = tiny_model()
    val_grads = val_grads_of(model)
    *inputs, segment_ids = batch(random_episodes([3, 4]))
    with pytest.raises(RuntimeError, match="was merged into its base weight inside the scorer's context"):
        with InfluenceScorer(model, val_grads, segment_ids):
            model.merge_adapter()
            episode_losses(model, *inputs).sum().backward()
    model.unmerge_adapter()
    assert not any(forwards(model).values())


def test_validation_gradients_refuse_a_loss_that_misses_the_adapter():
    model = tiny_model()
    inputs = batch(random_episodes([3, 4]))[:5]
    with model.disable_adapter():
        detached = episode_losses(model, *inputs).sum()  # the LoRA branch is not in the graph
    with pytest.raises(ValueError, match="validation gradient is zero for every LoRA parameter"):
        validation_gradients(model, detached)
    with pytest.raises(ValueError, match="validation gradient is zero for every LoRA parameter"):
        validation_gradients(model, 0 * episode_losses(model, *inputs).sum())
    with torch.no_grad():
        no_graph = episode_losses(model, *inputs).sum()
    with pytest.raises(ValueError, match="validation gradient is zero for every LoRA parameter"):
        validation_gradients(model, no_graph)


def test_validation_gradients_refuse_a_non_finite_loss():
    model = tiny_model()
    inputs = batch(random_episodes([3, 4]))[:5]
    with pytest.raises(ValueError, match="validation gradient is not finite"):
        validation_gradients(model, float("inf") * episode_losses(model, *inputs).sum())


def test_lora_weights_are_the_active_adapters_parameters_in_model_order():
    model = tiny_model()
    weights = lora_weights(model)
    layers = [n for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    assert list(weights) == layers
    for name, (A, B) in weights.items():
        layer = model.get_submodule(name)
        assert A is layer.lora_A["default"].weight and B is layer.lora_B["default"].weight


def test_segment_ids_from_mask():
    mask = torch.tensor([[0, 1, 1], [1, 1, 0], [0, 0, 0]])
    assert segment_ids_from_mask(mask).tolist() == [[-1, 0, 0], [1, 1, -1], [-1, -1, -1]]
    with pytest.raises(ValueError, match="attention_mask must be a \\(B, T\\) tensor"):
        segment_ids_from_mask(torch.ones(3))


def test_validation_gradients_at_peft_init():
    """peft starts lora_B at 0: then dl/dA = 0 but dl/dB is not, and that is a valid validation gradient."""
    model = tiny_model()
    init_lora_B(model, 0.0)
    val_grads = validation_gradients(model, episode_losses(model, *batch(random_episodes([3, 4]))[:5]).sum())
    assert all(not v.A.any() for v in val_grads.values())
    assert any(v.B.any() for v in val_grads.values())


def test_backward_runs_the_registered_op():
    """The scorer's backward calls torch.ops.ippo.token_influence (the op test_op_contract opchecks) once per
    LoRA layer."""
    model = tiny_model()
    val_grads = val_grads_of(model)
    with torch.profiler.profile() as profile:
        scored_backward(model, val_grads, *batch(random_episodes([3, 4])))
    calls = {event.key: event.count for event in profile.key_averages()}
    assert calls.get("ippo::lora_token_influence") == len(val_grads) == 14


def test_torch_compiled_model_scores_equal_eager():
    """The path users run: a torch.compile'd model's forward and backward inside InfluenceScorer (graph breaks
    allowed) give the eager scores; before and after the context the compiled model is the plain one."""
    model = tiny_model()
    val_grads = val_grads_of(model)
    *inputs, segment_ids = batch(random_episodes(LENGTHS), row_length=15)
    expected = scored_backward(model, val_grads, *inputs, segment_ids, len(LENGTHS))
    lora_weights = [module.weight for module, _ in lora_pairs(model, val_grads)]
    eager_grads = [w.grad.clone() for w in lora_weights]
    compiled = torch.compile(model, backend="aot_eager")

    def compiled_backward():
        model.zero_grad(set_to_none=True)
        episode_losses(compiled, *inputs).sum().backward()
        for w, grad in zip(lora_weights, eager_grads):
            torch.testing.assert_close(w.grad, grad, rtol=1e-9, atol=1e-12)

    compiled_backward()  # compiled without a scorer first
    with InfluenceScorer(model, val_grads, segment_ids, len(LENGTHS)) as scorer:
        compiled_backward()
    torch.testing.assert_close(scorer.scores, expected, rtol=1e-9, atol=1e-12)
    compiled_backward()  # and after the exit, no scored layer is left in the compiled model
    torch.testing.assert_close(scorer.scores, expected, rtol=1e-9, atol=1e-12)


def test_autocast_bf16_matches_eager_error(backend):
    """fp32 weights under bf16 autocast: the LoRA branch runs in bf16 like peft's; error as eager's."""
    model = tiny_model()
    val_grads = val_grads_of(model)
    episodes = random_episodes(LENGTHS)
    expected = reference(model, val_grads, episodes)
    model = model.float()
    val32 = {name: type(v)(v.A.float(), v.B.float()) for name, v in val_grads.items()}
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        eager = reference(model, val32, episodes)
        scores = scored_backward(model, val32, *batch(episodes), len(episodes))
    our_error = (scores.double() - expected).abs().max().item()
    eager_error = (eager.double() - expected).abs().max().item()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)
    assert our_error <= 2 * eager_error + 1e-6 * expected.abs().max().item(), (our_error, eager_error)


def test_scored_forward_equals_plain_forward(backend):
    """The folded forward (x [A; V_A]^T, 2r wide) gives peft's logits to float64 rounding; with lora_grads=False
    the scorer keeps no x for the backward and still scores the same."""
    model = tiny_model()
    val_grads = val_grads_of(model)
    *inputs, segment_ids = batch(random_episodes(LENGTHS), row_length=15)
    with torch.no_grad():
        plain = model(input_ids=inputs[0], attention_mask=inputs[3], position_ids=inputs[4]).logits
    with InfluenceScorer(model, val_grads, segment_ids, len(LENGTHS), lora_grads=False) as scorer:
        scored = model(input_ids=inputs[0], attention_mask=inputs[3], position_ids=inputs[4]).logits
        episode_losses(model, *inputs).sum().backward()
    torch.testing.assert_close(scored, plain, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(scorer.scores, scored_backward(model, val_grads, *inputs, segment_ids, len(LENGTHS)),
                               rtol=1e-12, atol=1e-14)
