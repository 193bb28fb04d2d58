"""PPO / GRPO / I-PPO math on padded batches.

Conventions: B episodes, T tokens. Token tensors are (B, T); ``mask`` is a (B, T) float tensor,
1 on an episode's (response) tokens and 0 on padding, right-padded (each row is 1...1 0...0;
a row may be all zeros). Per-episode losses are the token mean inside each episode; a batch
loss is the mean of the per-episode losses over non-empty episodes, so one episode's loss
``l_i`` is a well defined term of the batch loss (as influence scoring needs).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor


def check_mask(mask: Tensor, like: Tensor | None = None, name: str = "mask") -> None:
    """Raise ValueError unless ``mask`` is a 0/1 right-padded (B, T) mask (shaped like ``like`` if given).

    Reading the values costs two host syncs on a GPU. The functions below check their mask this way unless
    ``mask_checked=True`` says the caller already did (a trainer checks a rollout's mask once, then passes
    it and row subsets of it); shapes are always checked.
    """
    _check_mask(mask, mask if like is None else like, name)


def _check_mask(mask: Tensor, like: Tensor, name: str = "mask", mask_checked: bool = False) -> None:
    if mask.shape != like.shape or mask.dim() != 2:
        raise ValueError(f"{name} must be (B, T) and match its tensor's shape {tuple(like.shape)}, "
                         f"got {tuple(mask.shape)}")
    if mask_checked:
        return
    if ((mask != 0) & (mask != 1)).any():
        raise ValueError(f"{name} must hold only 0 and 1")
    if (mask[:, 1:] > mask[:, :-1]).any():
        raise ValueError(f"{name} must be right-padded (each row 1...1 0...0)")


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """``num / den``, 0 where ``den == 0`` (no NaN in values or gradients)."""
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """``sum(x * mask) / sum(mask)`` over ``dim`` (all elements if None); 0 where the mask is empty."""
    if dim is None:
        return _safe_div((x * mask).sum(), mask.sum())
    return _safe_div((x * mask).sum(dim), mask.sum(dim))


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """``(x - mean) / sqrt(var + eps)`` with mean and (biased) variance over the masked entries.

    With ``shift_mean=False`` the mean is added back (only the scale changes). Padding is 0.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    return (whitened if shift_mean else whitened + mean) * mask


def token_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """``log p(tokens[b, t] | logits[b, t])``: (B, T, V) logits and (B, T) ids -> (B, T) float32 (float64 for
    float64 logits: the trainer's float64 tests hold to float64 rounding).

    Align before calling: for a causal LM, logits[:, :-1] predict tokens[:, 1:].
    """
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def kl_penalty(logp: Tensor, ref_logp: Tensor, mask: Tensor, estimator: str = "k1", *,
               mask_checked: bool = False) -> Tensor:
    """Per-token estimate of KL(policy || reference) from sampled-token log-probs, (B, T), 0 on padding.

    k1 = logp - ref_logp (unbiased, can be negative per token; the classic RLHF reward penalty).
    k3 = exp(ref_logp - logp) - (ref_logp - logp) - 1 (unbiased, always >= 0, lower variance;
    the GRPO loss term).
    """
    _check_mask(mask, logp, mask_checked=mask_checked)
    log_ratio = logp - ref_logp
    if estimator == "k1":
        kl = log_ratio
    elif estimator == "k3":
        kl = torch.expm1(-log_ratio) + log_ratio
    else:
        raise ValueError(f"estimator must be 'k1' or 'k3', got {estimator!r}")
    return kl * mask


