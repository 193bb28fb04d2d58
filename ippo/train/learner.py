"""What an iteration works on: the :class:`Learner` (task, LoRA policy, value head, optimizer, draws, reward) set
up by :func:`setup_learner`, the rewards, the rollout into a :class:`Buffer` and its advantages.

  rollout      k samples per prompt; reward = reward_fn(completions, examples), by default the task's binary
               correctness; per-token log-probs of the policy, of the reference (adapter disabled) and, for
               ppo/ippo, values (head on detached hidden states); --reward-noise flips
  advantages   ppo/ippo: reward - kl_coef * KL(policy||ref) per token, GAE, whitening;  grpo (and ippo with
               --ippo-base grpo): group-normalized, no critic
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from ippo.train import ppo_math as pm
from ippo.train.checkpoint import CheckpointFiles, load_checkpoint, remove_stale_temp_files, save_checkpoint
from ippo.train.config import Config, build_task, resolve_device, resolve_model_dir
from ippo.train.evaluation import evaluate
from ippo.train.model import add_lora, load_causal_lm
from ippo.train.policy import Rollout, buffer_logprobs, sample
from ippo.train.sft import sft_warm_start
from ippo.train.tasks import Example, Task

# =========================================================================== rewards


RewardFn = Callable[[list[str], list[Example]], Sequence[float]]


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


# =========================================================================== the learner


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
        """The value head, or None for grpo and ippo on the grpo base (no critic: no values computed)."""
        return None if self.cfg.group_advantages else self.value_head

    def evaluate(self, size: int | None = None) -> dict:
        """The eval metrics of the policy now on ``size`` problems (default eval_size; the same eval sampling seed
        every time)."""
        return evaluate(self.lm, self.tokenizer, self.task, self.cfg, seed=self.cfg.seed + 10_000, size=size)

    def save(self, run_dir: Path, iteration: int, extra: dict) -> None:
        save_checkpoint(run_dir, iteration, self.lm, self.value_head, self.opt, self.rng, extra)

    def restore(self, run_dir: Path, files: CheckpointFiles) -> dict:
        return load_checkpoint(run_dir, self.lm, self.value_head, self.opt, self.rng, files=files)


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
    if not resume and cfg.sft_steps and cfg.eval_base:  # the true starting point, before the warm start (LoRA B = 0:
        # the base model); without a warm start it is the iteration-0 eval itself
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


# =========================================================================== the buffer: rollout and advantages


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


def compute_advantages(cfg: Config, buf: Buffer) -> None:
    """Fill ``buf.kl``, ``buf.advantages`` and (ppo, ippo) ``buf.returns``."""
    mask = buf.mask
    buf.kl = pm.kl_penalty(buf.old_logp, buf.ref_logp, mask, "k1", mask_checked=True)
    if cfg.group_advantages:
        buf.advantages = pm.grpo_advantages(buf.rewards, buf.ro.group)[:, None] * mask
        return
    token_rewards = pm.shaped_rewards(buf.rewards, buf.kl, mask, cfg.kl_coef, mask_checked=True)
    buf.advantages, buf.returns = pm.gae(token_rewards, buf.old_values, mask, cfg.gamma, cfg.lam, mask_checked=True)
    if cfg.whiten:
        buf.advantages = pm.masked_whiten(buf.advantages, mask)
