"""The I-PPO path in one place: influence scores of a buffer's episodes and the filter that keeps and weights them.

  validation gradient   grad of the SFT loss of val_size (question, gold solution) pairs, summed over micro-batches
                        of val_batch (policy.validation_gradient)
  scores                per micro-batch of minibatch episodes, one backward of sum_i actor_loss_i inside
                        InfluenceScorer gives every s_i = <d actor_loss_i / d theta, V>: in a pass of its own
                        (score_episodes) or, without whitening, inside the rollout's old-log-prob forward
                        (score_in_rollout); the same backward gives the gradient sketches (--sketch-dim)
  variants (--score)    raw: s_i = <g_i, V>, the paper's; answer: V of the final answers' tokens only; adam:
                        <g_i, P V>, P = 1 / (sqrt(v_hat) + eps) of the AdamW state that takes the next step
                        (P = 1 before its first step); centred: a_i (sim_i - mean_{j in i's prompt group} sim_j),
                        sim_i = <gradient of l_i at advantage 1 on every token, V>, a_i = episode i's mean
                        advantage (= raw minus what the group shares, exactly so for episode-constant advantages;
                        with token-level GAE advantages a_i sim_i approximates raw); deflated: s_i - sum_{c <=
                        deflate_top} <S_i, u_c> <u_c, sketch(V)>, u_c the top right singular vectors of the buffer's
                        (E, k) sketch matrix S (the same backward): raw minus its part along the directions the
                        buffer's episode gradients share
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

from ippo.kernels.scorer import LoRAGrad
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
                   sketches: bool = False, opt: torch.optim.Optimizer | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """I-PPO influence scores (E,) of ``cfg.score`` (module docstring; raw: <d actor_loss_i / d theta, d L_val /
    d theta>) for every episode; with ``sketches``, ``(scores, sketches)``: also each episode's (E, ``sketch_dim``)
    actor-loss gradient sketch, from the same backward (:func:`actor_backwards`). ``opt``: the optimizer that takes
    the next step (--score adam).

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
    val = validation_direction(lm, tokenizer, task, cfg, val_examples, opt)
    t1 = time.perf_counter()
    unit = cfg.score == "centred"  # the pass takes sim_i: advantage 1 on every response token
    k = sketch_width(cfg, sketches)
    scores, sketched = actor_backwards(lm, cfg, ro, old_logp, ro.mask.to(advantages.dtype) if unit else advantages,
                                       val, k)
    scores, sketched = finish_scores(cfg, ro, pm.masked_mean(advantages, ro.mask, dim=1), scores, sketched, val)
    timing["val_grad"] += t1 - t0
    timing["scoring"] += time.perf_counter() - t1
    return (scores, sketched) if sketches else scores


def validation_direction(lm: nn.Module, tokenizer, task: Task, cfg: Config, val_examples: list[Example],
                         opt: torch.optim.Optimizer | None = None) -> dict[str, LoRAGrad]:
    """The V that ``cfg.score`` scores against: the gradient of the validation pairs' SFT loss (answer: of their
    final answers' tokens only), preconditioned by ``opt``'s second moment for adam (:func:`adam_preconditioned`)."""
    val = validation_gradient(lm, tokenizer, task, val_examples, cfg.val_batch,
                              final_answer_only=cfg.score == "answer")
    if cfg.score == "adam":
        if opt is None:
            raise ValueError("--score adam needs the optimizer that takes the next step")
        val = adam_preconditioned(val, opt, lm)
    return val


def adam_preconditioned(val: dict[str, LoRAGrad], opt: torch.optim.Optimizer, lm: nn.Module) -> dict[str, LoRAGrad]:
    """{layer: (P_A * V_A, P_B * V_B)} with P = 1 / (sqrt(v_hat) + eps), v_hat = exp_avg_sq / (1 - beta2^step) of
    ``opt``'s (Adam / AdamW) state for that LoRA weight: to first order, the next Adam step on episode i changes the
    validation loss by -lr <P V, g_i> (no bias correction of the first moment, no weight decay). A weight without
    state yet (before the optimizer's first step) keeps P = 1: the raw score."""
    from ippo.kernels import lora_weights

    groups = {id(p): group for group in opt.param_groups for p in group["params"]}
    out = {}
    for name, weights in lora_weights(lm).items():
        parts = []
        for weight, v in zip(weights, val[name]):
            state = opt.state.get(weight, {})
            if "exp_avg_sq" in state:
                group = groups[id(weight)]
                v_hat = state["exp_avg_sq"] / (1 - group["betas"][1] ** float(state["step"]))
                v = v / (v_hat.sqrt() + group["eps"])
            parts.append(v)
        out[name] = LoRAGrad(*parts)
    return out


