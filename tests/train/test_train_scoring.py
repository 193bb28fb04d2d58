"""I-PPO scoring in the trainer, against explicit references in float64 on the tiny Llama: the validation gradient
accumulated over micro-batches, and the influence scores of the rollout."""

import pytest
import torch
from helpers import lora_params

from ippo.testing import lora_llama, tiny_tokenizer
from ippo.train import config, learner, policy, scoring
from ippo.train import ppo_math as pm
from ippo.train.tasks import Example, make_task

TOK = tiny_tokenizer()


def lora64(seed=0):
    return lora_llama(len(TOK), rank=4, alpha=8, lora_B_std=0.1, seed=seed, hidden_size=32, dtype=torch.float64)


def task():
    """arith, with validation pairs of different prompt and answer lengths (padding on both sides)."""
    t = make_task("arith", n_steps=2, digits=1, seed=0, sizes=(40, 12, 8))
    t.system_prompt = "Solve."
    val = t.split("validation")
    for i, ex in enumerate(val):
        val[i] = Example(ex.question + " Show it." * (i % 3), ex.answer + "\n" * (i % 4))
    return t


def reference_sft_loss(lm, tk, examples):
    """The pooled answer-token cross-entropy with one unpadded forward per example."""
    total, count = 0.0, 0
    for ex in examples:
        prompt = TOK(tk.prompt(ex, TOK), add_special_tokens=False).input_ids
        answer = TOK(ex.answer, add_special_tokens=False).input_ids + [TOK.eos_token_id]
        ids = torch.tensor([prompt + answer])
        logp = torch.log_softmax(lm(input_ids=ids).logits[0, len(prompt) - 1:-1].double(), -1)
        total = total - logp.gather(-1, torch.tensor(answer)[:, None]).sum()
        count += len(answer)
    return total / count


def test_sft_loss_is_the_pooled_answer_token_cross_entropy():
    lm, tk = lora64(), task()
    examples = tk.split("validation")[:5]
    torch.testing.assert_close(policy.sft_loss(lm, TOK, tk, examples), reference_sft_loss(lm, tk, examples),
                               rtol=1e-12, atol=0)


