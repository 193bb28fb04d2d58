"""``ippo probe``: what the I-PPO scores find, at the SFT warm start (cached), over many rollout draws, no training.

Each draw is one iteration's buffer (``prompts_per_iter`` x ``samples_per_prompt`` episodes, ``--reward-noise``
flips, the run's advantages) scored with the trainer's own scoring pass (``score_episodes``) against a validation
draw of ``val_size`` pairs. Per draw (``probe.json``):

- the stop: distinct_per_group (distinct completions per prompt group, mean), all_equal (every reward of the buffer
  equal), paper_stop (no score > tol: the paper's rule stops),
  signal_fraction and evidence_empty (no score > tol among episodes with reward signal);
- ``probe_metrics`` under ``--stop-rule``: flip_auc_score / _advantage / _random, flip_recall(_random),
  unfaithful_auc_score / _advantage (ppo_math.low_auc: 0.5 = chance, 1 = low scores find every one);
- stability: spearman_disjoint (the scores against a second validation draw of the same size, disjoint from the
  first), spearman_big (against a draw of ``--big-val-size`` pairs) and their flip AUCs; the score of the
  summed-token loss (s_i * n_i, not normalized by the episode's length n_i: the trainer's per-episode loss is the
  token mean) with its flip AUC and spearman_length (against the trainer's score); with ``--sketch-dim K``, the
  cosine score s_i / |sketch_i| (|sketch_i| estimates the norm of the episode's gradient) with flip_auc_cosine and
  spearman_cosine; sign_agreement (score and mean advantage of the same sign). Any positive per-episode factor
  (length, norm) keeps each score's sign: at ``--tol 0`` it changes the weights and the ranking, not which episodes
  are kept or the stop. spearman_advantage: the scores against the episodes' mean advantage. top_direction_share
  (with ``--sketch-dim``): sigma_1^2 / sum sigma_k^2 of the (E, K) sketch matrix, the share of the episode
  gradients' energy along one direction. ``per_episode``: each episode's score(s), mean advantage, reward, length
  and flip.

``probe.png`` shows the distribution of each AUC and Spearman over the draws. A metric that is undefined in a draw
(an AUC with an empty class, a Spearman of constant scores, the top direction of all-zero sketches) is left out of
that draw and of the summary; probe.json is strict JSON (no NaN: a non-finite per-episode value is null).
"""

from __future__ import annotations

import json
import math
import random
import statistics
import time
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import Tensor

from ippo.train import ppo_math as pm
from ippo.train import scoring, stats
from ippo.train.checkpoint import atomic_write, changed_options, check_paths, read_json
from ippo.train.config import SCORES, Config
from ippo.train.learner import Buffer, Learner, RewardFn, compute_advantages, rollout, setup_learner
from ippo.train.policy import Rollout
from ippo.train.tasks import Example, Task

AUCS = ("flip_auc_score", "flip_auc_advantage", "flip_auc_random", "flip_auc_disjoint", "flip_auc_big",
        "flip_auc_length", "flip_auc_cosine", "unfaithful_auc_score", "unfaithful_auc_advantage")
CORRELATIONS = ("spearman_disjoint", "spearman_big", "spearman_length", "spearman_cosine", "spearman_advantage",
                "sign_agreement", "top_direction_share")


# ========================================================== per-iteration metrics (the trainer logs them)


