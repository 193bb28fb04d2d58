"""SFT / PPO / GRPO / I-PPO iterations and the loop that runs them; read top to bottom.

  Config       every option with its help text (config.py)
  rollout      k samples per prompt; reward = reward_fn(completions, examples), by default the task's binary
               correctness; per-token log-probs of the policy, of the reference (adapter disabled) and, for
               ppo/ippo, values (head on detached hidden states)
  advantages   ppo/ippo: reward - kl_coef * KL(policy||ref) per token, GAE, whitening;  grpo: group-normalized
  scoring      [ippo] validation gradient = grad of the SFT loss of val_size (question, gold solution) pairs, summed
               over micro-batches of val_batch; per micro-batch of minibatch episodes, one backward of
               sum_i actor_loss_i inside InfluenceScorer gives every score s_i, in a pass of its own
               (score_episodes) or, without whitening, inside the rollout's old-log-prob forward
               (score_in_rollout); keep s_i > tol, weight survivors by s_i / mean(kept s); --stop-rule paper:
               none kept -> stop; evidence (default): episodes of groups with all rewards equal are dropped, stop
               after --stop-patience iterations in a row whose signal-carrying episodes were all dropped
  probes       --reward-noise flips; AUCs of low scores / advantages for flipped and unfaithful episodes
  update       epochs x minibatches: clipped surrogate (weighted per episode) + clipped value loss (grpo: k3 KL
               to the reference, no critic), grad-norm clipping; approx-KL and clip fraction logged
  sketches     [--sketch-dim] before the update: each episode's actor-loss gradient sketch (ippo: from the scoring
               backward; ppo, grpo: sketch_episodes), keep, weights and a bf16 adapter snapshot, written to
               RUN/sketches/ (attribution.py, which also reads them for `ippo attribute`)
  train()      setup (task, model, SFT warm start), then per iteration: rl_iteration or sft_iteration, eval,
               one metrics.jsonl line and a checkpoint

Elsewhere: policy.py (batches, sampling, log-probs), sft.py (the cached SFT warm start), checkpoint.py (run
files, exact resume), evaluation.py (eval metrics, evaluate_run), ppo_math.py (the math).
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from ippo.train import ppo_math as pm
from ippo.train import stats
from ippo.train.attribution import prune_sketches, write_iteration
from ippo.train.checkpoint import (
    CheckpointFiles,
    check_run_dir,
    load_checkpoint,
    load_trainable_state,
    read_metrics,
    remove_stale_temp_files,
    save_checkpoint,
    trainable_state,
    truncate_metrics,
    write_json,
)
from ippo.train.config import ALGOS, Config, build_task, resolve_device, resolve_model_dir
from ippo.train.evaluation import evaluate, evaluate_run
from ippo.train.model import add_lora, load_causal_lm
from ippo.train.policy import (
    Rollout,
    buffer_logprobs,
    fork_rng,
    length_batches,
    put_rows,
    response_logprobs,
    sample,
    sft_loss,
    trim_rows,
    validation_gradient,
)
from ippo.train.sft import sft_warm_start
from ippo.train.tasks import Example, Task

__all__ = ["ALGOS", "Config", "Learner", "Buffer", "RewardFn", "Rollout", "build_task", "compute_advantages",
           "compute_rewards", "correctness_reward", "evaluate", "evaluate_run", "load_trainable_state", "ppo_update",
           "resolve_device", "response_logprobs", "rl_iteration", "rollout", "sample", "score_episodes",
           "score_in_rollout", "sft_iteration", "sft_loss", "train", "trainable_state", "validation_gradient"]

RewardFn = Callable[[list[str], list[Example]], Sequence[float]]


# =========================================================================== rewards


def correctness_reward(task: Task) -> RewardFn:
    """The default reward: 1.0 for a completion whose final answer ``task.check_answer`` accepts, else 0.0."""

    def reward(completions: list[str], examples: list[Example]) -> list[float]:
        return [float(task.check_answer(c, ex)) for c, ex in zip(completions, examples)]

    return reward


def compute_rewards(reward_fn: RewardFn, completions: list[str],
                    examples: list[Example]) -> tuple[list[float], int, Exception | None]:
    """``reward_fn``'s reward of each episode, how many episodes' rewards raised, and the first exception.

    ``reward_fn`` gets the whole batch; if that call raises, it gets one episode at a time, and an episode
    whose call raises gets reward 0 (a bug in a reward must not end a long run). What it returns must be one
    finite number per completion (else ValueError naming reward_fn).
    """
    try:
        values = reward_fn(completions, examples)
    except Exception as err:
        first = err
    else:
        return _valid_rewards(values, len(completions)), 0, None
    rewards, raised = [], 0
    for i, (completion, example) in enumerate(zip(completions, examples)):
        try:
            values = reward_fn([completion], [example])
        except Exception:
            raised += 1
            values = [0.0]
        rewards += _valid_rewards(values, 1, first_episode=i)
    return rewards, raised, first


def _valid_rewards(values, n: int, first_episode: int = 0) -> list[float]:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise ValueError(f"reward_fn must return a list of {n} floats (one per completion), got "
                         f"{type(values).__name__}")
    if len(values) != n:
        raise ValueError(f"reward_fn returned {len(values)} rewards for {n} completions")
    rewards = []
    for i, value in enumerate(values, first_episode):
        try:
            if isinstance(value, (str, bytes)):
                raise TypeError
            reward = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"reward_fn returned {value!r} for episode {i}: rewards must be numbers") from None
        if not math.isfinite(reward):
            raise ValueError(f"reward_fn returned {reward} for episode {i}: rewards must be finite")
        rewards.append(reward)
    return rewards


# =========================================================================== what an iteration works on


@dataclass
class Learner:
    """What the iterations read and train: the task, the LoRA policy with its value head and optimizer, the
    draws of prompts and validation pairs (``rng``), and the reward."""

    cfg: Config
    task: Task
    tokenizer: Any
    lm: nn.Module
    value_head: nn.Module
    opt: torch.optim.Optimizer
    rng: random.Random
    reward_fn: RewardFn
    log: Callable[[str], Any] = print
    run_dir: Path | None = None  # where --sketch-dim writes each iteration's sketches (None: not written)
    lora_params: list[nn.Parameter] = field(init=False)
    empty_streak: int = field(default=0, init=False)  # --stop-rule evidence: see ppo_math.evidence_stop

    def __post_init__(self):
        self.lora_params = [p for p in self.lm.parameters() if p.requires_grad]

    @property
    def critic(self) -> nn.Module | None:
        """The value head, or None for grpo (no critic: no values computed)."""
        return None if self.cfg.algo == "grpo" else self.value_head

    def evaluate(self, size: int | None = None) -> dict:
        """The eval metrics of the policy now on ``size`` problems (default eval_size; the same eval sampling seed
        every time)."""
        return evaluate(self.lm, self.tokenizer, self.task, self.cfg, seed=self.cfg.seed + 10_000, size=size)

    def save(self, run_dir: Path, iteration: int, extra: dict) -> None:
        save_checkpoint(run_dir, iteration, self.lm, self.value_head, self.opt, self.rng, extra)

    def restore(self, run_dir: Path, files: CheckpointFiles) -> dict:
        return load_checkpoint(run_dir, self.lm, self.value_head, self.opt, self.rng, files=files)


@dataclass
class Buffer:
    """One iteration's episodes and what PPO needs of them; per-token tensors are (E, R), 0 on padding."""

    ro: Rollout
    rewards: Tensor                   # (E,) reward_fn's reward of each episode
    reward_errors: int                # episodes whose reward raised (given reward 0)
    old_logp: Tensor | None           # log-probs of the sampling policy
    ref_logp: Tensor                  # log-probs of the reference policy (adapter disabled)
    old_values: Tensor | None         # values (None for grpo)
    kl: Tensor | None = None          # k1 estimate of KL(policy || reference) per token
    advantages: Tensor | None = None
    returns: Tensor | None = None     # value targets (None for grpo)
    flipped: Tensor | None = None     # (E,) bool: rewards flipped by --reward-noise (None without it)
    train_index: Tensor | None = None  # (E,) int64: the index of each episode's prompt in the train split

    @property
    def mask(self) -> Tensor:
        return self.ro.mask