@pytest.mark.parametrize("batch", [1, 2, 5, 12])
def test_validation_gradient_over_micro_batches_equals_the_one_batch_gradient(batch):
    lm, tk = lora64(), task()
    examples = tk.split("validation")  # 12 pairs of different lengths
    expected = torch.autograd.grad(reference_sft_loss(lm, tk, examples), lora_params(lm))
    got = policy.validation_gradient(lm, TOK, tk, examples, batch)
    flat = [t for g in got.values() for t in (g.A, g.B)]
    assert len(flat) == len(expected)
    for a, b in zip(flat, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    assert all(p.grad is None for p in lora_params(lm))


def test_trim_rows_drops_only_padding_columns():
    tk = task()
    gold = policy.pack_answers(TOK, tk, tk.split("validation")[:6])
    rows = torch.argsort(gold.attn.sum(1))[:2].flip(0)  # the two shortest, in reverse order
    sub = policy.trim_rows(gold, rows)
    assert sub.ids.shape[1] < gold.ids.shape[1]
    for j, i in enumerate(rows.tolist()):  # the same tokens in the same order, responses at column prompt_len
        assert sub.ids[j][sub.attn[j].bool()].tolist() == gold.ids[i][gold.attn[i].bool()].tolist()
        assert sub.mask[j].sum() == gold.mask[i].sum()
        assert sub.attn[j, sub.prompt_len - 1] == 1 and sub.attn[j, sub.prompt_len:].tolist() == \
            sub.mask[j].long().tolist()


def scoring_setup(tmp_path, **kw):
    """A float64 tiny LoRA Llama, a sampled buffer (prompts left-padded to different lengths, responses
    right-padded) with its old log-probs and values, and a config."""
    cfg = config.Config(model=str(tmp_path), lora_r=4, lora_alpha=8, minibatch=3, val_batch=2, temperature=0.7, **kw)
    lm, tk = lora64(), task()
    prompts = [tk.split("train")[0], tk.split("train")[1]]
    prompts[1] = Example(prompts[1].question + " Think twice.", prompts[1].answer)
    torch.manual_seed(0)
    ro = policy.sample(lm, TOK, tk, prompts, 4, cfg.temperature, 9, 64)
    for i, length in enumerate([9, 3, 7, 1, 9, 5, 2, 8]):  # responses of different lengths (as if eos came)
        ro.mask[i, length:] = 0
        ro.attn[i, ro.prompt_len + length:] = 0
        ro.ids[i, ro.prompt_len + length:] = TOK.pad_token_id
    assert ro.attn[:, 0].any() and not ro.attn[:, 0].all() and not ro.mask[:, -1].all()  # padding on both sides
    head = torch.nn.Linear(32, 1, dtype=torch.float64)
    with torch.no_grad():
        old_logp, values = policy.buffer_logprobs(lm, ro, cfg.minibatch, head, cfg.temperature)
    return cfg, lm, tk, ro, old_logp, values


def reference_scores(lm, tk, cfg, ro, old_logp, advantages, val_examples):
    """<d actor_loss_i / d theta, d L_val / d theta> with one autograd.grad per episode (whole buffer forwards)."""
    params = lora_params(lm)
    g_val = torch.autograd.grad(reference_sft_loss(lm, tk, val_examples), params)
    out = []
    for i in range(len(ro.texts)):
        logp, _ = policy.response_logprobs(lm, ro, temperature=cfg.temperature)
        per_episode, _ = pm.policy_loss(logp, old_logp, advantages, ro.mask, cfg.clip)
        g_i = torch.autograd.grad(per_episode[i], params)
        out.append(sum((a * b).sum() for a, b in zip(g_i, g_val)))
    return torch.stack(out)


def advantages_of(kind, cfg, ro, old_logp, values):
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    if kind == "grpo":
        return pm.grpo_advantages(rewards, ro.group).to(torch.float64)[:, None] * ro.mask
    kl = pm.kl_penalty(old_logp, old_logp - 0.01, ro.mask)
    token_rewards = pm.shaped_rewards(rewards, kl, ro.mask, 0.1)
    adv, _ = pm.gae(token_rewards, values, ro.mask, 1.0, 0.95)
    return pm.masked_whiten(adv, ro.mask) if kind == "whitened" else adv


@pytest.mark.parametrize("kind", ["whitened", "raw", "grpo"])
def test_score_episodes_equals_per_episode_gradients_in_float64(tmp_path, kind):
    cfg, lm, tk, ro, old_logp, values = scoring_setup(tmp_path)
    adv = advantages_of(kind, cfg, ro, old_logp, values)
    val_examples = tk.split("validation")[:5]
    timing = {"val_grad": 0.0, "scoring": 0.0}
    scores = scoring.score_episodes(lm, TOK, tk, cfg, ro, old_logp, adv, val_examples, timing)
    expected = reference_scores(lm, tk, cfg, ro, old_logp, adv, val_examples)
    assert scores.dtype == torch.float64 and (expected != 0).all()
    torch.testing.assert_close(scores, expected, rtol=1e-9, atol=1e-12 * float(expected.abs().max()))
    assert all(p.grad is None for p in lora_params(lm)) and timing["val_grad"] > 0 and timing["scoring"] > 0


@pytest.mark.parametrize("variant", ["raw", "centred"])
def test_score_in_rollout_equals_per_episode_gradients_and_fills_the_buffer(tmp_path, variant):
    """Without whitening the scores come from the old-log-prob forward itself: equal to the explicit per-episode
    reference in float64, and the buffer gets exactly the log-probs and values of the no-grad forward."""
    import random

    cfg, lm, tk, ro, old_logp, values = scoring_setup(tmp_path, algo="ippo", whiten=False, kl_coef=0.1, lam=0.95,
                                                      score=variant)
    head = torch.nn.Linear(32, 1, dtype=torch.float64)
    torch.nn.init.normal_(head.weight, 0, 0.1)
    with torch.no_grad():
        old_logp, values = policy.buffer_logprobs(lm, ro, cfg.minibatch, head, cfg.temperature)
        with lm.disable_adapter():
            ref_logp, _ = policy.buffer_logprobs(lm, ro, cfg.minibatch, temperature=cfg.temperature)
    L = learner.Learner(cfg, tk, TOK, lm, head, torch.optim.SGD(lora_params(lm), lr=0.1), random.Random(0), None)
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    buf = learner.Buffer(ro, rewards, 0, None, ref_logp, None)
    val_examples = tk.split("validation")[:5]
    timing = {"val_grad": 0.0, "scoring": 0.0}
    scores = scoring.score_in_rollout(L, buf, val_examples, timing)
    assert torch.equal(buf.old_logp, old_logp) and torch.equal(buf.old_values, values)
    learner.compute_advantages(cfg, buf)
    expected = reference_scores(lm, tk, cfg, ro, old_logp, buf.advantages, val_examples)
    if variant == "centred":
        sim = reference_scores(lm, tk, cfg, ro, old_logp, ro.mask.double(), val_examples)
        a = (buf.advantages * ro.mask).sum(1) / ro.mask.sum(1)
        groups = ro.group.tolist()
        expected = a * (sim - torch.stack([sim[[j for j, h in enumerate(groups) if h == g]].mean() for g in groups]))
    assert scores.dtype == torch.float64 and (expected != 0).all()
    torch.testing.assert_close(scores, expected, rtol=1e-9, atol=1e-12 * float(expected.abs().max()))
    assert all(p.grad is None for p in lora_params(lm)) and all(p.requires_grad for p in lora_params(lm))
    with pytest.raises(ValueError, match="whiten"):
        L.cfg = config.Config(model=str(tmp_path), whiten=True)
        scoring.score_in_rollout(L, buf, val_examples, timing)


# ---------------------------------------------------------------------------- --score variants


def reference_answer_loss(lm, tk, examples):
    """The pooled cross-entropy of the final answers' tokens (those overlapping the stripped text after the last
    '####'), one unpadded forward per example."""
    total, count = 0.0, 0
    for ex in examples:
        prompt = TOK(tk.prompt(ex, TOK), add_special_tokens=False).input_ids
        enc = TOK(ex.answer, add_special_tokens=False, return_offsets_mapping=True)
        number = ex.answer[ex.answer.rindex("####") + 4:].strip()
        start = ex.answer.rindex(number)
        final = torch.tensor([e > start and s < start + len(number) for s, e in enc.offset_mapping] + [False])
        answer = enc.input_ids + [TOK.eos_token_id]
        ids = torch.tensor([prompt + answer])
        logp = torch.log_softmax(lm(input_ids=ids).logits[0, len(prompt) - 1:-1].double(), -1)
        total = total - logp.gather(-1, torch.tensor(answer)[:, None])[final].sum()
        count += int(final.sum())
    return total / count


def episode_gradients(lm, cfg, ro, old_logp, advantages):
    """[(g_i as a flat list in lora_params order)] with one autograd.grad per episode."""
    out = []
    for i in range(len(ro.texts)):
        logp, _ = policy.response_logprobs(lm, ro, temperature=cfg.temperature)
        per_episode, _ = pm.policy_loss(logp, old_logp, advantages, ro.mask, cfg.clip)
        out.append(torch.autograd.grad(per_episode[i], lora_params(lm)))
    return out


def dot(a, b):
    return sum((x * y).sum() for x, y in zip(a, b))


def score(cfg, lm, tk, ro, old_logp, adv, val_examples, **kw):
    return scoring.score_episodes(lm, TOK, tk, cfg, ro, old_logp, adv, val_examples,
                                  {"val_grad": 0.0, "scoring": 0.0}, **kw)


def variant_setup(tmp_path, kind, **kw):
    """``scoring_setup`` with ``kind`` advantages and five validation pairs."""
    cfg, lm, tk, ro, old_logp, values = scoring_setup(tmp_path, **kw)
    return cfg, lm, tk, ro, old_logp, advantages_of(kind, cfg, ro, old_logp, values), tk.split("validation")[:5]


def close(got, expected):
    assert got.dtype == torch.float64 and (expected != 0).all()
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12 * float(expected.abs().max()))