def shaped_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float, *, mask_checked: bool = False) -> Tensor:
    """Per-token rewards (B, T): ``-kl_coef * kl`` on every token, plus ``scores[b]`` (B,) on the
    last token of episode b. Empty episodes get 0 everywhere."""
    _check_mask(mask, kl, mask_checked=mask_checked)
    if scores.shape != kl.shape[:1]:
        raise ValueError(f"scores must be (B,) = {tuple(kl.shape[:1])}, got {tuple(scores.shape)}")
    rewards = -kl_coef * kl * mask
    lengths = mask.sum(1).long()
    rows = torch.nonzero(lengths > 0).squeeze(1)
    return rewards.index_put((rows, lengths[rows] - 1), scores[rows].to(rewards.dtype), accumulate=True)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float, *,
        mask_checked: bool = False) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation over right-padded episodes; returns (advantages, returns), (B, T).

    delta_t = r_t + gamma * V_{t+1} - V_t,  A_t = delta_t + gamma * lam * A_{t+1},  R_t = A_t + V_t,
    with V and A zero after an episode's last token (episodes terminate). Padding is 0 in both.
    """
    _check_mask(mask, rewards, mask_checked=mask_checked)
    _check_mask(mask, values, "mask (vs values)", mask_checked=True)  # the same mask: its values checked above
    if not (0 <= gamma <= 1 and 0 <= lam <= 1):
        raise ValueError(f"gamma and lam must be in [0, 1], got gamma={gamma}, lam={lam}")
    values = values * mask
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(next_advantage)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
    return advantages, (advantages + values) * mask


def _group_index(values: Tensor, group_ids: Tensor, name: str) -> tuple[Tensor, int]:
    """(E,) group index 0..G-1 of each episode and G, for (E,) ``values`` (called ``name`` in the error) and
    ``group_ids`` of the same shape."""
    if values.dim() != 1 or group_ids.shape != values.shape:
        raise ValueError(f"{name} and group_ids must both be (E,), got {tuple(values.shape)} and "
                         f"{tuple(group_ids.shape)}")
    _, groups = torch.unique(group_ids, return_inverse=True)
    return groups, int(groups.max()) + 1 if groups.numel() else 0


def grpo_advantages(scores: Tensor, group_ids: Tensor, scale: bool = True, eps: float = 1e-6) -> Tensor:
    """Group-normalized advantages (E,): ``(s_i - mean_g) / (std_g + eps)`` within each prompt group g.

    ``group_ids`` (E,) long labels the prompt of each episode. std is the unbiased standard
    deviation; a group of one episode gets advantage 0. ``scale=False`` skips the division
    (Dr. GRPO). Broadcast to tokens with ``advantages[:, None] * mask``.
    """
    groups, n_groups = _group_index(scores, group_ids, "scores")
    scores = scores.float()
    count = scores.new_zeros(n_groups).index_add_(0, groups, torch.ones_like(scores))
    mean = scores.new_zeros(n_groups).index_add_(0, groups, scores) / count
    centered = scores - mean[groups]
    if not scale:
        return centered
    sq = scores.new_zeros(n_groups).index_add_(0, groups, centered**2)
    std = torch.sqrt(_safe_div(sq, count - 1))
    return centered / (std[groups] + eps)


def _episode_losses(token_losses: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Token mean per episode (B,) and their mean over non-empty episodes (scalar)."""
    per_episode = masked_mean(token_losses, mask, dim=1)
    nonempty = (mask.sum(1) > 0).to(per_episode.dtype)
    return per_episode, masked_mean(per_episode, nonempty)


def policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                clip_eps: float = 0.2, *, mask_checked: bool = False) -> tuple[Tensor, Tensor]:
    """PPO clipped-surrogate loss; returns (per-episode losses (B,), batch loss).

    Per token, with ratio = exp(logp - old_logp):
    ``-min(ratio * A, clip(ratio, 1 - clip_eps, 1 + clip_eps) * A)``. ``advantages`` is (B, T).
    """
    _check_mask(mask, logp, mask_checked=mask_checked)
    if clip_eps <= 0:
        raise ValueError(f"clip_eps must be > 0, got {clip_eps}")
    ratio = torch.exp(logp - old_logp)
    surrogate = torch.minimum(ratio * advantages, ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages)
    return _episode_losses(-surrogate, mask)


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
               clip_eps: float = 0.2, *, mask_checked: bool = False) -> tuple[Tensor, Tensor]:
    """Clipped value loss; returns (per-episode losses (B,), batch loss).

    Per token: ``0.5 * max((V - R)^2, (old_V + clip(V - old_V, -clip_eps, clip_eps) - R)^2)``.
    """
    _check_mask(mask, values, mask_checked=mask_checked)
    if clip_eps <= 0:
        raise ValueError(f"clip_eps must be > 0, got {clip_eps}")
    clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    token_losses = 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    return _episode_losses(token_losses, mask)


def approx_kl(logp: Tensor, old_logp: Tensor, mask: Tensor, *, mask_checked: bool = False) -> Tensor:
    """Masked mean of k3 = (ratio - 1) - log(ratio), ratio = exp(logp - old_logp): KL(old || new)."""
    _check_mask(mask, logp, mask_checked=mask_checked)
    log_ratio = logp - old_logp
    return masked_mean(torch.expm1(log_ratio) - log_ratio, mask)


def clip_fraction(logp: Tensor, old_logp: Tensor, mask: Tensor, clip_eps: float = 0.2, *,
                  mask_checked: bool = False) -> Tensor:
    """Fraction of masked tokens whose ratio exp(logp - old_logp) is outside [1 - clip_eps, 1 + clip_eps]."""
    _check_mask(mask, logp, mask_checked=mask_checked)
    ratio = torch.exp(logp - old_logp)
    return masked_mean(((ratio - 1).abs() > clip_eps).float(), mask)


