"""The I-PPO path in one place: influence scores of a buffer's episodes and the filter that keeps and weights them.

  validation gradient   grad of the SFT loss of val_size (question, gold solution) pairs, summed over micro-batches
                        of val_batch (policy.validation_gradient)
  scores                per micro-batch of minibatch episodes, one backward of sum_i actor_loss_i inside
                        InfluenceScorer gives every s_i = <d actor_loss_i / d theta, V>: in a pass of its own
                        (score_episodes) or, without whitening, inside the rollout's old-log-prob forward
                        (score_in_rollout); the same backward gives the gradient sketches (--sketch-dim)
  filter                keep s_i > tol, weight survivors by s_i / mean(kept s) (ppo_math.ippo_filter); --stop-rule
                        paper: none kept -> stop; evidence (default): episodes of groups with all rewards equal are
                        dropped, stop after --stop-patience iterations in a row whose signal-carrying episodes were
                        all dropped; --keep-by random: the control
"""

from __future__ import annotations

import random
import time
from typing import Callable

import torch
from torch import Tensor, nn

from ippo.train import ppo_math as pm
from ippo.train.config import Config
from ippo.train.learner import Buffer, Learner, compute_advantages
from ippo.train.policy import (
    Rollout,
    fork_rng,
    length_batches,
    put_rows,
    response_logprobs,
    trim_rows,
    validation_gradient,
)
from ippo.train.tasks import Example, Task

# =========================================================================== scores


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


# =========================================================================== the filter


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