def test_final_answer_mask_and_loss():
    tk = task()
    examples = tk.split("validation")[:5]
    gold = policy.pack_answers(TOK, tk, examples, final_answer_only=True)
    whole = policy.pack_answers(TOK, tk, examples)
    numbers = [ex.answer.split("####")[-1].strip() for ex in examples]
    assert (gold.mask <= whole.mask).all() and gold.mask.sum(1).tolist() == [len(n) for n in numbers]  # 1 char/token
    lm = lora64()
    params = lora_params(lm)
    got = policy.validation_gradient(lm, TOK, tk, examples, 2, final_answer_only=True)
    expected = torch.autograd.grad(reference_answer_loss(lm, tk, examples), params)
    flat = [g for pair in got.values() for g in pair]
    for a, b in zip(flat, expected):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("kind", ["whitened", "grpo"])
def test_score_answer_equals_the_final_answer_reference(tmp_path, kind):
    cfg, lm, tk, ro, old_logp, adv, val_examples = variant_setup(tmp_path, kind, score="answer")
    g_val = torch.autograd.grad(reference_answer_loss(lm, tk, val_examples), lora_params(lm))
    expected = torch.stack([dot(g, g_val) for g in episode_gradients(lm, cfg, ro, old_logp, adv)])
    close(score(cfg, lm, tk, ro, old_logp, adv, val_examples), expected)