def sketch_width(cfg: Config, stored: bool) -> int:
    """The sketch width of the scoring backward: ``sketch_dim`` when the sketches are stored, else ``deflate_dim``
    for --score deflated, else 0 (no sketches)."""
    return cfg.sketch_dim if stored else cfg.deflate_dim if cfg.score == "deflated" else 0


def finish_scores(cfg: Config, ro: Rollout, mean_advantage: Tensor, scores: Tensor, sketched: Tensor | None,
                  val: dict[str, LoRAGrad]) -> tuple[Tensor, Tensor | None]:
    """The scores of ``cfg.score`` from the scoring pass's (module docstring): centred combines sim_i with the
    episode's mean advantage a_i (and scales the sketches by a_i: those of the actor losses for episode-constant
    advantages); deflated removes the top directions of the sketches, which then stay the actor losses'."""
    if cfg.score == "centred":
        a = mean_advantage.to(scores.dtype)
        scores = a * (scores - group_mean(scores, ro.group))
        sketched = None if sketched is None else sketched * a[:, None].to(sketched.dtype)
    elif cfg.score == "deflated":
        from ippo.kernels import sketch_gradients

        k = sketched.shape[1]
        v = sketch_gradients(val, k, cfg.sketch_seed).to(sketched.dtype)
        scores = deflate(scores, sketched, v, cfg.deflate_top)
    return scores, sketched


def group_mean(values: Tensor, group: Tensor) -> Tensor:
    """(E,) the mean of ``values`` over each episode's group (``group``: (E,) ids), per episode."""
    _, index = torch.unique(group, return_inverse=True)
    total = torch.zeros(int(index.max()) + 1, dtype=values.dtype, device=values.device).index_add_(0, index, values)
    count = torch.bincount(index).to(values.dtype)
    return (total / count)[index]


def deflate(scores: Tensor, sketches: Tensor, val_sketch: Tensor, top: int) -> Tensor:
    """``scores`` (E,) minus their part along the ``top`` leading right singular vectors u_c of the (E, k)
    ``sketches``: s_i - sum_c <sketches_i, u_c> <u_c, val_sketch> (float64)."""
    s = sketches.double()
    _, _, vh = torch.linalg.svd(s, full_matrices=False)
    u = vh[:top]  # (top, k)
    return (scores.double() - (s @ u.T) @ (u @ val_sketch.double())).to(scores.dtype)


def actor_backwards(lm: nn.Module, cfg: Config, ro: Rollout, old_logp: Tensor, advantages: Tensor,
                    val: dict | None, sketch_dim: int) -> tuple[Tensor | None, Tensor | None]:
    """:func:`scored_backwards` of the actor losses at the sampling policy: per micro-batch (``buffer_logprobs``'s,
    so the log-probs equal ``old_logp`` and the ratio is 1), the clipped loss with ``advantages``."""

    def actor_loss(rows: Tensor, sub: Rollout) -> Tensor:
        width = sub.mask.shape[1]
        logp, _ = response_logprobs(lm, sub, temperature=cfg.temperature)
        return pm.policy_loss(logp, old_logp[rows, :width], advantages[rows, :width], sub.mask, cfg.clip,
                              mask_checked=True)[0]

    return scored_backwards(lm, cfg, ro, val, sketch_dim, actor_loss)