def probe_metrics(task: Task, buf: Buffer, scores: Tensor | None, keep: Tensor, seed: str,
                  faith: tuple[Tensor, Tensor] | None = None) -> dict:
    """How well low scores, low mean advantages and random numbers find harmful episodes (ppo_math.low_auc; a
    metric is left out where a class is empty).

    --reward-noise: flipped (count), flip_auc_score / _advantage / _random (the random one from ``seed``: 0.5
    expected), each also within a reward level (``_r0``: among episodes whose possibly flipped reward is 0, flipped
    right answers vs truly wrong ones; ``_r1``: flipped wrong answers vs truly right ones) and within a reward level
    and a prompt group (``_rg``; see :func:`flip_aucs`),
    flip_recall (flipped episodes the filter dropped) and flip_recall_random (the expected recall of a random filter
    with the same kept fraction: the dropped fraction). Faithfulness, among episodes whose final answer is right
    (by the task's checker, whatever the reward): unfaithful (count with a wrong step) and
    unfaithful_auc_score / _advantage. ``faith``: :func:`faithfulness` of the buffer where the caller has it already.
    """
    advantage = episode_advantage(buf)
    out: dict = {}
    if buf.flipped is not None:
        noise = torch.rand(len(keep), generator=torch.Generator().manual_seed(
            random.Random(f"probe-random:{seed}").getrandbits(63)))
        out.update(flipped=int(buf.flipped.sum()), **flip_aucs("advantage", advantage, buf),
                   **flip_aucs("random", noise, buf))
        if scores is not None and buf.flipped.any():
            out.update(**flip_aucs("score", scores, buf),
                       flip_recall=float((~keep[buf.flipped]).float().mean()),
                       flip_recall_random=1 - float(keep.float().mean()))
    correct, unfaithful = faith or faithfulness(task, buf.ro.texts, buf.ro.examples)
    out.update(unfaithful=int(unfaithful.sum()), **unfaithful_auc("advantage", advantage, correct, unfaithful))
    if scores is not None:
        out.update(unfaithful_auc("score", scores, correct, unfaithful))
    return {k: v for k, v in out.items() if v is not None}


def unfaithful_auc(name: str, values: Tensor, correct: Tensor, unfaithful: Tensor) -> dict:
    """unfaithful_auc_<name>: among the episodes whose final answer is right, how well low ``values`` find those
    with a wrong step (stats.low_auc; None where a class is empty). ``correct``, ``unfaithful``: (E,) bool."""
    return {f"unfaithful_auc_{name}": stats.low_auc(values.cpu()[correct], unfaithful[correct])}


def episode_advantage(buf: Buffer) -> Tensor:
    """(E,) float64: each episode's mean advantage over its response tokens, summed in float64, where n copies of a
    float32 value sum exactly and divide back to it: an advantage constant over the episode (grpo's) comes out
    exactly, whatever the length (a float32 mean differs in the last bit between lengths, which would order equal
    advantages by length instead of tying them)."""
    return pm.masked_mean(buf.advantages.double(), buf.mask.double(), dim=1)


def flip_aucs(name: str, values: Tensor, buf: Buffer) -> dict:
    """flip_auc_<name>: how well low ``values`` find the flipped episodes (stats.low_auc), over the buffer and within
    each reward level: _r0 among the episodes whose (possibly flipped) reward is 0, _r1 among those at 1; and _rg
    within a reward level and a prompt group (stats.stratified_low_auc: only pairs of the same group and reward).
    Within a level the reward cannot tell a flipped episode from its neighbours, but a group-normalized advantage
    still can, by the group's other rewards (a 0 among mostly right answers); within a group and a level every
    advantage of grpo is the same, so only a score that reads the content beats 0.5 in _rg. None where a class is
    empty."""
    flipped, values, rewards = buf.flipped.cpu(), values.cpu(), buf.rewards.cpu()
    out = {f"flip_auc_{name}": stats.low_auc(values, flipped)}
    for level in (0, 1):
        at = rewards == level
        out[f"flip_auc_{name}_r{level}"] = stats.low_auc(values[at], flipped[at])
    out[f"flip_auc_{name}_rg"] = stats.stratified_low_auc(values, flipped, buf.ro.group.cpu() * 2 + rewards.long())
    return out


def distinct_per_group(ro: Rollout) -> float:
    """Distinct completions per prompt group, mean over the buffer's groups (1 = every group sampled one text)."""
    return len(set(zip(ro.group.tolist(), ro.texts))) / len(ro.group.unique())


