"""PPO math against straightforward per-episode Python-loop implementations, on random padded batches."""

import math

import pytest
import torch

from ippo.train import ppo_math as pm

B, T = 6, 7


@pytest.fixture
def batch():
    """Random right-padded batch with lengths [7, 1, 0, 4, 7, 2] (full, length-1 and empty episodes)."""
    g = torch.Generator().manual_seed(0)
    lengths = [7, 1, 0, 4, 7, 2]
    mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).float()
    rand = lambda: torch.randn(B, T, generator=g, dtype=torch.float64)  # noqa: E731
    return dict(lengths=lengths, mask=mask, logp=rand() * 0.3 - 1, old_logp=rand() * 0.3 - 1,
                ref_logp=rand() * 0.3 - 1, values=rand(), old_values=rand(), returns=rand(), adv=rand(),
                rewards=rand(), scores=torch.randn(B, generator=g, dtype=torch.float64))


def loop_episode_mean(token_loss, lengths):
    """Token mean per episode (0 if empty) and mean over non-empty episodes, with Python loops."""
    per = [sum(token_loss(b, t) for t in range(n)) / n if n else 0.0 for b, n in enumerate(lengths)]
    nonempty = [p for p, n in zip(per, lengths) if n]
    return torch.tensor(per, dtype=torch.float64), sum(nonempty) / len(nonempty)


def test_masked_mean_and_whiten(batch):
    x, mask = batch["adv"], batch["mask"]
    values = [x[b, t].item() for b, n in enumerate(batch["lengths"]) for t in range(n)]
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / len(values)
    assert pm.masked_mean(x, mask).item() == pytest.approx(mean)
    assert pm.masked_mean(x, mask, dim=1)[2] == 0  # empty row
    white = pm.masked_whiten(x, mask)
    expected = torch.tensor([[(x[b, t].item() - mean) / math.sqrt(var + 1e-8) if t < n else 0.0 for t in range(T)]
                             for b, n in enumerate(batch["lengths"])], dtype=torch.float64)
    torch.testing.assert_close(white, expected)
    torch.testing.assert_close(pm.masked_whiten(x, mask, shift_mean=False), (expected + mean) * mask)
    assert pm.masked_mean(x, torch.zeros_like(mask)).item() == 0
    assert not pm.masked_whiten(x, torch.zeros_like(mask)).any()


def test_masked_mean_gradient_finite_when_empty():
    x = torch.randn(2, 3, requires_grad=True)
    pm.masked_mean(x, torch.zeros(2, 3), dim=1).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_kl_penalty(batch):
    logp, ref, mask = batch["logp"], batch["ref_logp"], batch["mask"]
    k1 = pm.kl_penalty(logp, ref, mask, "k1")
    k3 = pm.kl_penalty(logp, ref, mask, "k3")
    for b, n in enumerate(batch["lengths"]):
        for t in range(T):
            d = (ref[b, t] - logp[b, t]).item()
            assert k1[b, t].item() == pytest.approx(-d if t < n else 0.0)
            assert k3[b, t].item() == pytest.approx(math.exp(d) - d - 1 if t < n else 0.0)
    assert (k3 >= 0).all()
    with pytest.raises(ValueError, match="estimator"):
        pm.kl_penalty(logp, ref, mask, "k2")


def test_shaped_rewards(batch):
    kl, mask, scores = batch["rewards"], batch["mask"], batch["scores"]
    out = pm.shaped_rewards(scores, kl, mask, kl_coef=0.1)
    for b, n in enumerate(batch["lengths"]):
        for t in range(T):
            expected = (-0.1 * kl[b, t].item() + (scores[b].item() if t == n - 1 else 0.0)) if t < n else 0.0
            assert out[b, t].item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="scores"):
        pm.shaped_rewards(scores[:2], kl, mask, 0.1)


def test_gae_matches_loop(batch):
    """Reference: CleanRL-style backward loop over each episode's own length."""
    gamma, lam = 0.97, 0.9
    rewards, values, mask = batch["rewards"], batch["values"], batch["mask"]
    adv, ret = pm.gae(rewards, values, mask, gamma, lam)
    for b, n in enumerate(batch["lengths"]):
        last = 0.0
        expected = [0.0] * T
        for t in reversed(range(n)):
            next_value = values[b, t + 1].item() if t + 1 < n else 0.0
            delta = rewards[b, t].item() + gamma * next_value - values[b, t].item()
            last = delta + gamma * lam * last
            expected[t] = last
        assert adv[b].tolist() == pytest.approx(expected)
        assert ret[b].tolist() == pytest.approx([e + values[b, t].item() if t < n else 0.0
                                                 for t, e in enumerate(expected)])
    one_step, _ = pm.gae(rewards, values, mask, gamma=1.0, lam=0.0)  # lam = 0: one-step TD error
    assert one_step[1, 0].item() == pytest.approx(rewards[1, 0].item() - values[1, 0].item())
    with pytest.raises(ValueError, match="gamma"):
        pm.gae(rewards, values, mask, gamma=1.5, lam=0.9)


def test_policy_loss_matches_loop(batch):
    logp, old, adv, mask, eps = batch["logp"], batch["old_logp"], batch["adv"], batch["mask"], 0.2

    def token_loss(b, t):
        ratio = math.exp(logp[b, t].item() - old[b, t].item())
        a = adv[b, t].item()
        return -min(ratio * a, min(max(ratio, 1 - eps), 1 + eps) * a)

    per, total = pm.policy_loss(logp, old, adv, mask, eps)
    expected_per, expected_total = loop_episode_mean(token_loss, batch["lengths"])
    torch.testing.assert_close(per, expected_per)
    assert total.item() == pytest.approx(expected_total)
    assert per.shape == (B,) and per[2] == 0


