"""How well sketched influence scores rank episodes, on the real model: SmolLM2-135M-Instruct, LoRA r=16 on every
projection, 64 rollout episodes sampled from it on the arith task.

One backward inside ``InfluenceScorer(model, val_grads, segment_ids, sketch_dim=K)`` gives both the exact scores
and the whole-model sketches at the largest K; every smaller k is read off those sketches with
``shrink_sketches`` (exact: the k-sketch is a rescaled slice of the K-sketch for the same seed; tested in
tests/test_sketches.py), so each seed costs one backward. For each k and projection seed: Spearman correlation
of ``sketches @ sketch_gradients(val_grads, k)`` with the exact scores, the fraction of episodes whose sign
agrees, and the relative RMS error.

    .venv/bin/python benchmarks/sketch_accuracy.py [--seeds 2] [--threads 2] [--out FILE.json]

Writes $IPPO_BENCH_OUT/sketch_accuracy.json (default runs/bench/, untracked) unless --out names a file; the committed
record is benchmarks/results/sketch_accuracy.json.

Adapter: the cached SFT warm start of the default config (``ippo train``'s) when it exists, else lora_B ~
N(0, 0.02) (``--adapter random`` forces that); the run says which. Torch backend, CPU, float32.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from ippo.train import stats


def shrink_sketches(sketches: torch.Tensor, r: int, k: int) -> torch.Tensor:
    """(S, k) sketches from (S, K) ones of layers that all have rank r, K and k multiples of 2r, k <= K: the
    projection rows c < m = k / 2r of the K sketch, times sqrt(M / m) (M = K / 2r). Exact: sign(c, j) does not
    depend on m (``projection.py``), so this equals sketching with k directly, for the same seed."""
    big_m, m = sketches.shape[1] // (2 * r), k // (2 * r)
    if k % (2 * r) or sketches.shape[1] % (2 * r) or not 0 < m <= big_m:
        raise ValueError(f"shrink_sketches: k = {k} must be a multiple of 2r = {2 * r} in (0, {sketches.shape[1]}]")
    s = sketches.shape[0]
    a = sketches[:, :r * big_m].reshape(s, r, big_m)[:, :, :m]
    b = sketches[:, r * big_m:].reshape(s, big_m, r)[:, :m, :]
    return torch.cat([a.reshape(s, -1), b.reshape(s, -1)], dim=1) * math.sqrt(big_m / m)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--episodes", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=64, help="prompts (episodes / prompts samples each)")
    parser.add_argument("--ks", default="256,1024,4096,16384")
    parser.add_argument("--seeds", type=int, default=5, help="projection seeds (one scored backward each)")
    parser.add_argument("--adapter", choices=["sft", "random"], default="sft")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="result JSON (default: $IPPO_BENCH_OUT or runs/bench/, "
                        "sketch_accuracy.json)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from ippo.kernels import InfluenceScorer, segment_ids_from_mask, sketch_gradients
    from ippo.testing import init_lora_B
    from ippo.train.config import Config, build_task
    from ippo.train.model import add_lora, default_model_dir, load_causal_lm
    from ippo.train.policy import response_logprobs, sample, validation_gradient
    from ippo.train.sft import load_cached, sft_cache_dir

    start = time.perf_counter()
    cfg = Config()
    task = build_task(cfg)
    model_dir = default_model_dir()
    lm, tokenizer = load_causal_lm(model_dir)
    lm = add_lora(lm, r=cfg.lora_r, alpha=cfg.lora_alpha)
    adapter = "random lora_B ~ N(0, 0.02)"
    if args.adapter == "sft" and load_cached(lm, sft_cache_dir(cfg, model_dir), log=lambda *_: None) is not None:
        adapter = f"SFT warm start ({cfg.sft_steps} steps, cached)"
    else:
        torch.manual_seed(0)
        init_lora_B(lm, 0.02)
    torch.manual_seed(0)
    examples = task.split("train")[:args.prompts]
    rollout = sample(lm, tokenizer, task, examples, k=args.episodes // args.prompts, temperature=cfg.temperature,
                     max_new_tokens=cfg.max_new_tokens, gen_batch=cfg.gen_batch)
    rewards = torch.tensor([float(task.check_answer(t, ex)) for t, ex in zip(rollout.texts, rollout.examples)])
    # REINFORCE with the batch-mean baseline, so that every episode has a nonzero loss (a per-prompt baseline
    # zeroes whole groups that are all right, and their exactly-zero scores would tie in the ranking)
    advantages = rewards - rewards.mean()
    if not advantages.all():
        advantages = torch.where(advantages == 0, 1.0, advantages)
    val_grads = validation_gradient(lm, tokenizer, task, task.split("validation")[:cfg.val_size], batch=cfg.val_size)
    segment_ids = segment_ids_from_mask(rollout.attn)
    setup_s = time.perf_counter() - start

    ks = [int(k) for k in args.ks.split(",")]
    big = max(ks)
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm.enable_input_require_grads()
    lm.train()  # transformers checkpoints only in training mode; LoRA dropout is 0
    rows, exact, backward_s = [], None, []
    for seed in range(args.seeds):
        t0 = time.perf_counter()
        with InfluenceScorer(lm, val_grads, segment_ids, args.episodes, sketch_dim=big, sketch_seed=seed,
                             lora_grads=False) as scorer:
            logp, _ = response_logprobs(lm, rollout, temperature=cfg.temperature)
            (-(advantages[:, None] * logp * rollout.mask).sum()).backward()
        backward_s.append(time.perf_counter() - t0)
        scores = scorer.scores
        exact = scores if exact is None else exact
        torch.testing.assert_close(scores, exact)  # same backward, other seed: the same exact scores
        sketches = scorer.sketches
        for k in ks:
            estimate = shrink_sketches(sketches, cfg.lora_r, k) @ sketch_gradients(val_grads, k, seed, model=lm)
            nonzero = exact != 0
            rows.append(dict(k=k, seed=seed, spearman=stats.spearman(estimate, exact),
                             sign_agreement=float((estimate.sign() == exact.sign())[nonzero].float().mean()),
                             relative_rms_error=float((estimate - exact).pow(2).mean().sqrt()
                                                      / exact.pow(2).mean().sqrt())))
    tokens = int((segment_ids >= 0).sum())
    result = dict(model="SmolLM2-135M-Instruct", lora_r=cfg.lora_r, layers=len(val_grads), adapter=adapter,
                  episodes=args.episodes, tokens=tokens, mean_reward=float(rewards.mean()),
                  positive_fraction=float((exact > 0).float().mean()),
                  zero_scores=int((exact == 0).sum()), setup_s=setup_s, backward_s=backward_s,
                  rows=rows)
    if args.out is None:
        from report import out_dir  # benchmarks/report.py (this script's folder)

        args.out = out_dir() / "sketch_accuracy.json"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"written to {args.out}")
    print(markdown(result))
    return result


def markdown(result: dict) -> str:
    lines = [f"{result['model']}, LoRA r={result['lora_r']} on {result['layers']} layers, "
             f"adapter: {result['adapter']}; "
             f"{result['episodes']} episodes ({result['tokens']} tokens, mean reward {result['mean_reward']:.2f}, "
             f"{result['positive_fraction']:.0%} exact scores > 0); one scored backward "
             f"{', '.join(f'{s:.0f} s' for s in result['backward_s'])} per seed", "",
             "| k | Spearman (per seed) | sign agreement | relative RMS error |", "|---|---|---|---|"]
    for k in sorted({row["k"] for row in result["rows"]}):
        group = [row for row in result["rows"] if row["k"] == k]

        def fmt(key, spec, group=group):
            return " / ".join(format(row[key], spec) for row in group)

        lines.append(f"| {k} | {fmt('spearman', '.3f')} | {fmt('sign_agreement', '.2f')} | "
                     f"{fmt('relative_rms_error', '.2f')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