# =========================================================================== rollout


def rollout(L: Learner, it: int, timing: Counter | None = None, old_logprobs: bool = True) -> Buffer:
    """``prompts_per_iter`` training prompts x ``samples_per_prompt`` samples, their rewards, and the per-token
    log-probs of the sampling and the reference policy, and the values (ppo, ippo). ``timing`` gets the seconds
    of sampling and rewards (``rollout``) and of the log-prob forwards (``logprobs``). ``old_logprobs=False``
    leaves the sampling policy's log-probs and values to :func:`score_in_rollout` (None until then)."""
    timing = Counter() if timing is None else timing
    t0 = time.perf_counter()
    cfg = L.cfg
    train_split = L.task.split("train")
    index = L.rng.sample(range(len(train_split)), min(cfg.prompts_per_iter, len(train_split)))  # = sampling the split
    ro = sample(L.lm, L.tokenizer, L.task, [train_split[i] for i in index], cfg.samples_per_prompt, cfg.temperature,
                cfg.max_new_tokens, cfg.gen_batch)
    pm.check_mask(ro.mask)  # once per iteration: the math below trusts it (mask_checked=True)
    rewards, raised, first = compute_rewards(L.reward_fn, ro.texts, ro.examples)
    if raised:
        L.log(f"iteration {it}: the reward of {raised} of {len(rewards)} episodes raised (first: {first!r}); "
              f"counted as reward 0")
    rewards, flipped = noisy_rewards(cfg, it, torch.tensor(rewards, device=ro.ids.device))
    t1 = time.perf_counter()
    timing["rollout"] += t1 - t0
    old_logp = old_values = None
    with torch.no_grad():
        if old_logprobs:
            old_logp, old_values = buffer_logprobs(L.lm, ro, cfg.minibatch, L.critic, cfg.temperature)
        with L.lm.disable_adapter():  # the reference policy is the model without the adapter
            ref_logp, _ = buffer_logprobs(L.lm, ro, cfg.minibatch, temperature=cfg.temperature)
    timing["logprobs"] += time.perf_counter() - t1
    return Buffer(ro, rewards, raised, old_logp, ref_logp, old_values, flipped=flipped,
                  train_index=torch.tensor(index)[ro.group.cpu()])