def test_score_adam_preconditions_by_the_optimizers_second_moment(tmp_path):
    cfg, lm, tk, ro, old_logp, adv, val_examples = variant_setup(tmp_path, "whitened", score="adam")
    params = lora_params(lm)
    opt = torch.optim.AdamW(params, lr=0.0, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.0)  # lr 0: weights stay
    g_val = torch.autograd.grad(reference_sft_loss(lm, tk, val_examples), params)
    episodes = episode_gradients(lm, cfg, ro, old_logp, adv)
    # before the first step: P = 1, the raw score
    close(score(cfg, lm, tk, ro, old_logp, adv, val_examples, opt=opt), torch.stack([dot(g, g_val) for g in episodes]))
    generator = torch.Generator().manual_seed(3)
    v = [torch.zeros_like(p) for p in params]
    for _ in (1, 2):
        grads = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in params]
        for p, g, acc in zip(params, grads, v):
            p.grad = g
            acc.mul_(0.95).add_(0.05 * g * g)  # Adam's second moment, by hand
        opt.step()
    preconditioned = [gv / ((acc / (1 - 0.95 ** 2)).sqrt() + 1e-6) for gv, acc in zip(g_val, v)]
    for p in params:
        p.grad = None
    close(score(cfg, lm, tk, ro, old_logp, adv, val_examples, opt=opt),
          torch.stack([dot(g, preconditioned) for g in episodes]))
    with pytest.raises(ValueError, match="--score adam needs the optimizer"):
        score(cfg, lm, tk, ro, old_logp, adv, val_examples)


@pytest.mark.parametrize("kind", ["whitened", "grpo"])
def test_score_centred_removes_the_groups_mean_similarity(tmp_path, kind):
    cfg, lm, tk, ro, old_logp, adv, val_examples = variant_setup(tmp_path, kind, score="centred")
    g_val = torch.autograd.grad(reference_sft_loss(lm, tk, val_examples), lora_params(lm))
    sim = torch.stack([dot(g, g_val) for g in episode_gradients(lm, cfg, ro, old_logp, ro.mask.double())])
    a = (adv * ro.mask).sum(1) / ro.mask.sum(1)
    groups = ro.group.tolist()
    group_mean = torch.stack([sim[[j for j, h in enumerate(groups) if h == g]].mean() for g in groups])
    close(score(cfg, lm, tk, ro, old_logp, adv, val_examples), a * (sim - group_mean))
    if kind == "grpo":  # episode-constant advantages: a_i sim_i is the raw score (to the model's float32 parts:
        # a factor that is not a power of 2 rounds differently there)
        raw = torch.stack([dot(g, g_val) for g in episode_gradients(lm, cfg, ro, old_logp, adv)])
        torch.testing.assert_close(a * sim, raw, rtol=1e-5, atol=0)


def test_score_deflated_removes_the_top_sketch_directions(tmp_path):
    from ippo.kernels import lora_weights, sketch_gradients

    k = 48
    cfg, lm, tk, ro, old_logp, adv, val_examples = variant_setup(tmp_path, "whitened", score="deflated",
                                                                 deflate_dim=k, deflate_top=2)
    g_val = torch.autograd.grad(reference_sft_loss(lm, tk, val_examples), lora_params(lm))
    names = list(lora_weights(lm))

    def as_layers(flat):  # lora_params order is the model's: A then B of each layer
        return {n: (flat[2 * j], flat[2 * j + 1]) for j, n in enumerate(names)}

    episodes = episode_gradients(lm, cfg, ro, old_logp, adv)
    raw = torch.stack([dot(g, g_val) for g in episodes])
    sketches = torch.stack([sketch_gradients(as_layers(g), k, cfg.sketch_seed) for g in episodes])
    v = sketch_gradients(as_layers(g_val), k, cfg.sketch_seed)
    _, _, vh = torch.linalg.svd(sketches, full_matrices=False)
    expected = raw - (sketches @ vh[:2].T) @ (vh[:2] @ v)
    close(score(cfg, lm, tk, ro, old_logp, adv, val_examples), expected)
    assert not torch.allclose(expected, raw)


@pytest.mark.parametrize("variant", config.SCORES)
def test_each_score_trains_two_iterations(tmp_path, variant):
    """Every --score runs through the trainer (two iterations: adam has optimizer state at the second), with stored
    sketches where it changes them (centred, deflated)."""
    from helpers import cfg_for, records, run, saved_tiny

    saved_tiny(tmp_path)
    cfg = cfg_for(tmp_path, algo="ippo", score=variant, iterations=2, deflate_dim=8,
                  sketch_dim=8 if variant in ("centred", "deflated") else 0)
    run(cfg, tmp_path / "run")
    recs = records(tmp_path / "run")
    assert [r["iteration"] for r in recs] == [0, 1, 2] and all("score_mean" in r for r in recs[1:])


@pytest.mark.parametrize("bad, message", [(dict(score="cosine"), "--score must be one of"),
                                           (dict(deflate_dim=12), "--deflate-dim a positive multiple"),
                                           (dict(deflate_top=0), "--deflate-top must be >= 1")])
def test_bad_score_options(bad, message):
    with pytest.raises(ValueError, match=message):
        config.Config(**bad).validate()
