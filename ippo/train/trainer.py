"""SFT / PPO / GRPO / I-PPO iterations and the loop that runs them; read top to bottom.

  Config       every option with its help text (config.py)
  setup        task, model, LoRA, value head, the cached SFT warm start, optimizer (learner.setup_learner)
  rollout      k samples per prompt, rewards, log-probs, values, advantages (learner.rollout, compute_advantages)
  scoring      [ippo] influence scores and the filter that keeps and weights episodes (scoring.py: the whole
               I-PPO path)
  probes       --reward-noise flips; AUCs of low scores / advantages for flipped and unfaithful episodes
               (probe.probe_metrics)
  update       epochs x minibatches: clipped surrogate (weighted per episode) + clipped value loss (grpo and
               --ippo-base grpo: k3 KL to the reference, no critic), grad-norm clipping; approx-KL and clip
               fraction logged
  sketches     [--sketch-dim] before the update: each episode's actor-loss gradient sketch (ippo: from the scoring
               backward; ppo, grpo: scoring.sketch_episodes), keep, weights and a bf16 adapter snapshot, written to
               RUN/sketches/ (attribution.py, which also reads them for `ippo attribute`)
  train()      setup, then per iteration: rl_iteration or sft_iteration, eval, one metrics.jsonl line and a
               checkpoint

Elsewhere: policy.py (batches, sampling, log-probs), sft.py (the cached SFT warm start), checkpoint.py (run
files, exact resume), evaluation.py (eval metrics, evaluate_run), ppo_math.py (the math), stats.py (AUC,
Spearman, intervals).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor

from ippo.train import ppo_math as pm
from ippo.train import probe, scoring
from ippo.train.attribution import prune_sketches, write_iteration
from ippo.train.checkpoint import check_run_dir, read_metrics, truncate_metrics, write_json
from ippo.train.config import ALGOS, Config
from ippo.train.learner import Buffer, Learner, RewardFn, compute_advantages, rollout, setup_learner
from ippo.train.policy import Rollout, response_logprobs, sft_loss

__all__ = ["ALGOS", "ppo_update", "rl_iteration", "sft_iteration", "train"]


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
            if cfg.group_advantages:  # grpo (and ippo on it): k3 KL to the reference in the loss, no critic
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
    # scores from the old-log-prob forward (score_in_rollout): per-episode advantages known per micro-batch
    in_rollout = cfg.algo == "ippo" and not cfg.whiten and not cfg.group_advantages
    store = cfg.sketch_dim > 0 and L.run_dir is not None  # --sketch-dim: this iteration's sketches are written
    buf = rollout(L, it, timing, old_logprobs=not in_rollout)
    if cfg.algo == "ippo":
        val_split = L.task.split("validation")
        val_examples = L.rng.sample(val_split, min(cfg.val_size, len(val_split)))
        if in_rollout:
            scored = scoring.score_in_rollout(L, buf, val_examples, timing, sketches=store)
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
            scored = scoring.score_episodes(L.lm, L.tokenizer, L.task, cfg, buf.ro, buf.old_logp, buf.advantages,
                                            val_examples, timing, sketches=store, opt=L.opt)
        scores, sketches = scored if store else (scored, None)
        keep, weights, stop = scoring.filter_episodes(L, buf, scores, record)
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
    record.update(probe.probe_metrics(L.task, buf, scores, keep, seed=f"{cfg.seed}:{it}"))
    record.update(reward=float(buf.rewards.mean()), kept_fraction=float(keep.float().mean()),
                  distinct_per_group=probe.distinct_per_group(buf.ro), kl_ref=float(pm.masked_mean(buf.kl, buf.mask)),
                  response_len=float(buf.mask.sum(1).mean()),
                  top_episodes=top, bottom_episodes=bottom, reward_errors=buf.reward_errors)

    if store:  # before the update: the sketches' policy is the adapter written with them
        t0 = time.perf_counter()
        if cfg.algo != "ippo":  # ppo, grpo: one more backward
            sketches = scoring.sketch_episodes(L.lm, cfg, buf.ro, buf.old_logp, buf.advantages)
        write_iteration(L.run_dir, it, cfg, buf, sketches, scores, keep, weights, L.lm, L.opt.param_groups[0]["lr"])
        timing["sketch"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    if keep.any():  # nothing kept (always so at a stop): no update
        record.update(ppo_update(L, buf, keep, weights))
    timing["update"] += time.perf_counter() - t0
    return record, stop










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