def noisy_rewards(cfg: Config, it: int, rewards: Tensor) -> tuple[Tensor, Tensor | None]:
    """``rewards`` with ``--reward-noise``'s flips (ppo_math.flip_rewards), drawn from a seed of ``cfg.seed`` and the
    iteration alone (a resumed run flips the same episodes), and the flipped mask; unchanged and None at p = 0."""
    if not cfg.reward_noise:
        return rewards, None
    try:
        seed = random.Random(f"reward-noise:{cfg.seed}:{it}").getrandbits(63)
        return pm.flip_rewards(rewards, cfg.reward_noise, seed)
    except ValueError as err:
        raise ValueError(f"--reward-noise: {err}") from None


# =========================================================================== advantages


def compute_advantages(cfg: Config, buf: Buffer) -> None:
    """Fill ``buf.kl``, ``buf.advantages`` and (ppo, ippo) ``buf.returns``."""
    mask = buf.mask
    buf.kl = pm.kl_penalty(buf.old_logp, buf.ref_logp, mask, "k1", mask_checked=True)
    if cfg.algo == "grpo":
        buf.advantages = pm.grpo_advantages(buf.rewards, buf.ro.group)[:, None] * mask
        return
    token_rewards = pm.shaped_rewards(buf.rewards, buf.kl, mask, cfg.kl_coef, mask_checked=True)
    buf.advantages, buf.returns = pm.gae(token_rewards, buf.old_values, mask, cfg.gamma, cfg.lam, mask_checked=True)
    if cfg.whiten:
        buf.advantages = pm.masked_whiten(buf.advantages, mask)


# =========================================================================== scoring (ippo)