class FilterResult(NamedTuple):
    """I-PPO filter output: ``keep`` (E,) bool, ``weights`` (E,) float32, ``stop`` bool."""

    keep: Tensor
    weights: Tensor
    stop: bool


def ippo_filter(scores: Tensor, tol: float = 0.0, signal: Tensor | None = None) -> FilterResult:
    """Keep the episodes whose influence score helps validation by more than ``tol``.

    ``keep_i = scores_i > tol`` (and ``signal_i`` when given: episodes without reward signal, see
    :func:`signal_episodes`, are dropped whatever their score); ``weights_i = scores_i / mean(scores[keep])``
    for kept episodes (they average 1) and 0 for dropped ones; ``stop`` is True when no episode survives (the
    paper's stop rule). ``tol`` must be >= 0 so kept scores, and weights, are positive. An episode whose score is
    not finite (its loss overflowed or was NaN) is dropped: one bad episode never spoils the others' weights.
    Weights are float32, float64 for float64 scores.
    """
    if scores.dim() != 1:
        raise ValueError(f"scores must be (E,), got {tuple(scores.shape)}")
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    if signal is not None and signal.shape != scores.shape:
        raise ValueError(f"signal must be shaped like scores {tuple(scores.shape)}, got {tuple(signal.shape)}")
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
    keep = (scores > tol) & scores.isfinite()
    if signal is not None:
        keep &= signal.bool()
    if not keep.any():
        return FilterResult(keep, torch.zeros_like(scores), True)
    return FilterResult(keep, torch.where(keep, scores / scores[keep].mean(), 0.0), False)


def random_keep(keep: Tensor, candidates: Tensor, seed: int) -> FilterResult:
    """The random control of a filter decision ``keep`` (E,) bool: as many episodes, drawn uniformly without
    replacement (torch generator seeded with ``seed``) among ``candidates`` (E,) bool (which must hold every kept
    one), each with weight 1; ``stop`` is False (the stop is the filter's decision, not the control's)."""
    if keep.shape != candidates.shape or keep.dim() != 1:
        raise ValueError(f"keep and candidates must be (E,) alike, got {tuple(keep.shape)} and "
                         f"{tuple(candidates.shape)}")
    if (keep & ~candidates).any():
        raise ValueError("keep must lie within candidates")
    pool = torch.nonzero(candidates).squeeze(1)
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed)).to(pool.device)
    chosen = torch.zeros_like(keep)
    chosen[pool[order[:int(keep.sum())]]] = True
    return FilterResult(chosen, chosen.float(), False)


def signal_episodes(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """(E,) bool: the episode's prompt group holds two different rewards.

    A group whose rewards are all equal carries no reward signal: every group-relative advantage of it is 0
    (GRPO's exactly), and what whitened GAE advantages give it is critic error and KL shaping, not reward.
    """
    groups, n_groups = _group_index(rewards, group_ids, "rewards")
    rewards = rewards.double()
    high = rewards.new_full((n_groups,), -math.inf).scatter_reduce(0, groups, rewards, "amax")
    low = rewards.new_full((n_groups,), math.inf).scatter_reduce(0, groups, rewards, "amin")
    return (high > low)[groups]


def evidence_stop(streak: int, has_signal: bool, kept_any: bool, patience: int) -> tuple[int, bool]:
    """The evidence stop rule: (new streak, stop).

    ``streak`` counts consecutive iterations in which episodes carried reward signal and the filter kept none
    of them. An iteration with signal and a kept episode resets it to 0; one without signal leaves it unchanged
    (it is no evidence either way). Stop when it reaches ``patience``.
    """
    if patience < 1:
        raise ValueError(f"patience must be >= 1, got {patience}")
    if has_signal:
        streak = 0 if kept_any else streak + 1
    return streak, streak >= patience


def flip_rewards(rewards: Tensor, p: float, seed: int) -> tuple[Tensor, Tensor]:
    """Binary rewards with ``round(p * E)`` of them flipped (r -> 1 - r); returns (rewards, flipped (E,) bool).

    The flipped episodes are a uniform draw of a torch generator seeded with ``seed``. Rewards must be 0 or 1
    (a flip of any other reward is undefined: ValueError).
    """
    if not 0 <= p < 1:
        raise ValueError(f"p must be in [0, 1), got {p}")
    if ((rewards != 0) & (rewards != 1)).any():
        raise ValueError(f"reward noise flips binary rewards; got non-binary rewards {rewards.unique().tolist()}")
    n = round(p * rewards.numel())
    order = torch.randperm(rewards.numel(), generator=torch.Generator().manual_seed(seed))
    flipped = torch.zeros(rewards.numel(), dtype=torch.bool)
    flipped[order[:n]] = True
    flipped = flipped.to(rewards.device)
    return torch.where(flipped, 1 - rewards, rewards), flipped