def scored_backwards(lm: nn.Module, cfg: Config, ro: Rollout, val: dict | None, sketch_dim: int,
                     actor_loss: Callable[[Tensor, Rollout], Tensor]) -> tuple[Tensor | None, Tensor | None]:
    """Per micro-batch of ``minibatch`` episodes of similar length (rows, and ``sub``: those rows with their padding
    columns cut), one backward of sum_i ``actor_loss(rows, sub)``_i (a forward and the (rows,) per-episode losses)
    inside an InfluenceScorer; returns the scores (E,) against the validation gradient ``val`` and, with
    ``sketch_dim`` > 0, the (E, ``sketch_dim``) sketches (``sketch_seed``) from the same backward (else None).
    ``val=None``: sketches only. The LoRA weight gradients are not computed (``lora_grads=False``: two fewer GEMMs
    per layer, x~ not kept) and their ``.grad`` are left alone."""
    from ippo.kernels import InfluenceScorer

    n, sketch = len(ro.texts), dict(sketch_dim=sketch_dim, sketch_seed=cfg.sketch_seed) if sketch_dim else {}
    scores = sketched = None
    for rows in length_batches(ro, cfg.minibatch):
        sub = trim_rows(ro, rows)
        with InfluenceScorer(lm, val, episode_segments(sub), len(rows), lora_grads=False, **sketch) as scorer:
            actor_loss(rows, sub).sum().backward()  # the sum of per-episode losses: one backward scores them all
        if val is not None:
            scores = put_rows(scores, rows, scorer.scores.detach()[:, None], (n, 1))
        if sketch_dim:
            sketched = put_rows(sketched, rows, scorer.sketches, (n, sketch_dim))
    return None if scores is None else scores[:, 0], sketched


def sketch_episodes(lm: nn.Module, cfg: Config, ro: Rollout, old_logp: Tensor, advantages: Tensor) -> Tensor:
    """(E, ``sketch_dim``) sketches of every episode's actor-loss gradient at the sampling policy, for ppo and grpo
    with --sketch-dim (ippo takes them in its scoring backward): :func:`actor_backwards` without validation
    gradient, one more forward+backward per micro-batch, under a forked RNG, so that the run trains as without it."""
    with fork_rng():
        return actor_backwards(lm, cfg, ro, old_logp, advantages, None, cfg.sketch_dim)[1]


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
    the whole buffer's activations. So the trainer uses this path only with ``--no-whiten`` on the ppo base (grpo's
    advantages, too, need every episode of a prompt group, which a micro-batch need not hold), and
    :func:`score_episodes` otherwise.
    """
    cfg, ro, lm = L.cfg, buf.ro, L.lm
    if cfg.whiten:
        raise ValueError("score_in_rollout needs per-episode advantages (whiten=False); see its docstring")
    t0 = time.perf_counter()
    val = validation_direction(lm, L.tokenizer, L.task, cfg, val_examples, L.opt)
    t1 = time.perf_counter()
    buf.old_logp = buf.old_values = None
    mean_advantage = torch.zeros(len(ro.texts), dtype=torch.float64, device=ro.ids.device)

    def actor_loss(rows: Tensor, sub: Rollout) -> Tensor:  # also fills buf.old_logp and buf.old_values
        logp, values = response_logprobs(lm, sub, value_head=L.critic, temperature=cfg.temperature)
        part = Buffer(sub, buf.rewards[rows], 0, logp.detach() * sub.mask, buf.ref_logp[rows, :sub.mask.shape[1]],
                      values.detach() * sub.mask)
        compute_advantages(cfg, part)
        buf.old_logp = put_rows(buf.old_logp, rows, part.old_logp, ro.mask.shape)
        buf.old_values = put_rows(buf.old_values, rows, part.old_values, ro.mask.shape)
        mean_advantage[rows] = pm.masked_mean(part.advantages, sub.mask, dim=1).double()
        advantages = part.advantages  # centred: sim_i, at advantage 1
        advantages = sub.mask.to(advantages.dtype) if cfg.score == "centred" else advantages
        return pm.policy_loss(logp, logp.detach(), advantages, sub.mask, cfg.clip, mask_checked=True)[0]

    scores, sketched = scored_backwards(lm, cfg, ro, val, sketch_width(cfg, sketches), actor_loss)
    scores, sketched = finish_scores(cfg, ro, mean_advantage, scores, sketched, val)
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