def score_episodes(lm: nn.Module, tokenizer, task: Task, cfg: Config, ro: Rollout, old_logp: Tensor,
                   advantages: Tensor, val_examples: list[Example], timing: dict,
                   sketches: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """I-PPO influence scores (E,): <d actor_loss_i / d theta, d L_val / d theta> for every episode; with
    ``sketches``, ``(scores, sketches)``: also each episode's (E, ``sketch_dim``) gradient sketch, from the same
    backward (:func:`actor_backwards`).

    The validation gradient is accumulated over micro-batches of ``val_batch`` pairs; then one backward of
    sum_i actor_loss_i inside an InfluenceScorer per micro-batch of ``minibatch`` episodes (the micro-batches of
    ``buffer_logprobs``, so the log-probs equal ``old_logp`` and the ratio is 1: the sampling policy), so the
    memory is that of one PPO minibatch. No LoRA ``.grad`` is written (the update runs its own backward
    passes). ``ro.mask`` must be a valid mask (``sample`` makes one; ``rollout`` checks it).

    A pass of its own, after the rollout's no-grad forward, because whitened advantages need the whole buffer's
    values first; without whitening the trainer scores inside that forward instead (:func:`score_in_rollout`,
    which says why whitening rules it out).
    """
    t0 = time.perf_counter()
    val = validation_gradient(lm, tokenizer, task, val_examples, cfg.val_batch)
    t1 = time.perf_counter()
    scores, sketched = actor_backwards(lm, cfg, ro, old_logp, advantages, val, sketches)
    timing["val_grad"] += t1 - t0
    timing["scoring"] += time.perf_counter() - t1
    return (scores, sketched) if sketches else scores


def actor_backwards(lm: nn.Module, cfg: Config, ro: Rollout, old_logp: Tensor, advantages: Tensor,
                    val: dict | None, sketches: bool) -> tuple[Tensor | None, Tensor | None]:
    """:func:`scored_backwards` of the actor losses at the sampling policy: per micro-batch (``buffer_logprobs``'s,
    so the log-probs equal ``old_logp`` and the ratio is 1), the clipped loss with ``advantages``."""

    def actor_loss(rows: Tensor, sub: Rollout) -> Tensor:
        width = sub.mask.shape[1]
        logp, _ = response_logprobs(lm, sub, temperature=cfg.temperature)
        return pm.policy_loss(logp, old_logp[rows, :width], advantages[rows, :width], sub.mask, cfg.clip,
                              mask_checked=True)[0]

    return scored_backwards(lm, cfg, ro, val, sketches, actor_loss)


def scored_backwards(lm: nn.Module, cfg: Config, ro: Rollout, val: dict | None, sketches: bool,
                     actor_loss: Callable[[Tensor, Rollout], Tensor]) -> tuple[Tensor | None, Tensor | None]:
    """Per micro-batch of ``minibatch`` episodes of similar length (rows, and ``sub``: those rows with their padding
    columns cut), one backward of sum_i ``actor_loss(rows, sub)``_i (a forward and the (rows,) per-episode losses)
    inside an InfluenceScorer; returns the scores (E,) against the validation gradient ``val`` and, with
    ``sketches``, the (E, ``sketch_dim``) sketches (``sketch_seed``) from the same backward. ``val=None``: sketches
    only. The LoRA weight gradients are not computed (``lora_grads=False``: two fewer GEMMs per layer, x~ not
    kept) and their ``.grad`` are left alone."""
    from ippo.kernels import InfluenceScorer

    n, sketch = len(ro.texts), dict(sketch_dim=cfg.sketch_dim, sketch_seed=cfg.sketch_seed) if sketches else {}
    scores = sketched = None
    for rows in length_batches(ro, cfg.minibatch):
        sub = trim_rows(ro, rows)
        with InfluenceScorer(lm, val, episode_segments(sub), len(rows), lora_grads=False, **sketch) as scorer:
            actor_loss(rows, sub).sum().backward()  # the sum of per-episode losses: one backward scores them all
        if val is not None:
            scores = put_rows(scores, rows, scorer.scores.detach()[:, None], (n, 1))
        if sketches:
            sketched = put_rows(sketched, rows, scorer.sketches, (n, cfg.sketch_dim))
    return None if scores is None else scores[:, 0], sketched


def sketch_episodes(lm: nn.Module, cfg: Config, ro: Rollout, old_logp: Tensor, advantages: Tensor) -> Tensor:
    """(E, ``sketch_dim``) sketches of every episode's actor-loss gradient at the sampling policy, for ppo and grpo
    with --sketch-dim (ippo takes them in its scoring backward): :func:`actor_backwards` without validation
    gradient, one more forward+backward per micro-batch, under a forked RNG, so that the run trains as without it."""
    with fork_rng():
        return actor_backwards(lm, cfg, ro, old_logp, advantages, None, sketches=True)[1]


def score_in_rollout(L: Learner, buf: Buffer, val_examples: list[Example], timing: dict,
                     sketches: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """I-PPO scores taken inside the forward that gives the sampling policy's log-probs and values, which it
    fills into ``buf`` (``rollout(old_logprobs=False)``): no forward of its own, unlike :func:`score_episodes`.
    With ``sketches``, ``(scores, sketches)`` as there, from the same backward.

    Per micro-batch (``buffer_logprobs``'s, so ``buf`` gets the same numbers as there, to rounding: the scorer's
    forward computes the LoRA branch with [A; V_A] in one GEMM, which the BLAS may round differently from A
    alone; bit-identical on the tested shapes, not guaranteed): the forward runs with
    grad inside an InfluenceScorer, the log-probs are detached as ``old_logp`` (the ratio is exactly 1, so the
    clipped loss has the plain policy-gradient gradient), the micro-batch's advantages are computed from them, and
    one backward of sum_i actor_loss_i scores its episodes. The advantages must then be known per episode: that
    holds without whitening (GAE is per episode). Whitening uses the mean and spread of the whole buffer, known
    only after every micro-batch's forward; being affine it would need a second score per episode (s_i with weight
    1 per token), i.e. a second backward, which costs more than the forward it saves (a scoring backward is
    1.6-2.3x a forward on CPU, benchmarks/RESULTS.md), and holding every micro-batch's graph instead would cost
    the whole buffer's activations. So the trainer uses this path only with ``--no-whiten``, and
    :func:`score_episodes` otherwise.
    """
    cfg, ro, lm = L.cfg, buf.ro, L.lm
    if cfg.whiten:
        raise ValueError("score_in_rollout needs per-episode advantages (whiten=False); see its docstring")
    t0 = time.perf_counter()
    val = validation_gradient(lm, L.tokenizer, L.task, val_examples, cfg.val_batch)
    t1 = time.perf_counter()
    buf.old_logp = buf.old_values = None

    def actor_loss(rows: Tensor, sub: Rollout) -> Tensor:  # also fills buf.old_logp and buf.old_values
        logp, values = response_logprobs(lm, sub, value_head=L.critic, temperature=cfg.temperature)
        part = Buffer(sub, buf.rewards[rows], 0, logp.detach() * sub.mask, buf.ref_logp[rows, :sub.mask.shape[1]],
                      values.detach() * sub.mask)
        compute_advantages(cfg, part)
        buf.old_logp = put_rows(buf.old_logp, rows, part.old_logp, ro.mask.shape)
        buf.old_values = put_rows(buf.old_values, rows, part.old_values, ro.mask.shape)
        return pm.policy_loss(logp, logp.detach(), part.advantages, sub.mask, cfg.clip, mask_checked=True)[0]

    scores, sketched = scored_backwards(lm, cfg, ro, val, sketches, actor_loss)
    timing["val_grad"] += t1 - t0
    timing["scoring"] += time.perf_counter() - t1
    return (scores, sketched) if sketches else scores


def episode_segments(ro: Rollout) -> Tensor:
    """InfluenceScorer's segment ids of a batch: the row's episode index on its tokens, -1 on padding."""
    from ippo.kernels import segment_ids_from_mask

    return segment_ids_from_mask(ro.attn)


# =========================================================================== update


def ppo_update(L: Learner, buf: Buffer, keep: Tensor, weights: Tensor) -> dict:
    """``epochs`` x minibatches over the kept episodes, each episode's actor loss weighted; returns the mean
    per minibatch of the losses, grad norm, approx-KL and clip fraction (empty if nothing was kept)."""
    cfg = L.cfg
    kept_idx = torch.nonzero(keep).squeeze(1)
    stats, n_mb = Counter(), 0
    for _ in range(cfg.epochs):
        for mb in kept_idx[torch.randperm(len(kept_idx)).to(kept_idx.device)].split(cfg.minibatch):
            m, old_logp = buf.mask[mb], buf.old_logp[mb]
            logp, values = response_logprobs(L.lm, buf.ro, mb, L.critic, cfg.temperature)
            per_episode, _ = pm.policy_loss(logp, old_logp, buf.advantages[mb], m, cfg.clip, mask_checked=True)
            loss = (weights[mb] * per_episode).mean()
            if cfg.algo == "grpo":  # GRPO: k3 KL to the reference in the loss, no critic
                kl = pm.kl_penalty(logp, buf.ref_logp[mb], m, "k3", mask_checked=True)
                loss = loss + cfg.kl_coef * pm.masked_mean(kl, m)
            else:
                _, vf = pm.value_loss(values, buf.old_values[mb], buf.returns[mb], m, cfg.vf_clip, mask_checked=True)
                loss = loss + cfg.vf_coef * vf
                stats["vf_loss"] += vf.item()
            L.opt.zero_grad(set_to_none=True)
            loss.backward()
            stats["grad_norm"] += float(torch.nn.utils.clip_grad_norm_(L.lora_params, cfg.max_grad_norm))
            L.opt.step()
            stats["pg_loss"] += (weights[mb] * per_episode).mean().item()
            stats["approx_kl"] += pm.approx_kl(logp.detach(), old_logp, m, mask_checked=True).item()
            stats["clip_frac"] += pm.clip_fraction(logp.detach(), old_logp, m, cfg.clip, mask_checked=True).item()
            n_mb += 1
    return {k: v / n_mb for k, v in stats.items()} if n_mb else {}


# =========================================================================== one iteration


def rl_iteration(L: Learner, it: int, timing: Counter) -> tuple[dict, bool]:
    """One ppo / grpo / ippo iteration: rollout, advantages, [ippo: scores and filter], update.

    Returns the iteration's metrics record and whether I-PPO stopped (no episode kept, no update).
    """
    cfg = L.cfg
    in_rollout = cfg.algo == "ippo" and not cfg.whiten  # scores from the old-log-prob forward (score_in_rollout)
    store = cfg.sketch_dim > 0 and L.run_dir is not None  # --sketch-dim: this iteration's sketches are written
    buf = rollout(L, it, timing, old_logprobs=not in_rollout)
    if cfg.algo == "ippo":
        val_split = L.task.split("validation")
        val_examples = L.rng.sample(val_split, min(cfg.val_size, len(val_split)))
        if in_rollout:
            scored = score_in_rollout(L, buf, val_examples, timing, sketches=store)
    t0 = time.perf_counter()
    compute_advantages(cfg, buf)
    timing["logprobs"] += time.perf_counter() - t0
    record: dict = {"iteration": it, "algo": cfg.algo}
    n, device = len(buf.ro.texts), buf.rewards.device
    weights = torch.ones(n, device=device)
    keep = torch.ones(n, dtype=torch.bool, device=device)
    stop = False

    if cfg.algo == "ippo":  # ---------------------------------------- ippo: influence filter and reweighting
        if not in_rollout:
            scored = score_episodes(L.lm, L.tokenizer, L.task, cfg, buf.ro, buf.old_logp, buf.advantages,
                                    val_examples, timing, sketches=store)
        scores, sketches = scored if store else (scored, None)
        keep, weights, stop = filter_episodes(L, buf, scores, record)
        finite = scores.isfinite()  # a non-finite score (its loss overflowed) is dropped by the filter
        record.update(score_hist=_histogram(scores[finite]), nonfinite_scores=int((~finite).sum()),
                      score_mean=float(scores[finite].mean()) if finite.any() else None,
                      score_pos_frac=float((scores > 0).float().mean()), early_stop=stop)
        top, bottom = _episodes_log(buf.ro, buf.rewards, scores, cfg.log_episodes)
        if stop:
            L.log(f"iteration {it}: no episode has influence score > tol={cfg.tol} (--stop-rule {cfg.stop_rule}): "
                  f"intrinsic early stop")
    else:
        scores = None
        top, bottom = _episodes_log(buf.ro, buf.rewards, buf.rewards, cfg.log_episodes)
    record.update(probe_metrics(L.task, buf, scores, keep, seed=f"{cfg.seed}:{it}"))
    record.update(reward=float(buf.rewards.mean()), kept_fraction=float(keep.float().mean()),
                  distinct_per_group=distinct_per_group(buf.ro), kl_ref=float(pm.masked_mean(buf.kl, buf.mask)),
                  response_len=float(buf.mask.sum(1).mean()),
                  top_episodes=top, bottom_episodes=bottom, reward_errors=buf.reward_errors)

    if store:  # before the update: the sketches' policy is the adapter written with them
        t0 = time.perf_counter()
        if cfg.algo != "ippo":  # ppo, grpo: one more backward
            sketches = sketch_episodes(L.lm, cfg, buf.ro, buf.old_logp, buf.advantages)
        write_iteration(L.run_dir, it, cfg, buf, sketches, scores, keep, weights, L.lm, L.opt.param_groups[0]["lr"])
        timing["sketch"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    if keep.any():  # nothing kept (always so at a stop): no update
        record.update(ppo_update(L, buf, keep, weights))
    timing["update"] += time.perf_counter() - t0
    return record, stop


def filter_episodes(L: Learner, buf: Buffer, scores: Tensor, record: dict) -> pm.FilterResult:
    """The I-PPO filter under ``--stop-rule``: paper: keep s_i > tol, stop when none is kept; evidence: keep s_i > tol
    among episodes with reward signal (ppo_math.signal_episodes), stop per ppo_math.evidence_stop (streak in
    ``L.empty_streak``). An iteration that keeps nothing does no update. ``record`` gets signal_fraction and
    empty_streak (evidence). ``--keep-by random`` then swaps the kept set for a random one of the same size among
    the same candidates, weight 1 (ppo_math.random_keep; ``record`` gets score_kept_fraction).

    evidence is the default because the paper's rule stops on noise: in an all-equal buffer the reward cancels from
    the whitened advantages (gamma = lam = 1), which are then whitened KL / critic error; at the main job's warm
    start the paper's rule stopped on 5 of 11 all-correct buffers, on 1 of 4 mixed ones without signal and on 0 of 5
    with signal (reports/probes/README.md)."""
    cfg = L.cfg
    if cfg.stop_rule == "paper":
        signal = None  # every episode is a candidate
        keep, weights, stop = pm.ippo_filter(scores, cfg.tol)
    else:
        signal = pm.signal_episodes(buf.rewards, buf.ro.group)
        keep, weights, empty = pm.ippo_filter(scores, cfg.tol, signal)
        L.empty_streak, stop = pm.evidence_stop(L.empty_streak, bool(signal.any()), not empty, cfg.stop_patience)
        record.update(signal_fraction=float(signal.float().mean()), empty_streak=L.empty_streak)
    if cfg.keep_by == "random":  # the control: the same number kept, at random among the same candidates
        record["score_kept_fraction"] = float(keep.float().mean())
        seed = random.Random(f"random-keep:{cfg.seed}:{record['iteration']}").getrandbits(63)
        keep, weights, _ = pm.random_keep(keep, torch.ones_like(keep) if signal is None else signal, seed)
    return pm.FilterResult(keep, weights, stop)


def probe_metrics(task: Task, buf: Buffer, scores: Tensor | None, keep: Tensor, seed: str) -> dict:
    """How well low scores, low mean advantages and random numbers find harmful episodes (ppo_math.low_auc; a
    metric is left out where a class is empty).

    --reward-noise: flipped (count), flip_auc_score / _advantage / _random (the random one from ``seed``: 0.5
    expected), flip_recall (flipped episodes the filter dropped) and flip_recall_random (the expected recall of a
    random filter with the same kept fraction: the dropped fraction). Faithfulness, among episodes whose final
    answer is right (by the task's checker, whatever the reward): unfaithful (count with a wrong step) and
    unfaithful_auc_score / _advantage.
    """
    advantage = pm.masked_mean(buf.advantages, buf.mask, dim=1)
    out: dict = {}
    if buf.flipped is not None:
        noise = torch.rand(len(keep), generator=torch.Generator().manual_seed(
            random.Random(f"probe-random:{seed}").getrandbits(63)))
        out.update(flipped=int(buf.flipped.sum()), flip_auc_advantage=stats.low_auc(advantage, buf.flipped),
                   flip_auc_random=stats.low_auc(noise, buf.flipped))
        if scores is not None and buf.flipped.any():
            out.update(flip_auc_score=stats.low_auc(scores, buf.flipped),
                       flip_recall=float((~keep[buf.flipped]).float().mean()),
                       flip_recall_random=1 - float(keep.float().mean()))
    correct, unfaithful = faithfulness(task, buf.ro.texts, buf.ro.examples)
    correct = torch.tensor(correct, dtype=torch.bool, device=advantage.device)
    unfaithful = torch.tensor(unfaithful, dtype=torch.bool, device=advantage.device)[correct]
    out.update(unfaithful=int(unfaithful.sum()), unfaithful_auc_advantage=stats.low_auc(advantage[correct], unfaithful))
    if scores is not None:
        out["unfaithful_auc_score"] = stats.low_auc(scores[correct], unfaithful)
    return {k: v for k, v in out.items() if v is not None}


def distinct_per_group(ro: Rollout) -> float:
    """Distinct completions per prompt group, mean over the buffer's groups (1 = every group sampled one text)."""
    return len(set(zip(ro.group.tolist(), ro.texts))) / len(ro.group.unique())


def faithfulness(task: Task, texts: list[str], examples: list[Example]) -> tuple[list[bool], list[bool]]:
    """Per episode: the final answer is right (``task.check_answer``), and it has a wrong step (``check_steps``);
    a checker that raises counts as a wrong answer (it is counted where the reward is computed)."""
    correct, wrong_step = [], []
    for text, example in zip(texts, examples):
        try:
            correct.append(bool(task.check_answer(text, example)))
            wrong_step.append(task.check_steps(text)[1] > 0)
        except Exception:
            correct.append(False)
            wrong_step.append(False)
    return correct, wrong_step


def sft_iteration(L: Learner, it: int, timing: Counter) -> dict:
    """One SFT step on ``sft_batch`` gold solutions (the sft algorithm)."""
    cfg = L.cfg
    t0 = time.perf_counter()
    train_split = L.task.split("train")
    loss = sft_loss(L.lm, L.tokenizer, L.task, L.rng.sample(train_split, min(cfg.sft_batch, len(train_split))))
    L.opt.zero_grad(set_to_none=True)
    loss.backward()
    record = {"iteration": it, "algo": cfg.algo,
              "grad_norm": float(torch.nn.utils.clip_grad_norm_(L.lora_params, cfg.max_grad_norm))}
    L.opt.step()
    record["sft_loss"] = loss.item()
    timing["update"] += time.perf_counter() - t0
    return record


def _histogram(x: Tensor, bins: int = 10) -> dict:
    if not x.numel():
        return {"edges": [], "counts": []}
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        hi = lo + 1e-12
    counts = torch.histc(x.double(), bins=bins, min=lo, max=hi)
    return {"edges": [lo + (hi - lo) * i / bins for i in range(bins + 1)], "counts": [int(c) for c in counts]}


def _episodes_log(ro: Rollout, rewards: Tensor, key: Tensor, n: int) -> tuple[list, list]:
    """The ``n`` episodes of highest and of lowest ``key`` (non-finite keys left out), with their texts."""
    order = [i for i in torch.argsort(key, descending=True, stable=True).tolist() if key[i].isfinite()]

    def show(i):
        return {"key": float(key[i]), "reward": float(rewards[i]), "question": ro.examples[i].question,
                "completion": ro.texts[i][:400]}

    return [show(i) for i in order[:n]], [show(i) for i in order[::-1][:n]]


# =========================================================================== the loop


def train(cfg: Config, run_dir: str | Path, resume: bool = False, progress: bool = True, log=print,
          model_and_tokenizer=None, reward_fn: RewardFn | None = None) -> dict:
    """Run ``cfg`` into ``run_dir`` (config.json, metrics.jsonl, checkpoints); returns the final eval metrics.

    ``resume=True`` continues from the newest checkpoint of ``run_dir``: LoRA, value head, optimizer and
    RNG states are restored, so the continuation equals an uninterrupted run. ``model_and_tokenizer``
    (tests) skips loading ``cfg.model``. ``reward_fn(completions, examples)`` returns one float per completion
    (default :func:`correctness_reward`: 1.0 when ``task.check_answer`` accepts the answer); episodes whose
    reward raises get 0 and are counted in the record's ``reward_errors``. Evaluation always uses the task's
    checkers.
    """
    from tqdm.auto import tqdm

    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.jsonl"
    checkpoint = check_run_dir(cfg, run_dir, resume)

    learner, base_eval, sft_info = setup_learner(cfg, run_dir, resume, model_and_tokenizer, reward_fn, log, progress)

    def emit(record: dict) -> None:
        with metrics_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    start_iter, wall, wall_total, stopped, last_eval = 0, 0.0, 0.0, False, None
    if resume:
        meta = learner.restore(run_dir, checkpoint)
        start_iter, wall, wall_total = meta["iteration"], meta["wall"], meta["wall_total"]
        stopped = meta.get("stopped", False)
        learner.empty_streak = meta.get("empty_streak", 0)
        truncate_metrics(metrics_path, start_iter, log)
        log(f"resumed {run_dir} at iteration {start_iter}")
    pruned = prune_sketches(run_dir, start_iter)  # of iterations to come (written again) and of interrupted writes
    if pruned:
        log(f"removed {len(pruned)} sketch files of iterations after {start_iter} or of interrupted writes: "
            f"{', '.join(p.name for p in pruned)}")
    write_json(run_dir / "config.json", asdict(cfg))
    if not resume:  # the starting point (after the SFT warm start) is iteration 0
        metrics_path.write_text("")
        t0 = time.perf_counter()
        last_eval = learner.evaluate()
        wall_total += time.perf_counter() - t0
        emit({"iteration": 0, "algo": cfg.algo, "wall": wall, "wall_total": wall_total, "eval": last_eval,
              "eval_base_model": base_eval, "sft": sft_info})
        log(f"iteration 0: eval accuracy {last_eval['accuracy']:.3f}, majority {last_eval['majority']:.3f}, "
            f"unfaithful {last_eval['unfaithful']:.3f}")
        learner.save(run_dir, 0, {"wall": wall, "wall_total": wall_total})

    budget_spent = 0 < cfg.wall_budget <= wall
    todo = range(start_iter + 1, cfg.iterations + 1) if not (stopped or budget_spent) else range(0)
    bar = tqdm(todo, desc=f"{cfg.algo}", disable=not progress, initial=start_iter, total=cfg.iterations)
    for it in bar:
        timing = Counter({"rollout": 0.0, "logprobs": 0.0, "val_grad": 0.0, "scoring": 0.0, "update": 0.0,
                          "eval": 0.0})
        learner.lm.train()
        if cfg.algo == "sft":
            record = sft_iteration(learner, it, timing)
        else:
            record, stopped = rl_iteration(learner, it, timing)
        wall += sum(timing.values())
        budget_spent = 0 < cfg.wall_budget <= wall
        if budget_spent:
            record["stopped_by"] = "wall_budget"
        final = it == cfg.iterations or stopped or budget_spent
        if it % cfg.eval_every == 0 or final:
            t0 = time.perf_counter()
            last_eval = record["eval"] = learner.evaluate(cfg.final_eval_size if final else None)
            timing["eval"] = time.perf_counter() - t0
        wall_total += sum(timing.values())
        record.update(time=dict(timing), wall=wall, wall_total=wall_total)
        emit(record)
        learner.save(run_dir, it, {"wall": wall, "wall_total": wall_total, "stopped": stopped,
                                   "empty_streak": learner.empty_streak})
        bar.set_postfix({k: f"{record[k]:.3f}" for k in ("reward", "kept_fraction", "sft_loss") if k in record})
        if "eval" in record:
            log(f"iteration {it}: eval accuracy {last_eval['accuracy']:.3f}, majority {last_eval['majority']:.3f}, "
                f"pass@{cfg.eval_k} {last_eval['pass_at_k']:.3f}, unfaithful {last_eval['unfaithful']:.3f}, "
                f"train wall {wall:.0f}s")
        if stopped or budget_spent:
            break
    bar.close()
    if last_eval is None:  # resumed a finished run
        entries, _ = read_metrics(metrics_path)
        last_eval = next((r["eval"] for _, r in reversed(entries) if "eval" in r), {})
    return last_eval


def setup_learner(cfg: Config, run_dir: Path, resume: bool, model_and_tokenizer, reward_fn: RewardFn | None,
                  log, progress: bool) -> tuple[Learner, dict | None, dict]:
    """Task, model, LoRA, value head, the SFT warm start, optimizer and prompt RNG of a run; returns them as a
    :class:`Learner`, with the base model's eval (fresh runs with a warm start) and the warm start's info. Also
    used by ``ippo probe`` and benchmarks/e2e_ippo_iteration.py, which run single iterations."""
    # ---- data and model (all failures here happen before any work is done)
    task = build_task(cfg)
    if model_and_tokenizer is None:
        model_dir = resolve_model_dir(cfg)
        base, tokenizer = load_causal_lm(model_dir)
    else:
        (base, tokenizer), model_dir = model_and_tokenizer, Path(cfg.model)
    device = resolve_device(cfg)
    torch.manual_seed(cfg.seed)
    lm = add_lora(base, r=cfg.lora_r, alpha=cfg.lora_alpha).to(device)
    value_head = nn.Linear(base.config.hidden_size, 1, device=device)
    nn.init.zeros_(value_head.weight)
    nn.init.zeros_(value_head.bias)
    run_dir.mkdir(parents=True, exist_ok=True)
    stale = remove_stale_temp_files(run_dir)
    if stale:
        log(f"removed {len(stale)} temporary files of interrupted writes from {run_dir}")
    base_eval = None
    if not resume and cfg.sft_steps and cfg.eval_base:  # the true starting point, before the warm start (LoRA B = 0: the base
        # model); without a warm start it is the iteration-0 eval itself
        t0 = time.perf_counter()
        base_eval = evaluate(lm, tokenizer, task, cfg, seed=cfg.seed + 10_000)
        log(f"base model (before the SFT warm start): eval accuracy {base_eval['accuracy']:.3f}, "
            f"majority {base_eval['majority']:.3f} ({time.perf_counter() - t0:.0f}s)")
    sft_info = sft_warm_start(lm, tokenizer, task, cfg, model_dir, log, progress)
    lora_params = [p for p in lm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": lora_params, "lr": cfg.sft_lr if cfg.algo == "sft" else cfg.lr},
                             {"params": list(value_head.parameters()), "lr": cfg.value_lr}], weight_decay=0.0)
    rng = random.Random(f"prompts:{cfg.seed}")
    torch.manual_seed(cfg.seed)
    learner = Learner(cfg, task, tokenizer, lm, value_head, opt, rng, reward_fn or correctness_reward(task), log,
                      run_dir)
    return learner, base_eval, sft_info