def test_policy_loss_per_episode_gradients_are_separable(batch):
    """Episode i's loss depends only on episode i's tokens: what influence scoring relies on."""
    logp = batch["logp"].clone().requires_grad_(True)
    per, _ = pm.policy_loss(logp, batch["old_logp"], batch["adv"], batch["mask"])
    (grad,) = torch.autograd.grad(per[3], logp)
    assert grad[3, :4].abs().sum() > 0 and not grad[3, 4:].any()
    assert not grad[torch.arange(B) != 3].any()


def test_value_loss_matches_loop(batch):
    v, old, ret, mask, eps = batch["values"], batch["old_values"], batch["returns"], batch["mask"], 0.2

    def token_loss(b, t):
        clipped = old[b, t].item() + min(max(v[b, t].item() - old[b, t].item(), -eps), eps)
        return 0.5 * max((v[b, t].item() - ret[b, t].item()) ** 2, (clipped - ret[b, t].item()) ** 2)

    per, total = pm.value_loss(v, old, ret, mask, eps)
    expected_per, expected_total = loop_episode_mean(token_loss, batch["lengths"])
    torch.testing.assert_close(per, expected_per)
    assert total.item() == pytest.approx(expected_total)


def test_approx_kl_and_clip_fraction(batch):
    logp, old, mask = batch["logp"], batch["old_logp"], batch["mask"]
    tokens = [(b, t) for b, n in enumerate(batch["lengths"]) for t in range(n)]
    ratios = [math.exp(logp[b, t].item() - old[b, t].item()) for b, t in tokens]
    assert pm.approx_kl(logp, old, mask).item() == pytest.approx(
        sum(r - 1 - math.log(r) for r in ratios) / len(ratios))
    assert pm.clip_fraction(logp, old, mask, 0.2).item() == pytest.approx(
        sum(abs(r - 1) > 0.2 for r in ratios) / len(ratios))
    assert pm.approx_kl(logp, logp, mask).item() == 0


def test_token_logprobs():
    logits = torch.randn(2, 3, 5)
    tokens = torch.randint(0, 5, (2, 3))
    out = pm.token_logprobs(logits, tokens)
    for b in range(2):
        for t in range(3):
            row = logits[b, t]
            assert out[b, t].item() == pytest.approx((row[tokens[b, t]] - row.exp().sum().log()).item(), abs=1e-5)


def test_grpo_advantages_match_loop():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(9, generator=g)
    group_ids = torch.tensor([5, 5, 5, 2, 2, 9, 7, 7, 7])  # unsorted labels, a group of one
    adv = pm.grpo_advantages(scores, group_ids)
    unscaled = pm.grpo_advantages(scores, group_ids, scale=False)
    for group in group_ids.unique():
        members = [i for i in range(9) if group_ids[i] == group]
        vals = [scores[i].item() for i in members]
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
        for i, v in zip(members, vals):
            assert unscaled[i].item() == pytest.approx(v - mean, abs=1e-6)
            assert adv[i].item() == pytest.approx((v - mean) / (std + 1e-6), abs=1e-5)
    assert adv[5] == 0
    assert pm.grpo_advantages(torch.ones(4), torch.zeros(4, dtype=torch.long)).abs().max() == 0
    with pytest.raises(ValueError, match="group_ids"):
        pm.grpo_advantages(scores, group_ids[:3])


def test_ippo_filter():
    scores = torch.tensor([0.5, -1.0, 0.0, 1.5, 0.05])
    keep, weights, stop = pm.ippo_filter(scores, tol=0.1)
    assert keep.tolist() == [True, False, False, True, False] and not stop
    assert weights.tolist() == pytest.approx([0.5, 0.0, 0.0, 1.5, 0.0])  # scores / mean(0.5, 1.5)
    assert weights[keep].mean().item() == pytest.approx(1.0)
    assert pm.ippo_filter(scores).keep.tolist() == [True, False, False, True, True]  # tol 0 drops score 0
    keep, weights, stop = pm.ippo_filter(torch.tensor([-0.2, 0.0]))
    assert stop and not keep.any() and not weights.any()
    keep, weights, stop = pm.ippo_filter(torch.tensor([1.0, float("nan"), float("inf"), 3.0, -float("inf")]))
    assert keep.tolist() == [True, False, False, True, False] and not stop  # non-finite scores: dropped
    assert weights.tolist() == [0.5, 0.0, 0.0, 1.5, 0.0]
    assert pm.ippo_filter(torch.tensor([float("nan")])).stop
    assert pm.ippo_filter(torch.tensor([1.0, 3.0], dtype=torch.float64)).weights.dtype == torch.float64
    with pytest.raises(ValueError, match="scores"):
        pm.ippo_filter(torch.ones(2, 2))
    with pytest.raises(ValueError, match="tol"):
        pm.ippo_filter(scores, tol=-0.1)


@pytest.mark.parametrize("mask, message", [
    (torch.tensor([[1.0, 0.0, 1.0]]), "right-padded"),
    (torch.tensor([[1.0, 0.5, 0.0]]), "0 and 1"),
    (torch.ones(1, 2), "shape"),
])
def test_bad_masks(mask, message):
    with pytest.raises(ValueError, match=message):
        pm.policy_loss(torch.zeros(1, 3), torch.zeros(1, 3), torch.zeros(1, 3), mask)