def faithfulness(task: Task, texts: list[str], examples: list[Example]) -> tuple[Tensor, Tensor]:
    """(E,) bool each: the final answer is right (``task.check_answer``), and right with a wrong step
    (``check_steps``: unfaithful); a checker that raises counts as a wrong answer (it is counted where the reward is
    computed)."""
    correct, unfaithful = [], []
    for text, example in zip(texts, examples):
        try:
            right = bool(task.check_answer(text, example))
            correct.append(right)
            unfaithful.append(right and task.check_steps(text)[1] > 0)
        except Exception:
            correct.append(False)
            unfaithful.append(False)
    return torch.tensor(correct, dtype=torch.bool), torch.tensor(unfaithful, dtype=torch.bool)


# =========================================================================== ippo probe


def probe(cfg: Config, out_dir: str | Path, draws: int, big_val_size: int, stability: bool = True, log=print,
          model_and_tokenizer=None, reward_fn: RewardFn | None = None, progress: bool = False,
          variants: tuple[str, ...] = (), resume: bool = False) -> dict:
    """Run ``draws`` draws of ``cfg`` at its SFT warm start; write ``probe.json`` and ``probe.png`` into
    ``out_dir`` and return the JSON's content (config, draws, summary).

    ``variants``: other ``--score`` values scored on the same buffer and validation draw as ``cfg.score``, each with
    flip_auc_<variant>(_r0, _r1, _rg), unfaithful_auc_<variant> and seconds_<variant> (its validation gradient and
    scoring pass; seconds_score: the same for ``cfg.score``). Draw d is seeded by (seed, d) alone, so ``resume``
    continues a probe.json of the same options from its next draw and ends as an uninterrupted probe would."""
    cfg.validate()
    if draws < 1:
        raise ValueError(f"--draws must be >= 1, got {draws}")
    bad = [v for v in variants if v not in SCORES] + [v for v in set(variants) if variants.count(v) > 1]
    if bad or cfg.score in variants:
        raise ValueError(f"--variants must name distinct scores of {SCORES} other than --score {cfg.score!r}; got "
                         f"{','.join(variants)!r}")
    if stability and big_val_size < 1:
        raise ValueError(f"--big-val-size must be >= 1, got {big_val_size}")
    if cfg.algo != "ippo":
        raise ValueError(f"ippo probe scores episodes: --algo must be ippo, got {cfg.algo!r}")
    out_dir = Path(out_dir)
    check_paths(cfg, out_dir)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    results, options = [], {"config": asdict(cfg), "big_val_size": big_val_size if stability else None,
                            "variants": list(variants)}
    if (out_dir / "probe.json").is_file():
        if not resume:
            raise FileExistsError(f"{out_dir / 'probe.json'} exists; pass --resume to continue it or pick another "
                                  f"--out")
        saved = read_json(out_dir / "probe.json", required=("config", "draws"))
        changed = changed_options(cfg, saved["config"])
        if changed or any(saved.get(k) != v for k, v in options.items() if k != "config"):
            raise ValueError(f"--resume: {out_dir / 'probe.json'} was written with other options: "
                             f"{list(changed) or [k for k in options if k != 'config' and saved.get(k) != options[k]]}")
        results = saved["draws"]
    L, _, _ = setup_learner(cfg, out_dir, True, model_and_tokenizer, reward_fn, log, progress)
    val_split = L.task.split("validation")
    if stability and 2 * cfg.val_size > len(val_split):
        raise ValueError(f"--val-size {cfg.val_size}: two disjoint draws need {2 * cfg.val_size} validation "
                         f"problems, the task has {len(val_split)}")
    report = None
    for d in range(len(results) + 1, draws + 1):
        t0, timing = time.perf_counter(), Counter()
        L.rng = random.Random(f"probe:{cfg.seed}:{d}")  # draw d depends on (seed, d) only: --resume is exact
        torch.manual_seed(random.Random(f"probe-torch:{cfg.seed}:{d}").getrandbits(63))
        buf = rollout(L, d, timing)
        val = L.rng.sample(val_split, min(cfg.val_size, len(val_split)))
        compute_advantages(cfg, buf)
        t1 = time.perf_counter()
        if cfg.sketch_dim:
            scores, sketches = _score(L, buf, val, timing, sketches=True)
        else:
            scores = _score(L, buf, val, timing)
        seconds_score = time.perf_counter() - t1
        L.empty_streak, record = 0, {}
        keep, _, _ = scoring.filter_episodes(L, buf, scores, record)
        signal = pm.signal_episodes(buf.rewards, buf.ro.group)
        advantage = episode_advantage(buf)
        row = {"draw": d, "episodes": len(scores), "reward": float(buf.rewards.mean()),
               "all_equal": bool((buf.rewards == buf.rewards[0]).all()),
               "paper_stop": bool(pm.ippo_filter(scores, cfg.tol).stop),
               "signal_fraction": float(signal.float().mean()),
               "evidence_empty": not bool(((scores > cfg.tol) & signal).any()),
               "kept_fraction": float(keep.float().mean()),
               "distinct_per_group": distinct_per_group(buf.ro), "seconds_score": seconds_score,
               "sign_agreement": float(((scores > 0) == (advantage > 0)).float().mean())}
        correct, unfaithful = faithfulness(L.task, buf.ro.texts, buf.ro.examples)
        row.update(probe_metrics(L.task, buf, scores, keep, seed=f"{cfg.seed}:{d}", faith=(correct, unfaithful)),
                   spearman_advantage=stats.spearman(scores, advantage))
        per_episode = {"score": scores, "mean_advantage": advantage, "reward": buf.rewards,
                       "length": buf.mask.sum(1), "group": buf.ro.group, "correct": correct.float(),
                       "unfaithful": unfaithful.float()} | (
                           {} if buf.flipped is None else {"flipped": buf.flipped.float()})
        if stability:
            taken = set(val)
            rest = [ex for ex in val_split if ex not in taken]
            other = _score(L, buf, L.rng.sample(rest, cfg.val_size), timing)
            big = _score(L, buf, L.rng.sample(val_split, min(big_val_size, len(val_split))), timing)
            length = scores * buf.mask.sum(1)
            per_episode.update(score_disjoint=other, score_big=big)
            row.update(spearman_disjoint=stats.spearman(scores, other), spearman_big=stats.spearman(scores, big),
                       spearman_length=stats.spearman(scores, length))
            if buf.flipped is not None:
                row.update(flip_auc_disjoint=stats.low_auc(other, buf.flipped),
                           flip_auc_big=stats.low_auc(big, buf.flipped),
                           flip_auc_length=stats.low_auc(length, buf.flipped))
        for variant in variants:  # the same buffer and validation draw, another --score
            t1 = time.perf_counter()
            other = scoring.score_episodes(L.lm, L.tokenizer, L.task, replace(cfg, score=variant), buf.ro,
                                           buf.old_logp, buf.advantages, val, timing, opt=L.opt)
            row[f"seconds_{variant}"] = time.perf_counter() - t1
            per_episode[f"score_{variant}"] = other
            row.update(unfaithful_auc(variant, other, correct, unfaithful))
            if buf.flipped is not None:
                row.update(flip_aucs(variant, other, buf))
        if cfg.sketch_dim:  # cosine: the score over the episode gradient's norm, estimated by its sketch's norm
            cosine = scores / sketches.norm(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
            energy = torch.linalg.svdvals(sketches.double()).square()
            row.update(spearman_cosine=stats.spearman(scores, cosine),  # all-zero sketches: no direction
                       top_direction_share=float(energy[0] / energy.sum()) if energy.sum() > 0 else None)
            if buf.flipped is not None:
                row["flip_auc_cosine"] = stats.low_auc(cosine, buf.flipped)
        row = {k: v for k, v in row.items() if v is not None and not (isinstance(v, float) and not math.isfinite(v))}
        row["per_episode"] = {k: [round(float(x), 8) if math.isfinite(x) else None for x in v.tolist()]
                              for k, v in per_episode.items()}
        row["seconds"] = time.perf_counter() - t0
        results.append(row)
        report = write(options, out_dir, results)
        log(f"draw {d}/{draws} ({row['seconds']:.0f}s): " + ", ".join(
            f"{k} {row[k]:.2f}" for k in ("reward", "flip_auc_score", "flip_auc_advantage", "unfaithful_auc_score",
                                          "spearman_disjoint", "spearman_big") if k in row)
            + f", all_equal {row['all_equal']}, paper_stop {row['paper_stop']}")
    return report or write(options, out_dir, results)


def write(options: dict, out_dir: Path, results: list[dict]) -> dict:
    """``probe.json`` and ``probe.png`` of the draws so far (after every draw: a killed probe keeps them)."""
    report = options | {"summary": summarize(results), "draws": results}
    cfg = options["config"]
    text = json.dumps(report, indent=1, allow_nan=False) + "\n"  # strict JSON: a NaN here is a bug, not a value
    atomic_write(out_dir / "probe.json", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    plot(results, out_dir / "probe.png", title=f"ippo probe: {len(results)} draws of {results[0]['episodes']} "
         f"episodes, reward noise {cfg['reward_noise']}, val size {cfg['val_size']}")
    return report


def _score(L: Learner, buf: Buffer, val, timing: Counter, sketches: bool = False):
    return scoring.score_episodes(L.lm, L.tokenizer, L.task, L.cfg, buf.ro, buf.old_logp, buf.advantages, val, timing,
                                  sketches=sketches, opt=L.opt)


def summarize(results: list[dict]) -> dict:
    """Per metric over the draws that have it: n, mean, median, interquartile range (q1, q3), min, max, and for
    an AUC the draws below 0.5 (inverted); the stop counts: draws with all rewards equal / not, and how many of each
    the paper's rule stopped, and how many evidence_empty."""
    summary = {}
    dynamic = sorted({k for r in results for k in r
                      if k.startswith(("flip_auc_", "unfaithful_auc_", "seconds_")) and k not in AUCS})
    for key in AUCS + CORRELATIONS + tuple(dynamic) + ("flip_recall", "flip_recall_random", "kept_fraction",
                                                        "signal_fraction", "seconds"):
        values = [r[key] for r in results if r.get(key) is not None and math.isfinite(r[key])]
        if values:
            summary[key] = describe(values, auc="auc" in key)
    for equal in (True, False):
        rows = [r for r in results if r["all_equal"] == equal]
        summary["all_equal" if equal else "mixed"] = {"draws": len(rows),
                                                      "paper_stop": sum(r["paper_stop"] for r in rows),
                                                      "evidence_empty": sum(r["evidence_empty"] for r in rows)}
    return summary


def describe(values: list[float], auc: bool) -> dict:
    """n, mean, median, interquartile range (q1, q3; inclusive: within [min, max]), min, max of ``values``
    (non-empty), and for an AUC the values below 0.5 (inverted)."""
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else (values[0],) * 3
    out = {"n": len(values), "mean": statistics.fmean(values), "median": statistics.median(values), "q1": q1,
           "q3": q3, "min": min(values), "max": max(values)}
    return out | ({"inverted": sum(v < 0.5 for v in values)} if auc else {})


def plot(results: list[dict], path: Path, title: str) -> None:
    """Each AUC and correlation over the draws: a box and the draws as points (chance 0.5 for the AUCs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [len(AUCS), len(CORRELATIONS)]})
    for ax, keys, chance in ((axes[0], AUCS, 0.5), (axes[1], CORRELATIONS, None)):
        present = [k for k in keys if any(k in r for r in results)]
        data = [[r[k] for r in results if k in r] for k in present]
        if present:
            ax.boxplot(data, showfliers=False)
            for i, values in enumerate(data, 1):
                ax.plot([i + 0.08 * ((j % 5) - 2) for j in range(len(values))], values, "o", ms=3, alpha=0.6,
                        color="C0")
            ax.set_xticks(range(1, len(present) + 1), [k.replace("_", "\n", 1) for k in present], fontsize=7)
        if chance is not None:
            ax.axhline(chance, color="grey", ls="--", lw=1)
        ax.set_ylim(-1.05 if chance is None else -0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_title("AUC: low value finds flipped / unfaithful episodes", fontsize=9)
    axes[1].set_title("score stability (Spearman) and sign agreement", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
