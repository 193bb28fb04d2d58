"""PPO and I-PPO iterations of the trainer side by side, on the same buffer: wall-clock split and peak memory.

    python benchmarks/e2e_ippo_iteration.py OUT_DIR [--model default|random-smollm2-135m|random-tiny|DIR]
        [--rounds 2] [--variants ppo,ippo,ippo-keepall] [--prompts 8] [--samples 8] [--max-new-tokens 40]
        [--threads 0] [--sft-steps 40] [--set KEY=VALUE ...]

Every round runs one iteration (``rl_iteration``, iteration 1) of each variant from the same state (LoRA, value
head, optimizer, prompt RNG and torch seed restored), so all sample the same buffer; the order reverses every
other round. ``ippo-keepall`` is I-PPO with the filter forced to keep every episode with weight 1: its update is
PPO's, so its ratio is the filter's whole cost; plain ``ippo`` updates on the kept episodes only, which makes its
update cheaper by the dropped fraction. Reported per variant: the fastest and the median round of the whole
iteration and of each phase (rollout = sampling + rewards; logprobs = old/ref log-prob forwards + advantages;
val_grad; scoring; update), the ratio to PPO, and the peak resident memory during the iteration (sampled every
2 ms, with glibc told to return freed large blocks at once, so the peak is that of live tensors; ``peak_rss_gib``
is the process's, ``peak_over_start_gib`` what the iteration added).

``--model default`` is SmolLM2-135M-Instruct with its cached SFT warm start (``--sft-steps``; 0 = none) and the
task's correctness reward. The ``random-*`` shapes need no download: random weights emit no end-of-sequence
token, so every completion runs to --max-new-tokens, and the reward is a seeded coin flip per episode (else every
advantage is 0 and I-PPO stops at once). Writes OUT_DIR/e2e_ippo.json.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import os
import random
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path

PHASES = ("rollout", "logprobs", "val_grad", "scoring", "update")
SHAPES = {"random-smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                      num_attention_heads=9, num_key_value_heads=3, vocab_size=49152),
          "random-tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, vocab_size=256)}
_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


class PeakRSS:
    """Peak resident set size of this process while the context is open (a sampling thread)."""

    def __init__(self, every_s: float = 0.002):
        self.every_s, self.peak, self.start = every_s, 0, 0
        self._stop = threading.Event()

    @staticmethod
    def now() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(self.every_s)

    def __enter__(self):
        self.start = self.peak = self.now()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def parse_sets(pairs: list[str], cfg) -> dict:
    """``--set key=value`` overrides of Config fields, parsed by the field's type."""
    types = {f.name: f.type for f in dataclasses.fields(cfg)}
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in types:
            raise SystemExit(f"--set: unknown option {key!r}")
        kind = types[key]
        out[key] = (value.lower() in ("1", "true", "yes") if kind == "bool" else int(value) if kind == "int"
                    else float(value) if kind == "float" else value)
    return out


def scoring_study(L, rounds: int, restore) -> dict:
    """Seconds and peak memory of ``score_episodes`` on one buffer: as the trainer runs it ("now": micro-batches of
    ``minibatch`` episodes, validation gradient in micro-batches of ``val_batch``, no LoRA weight gradients) and
    with those steps undone one by one, up to the way it ran before ("before": LoRA weight gradients computed, the
    buffer and the validation pairs each in one batch)."""
    import torch

    import ippo.kernels
    from ippo.train import learner, policy, scoring

    real_scorer = ippo.kernels.InfluenceScorer

    def with_lora_grads(*args, **kwargs):  # the trainer before it passed lora_grads=False
        return real_scorer(*args, **(kwargs | {"lora_grads": True}))

    restore()
    buf = learner.rollout(L, 1)
    learner.compute_advantages(L.cfg, buf)
    val_examples = random.Random(2).sample(L.task.split("validation"), L.cfg.val_size)
    real_batches, n = policy.length_batches, len(buf.ro.texts)
    modes = {"now": {}, "LoRA weight grads": {"lora_grads": True},
             "one scoring batch": {"lora_grads": True, "one_batch": True},
             "before": {"lora_grads": True, "one_batch": True, "val_batch": L.cfg.val_size}}
    results = {m: [] for m in modes}
    for r in range(rounds):
        for mode, how in (modes.items() if r % 2 == 0 else reversed(modes.items())):
            policy.length_batches = (lambda ro, b: real_batches(ro, n)) if how.get("one_batch") else real_batches
            ippo.kernels.InfluenceScorer = with_lora_grads if how.get("lora_grads") else real_scorer
            cfg = dataclasses.replace(L.cfg, val_batch=how.get("val_batch", L.cfg.val_batch))
            timing = Counter()
            with PeakRSS() as mem:
                scores = scoring.score_episodes(L.lm, L.tokenizer, L.task, cfg, buf.ro, buf.old_logp, buf.advantages,
                                          val_examples, timing)
            results[mode].append({"val_grad": timing["val_grad"], "scoring": timing["scoring"],
                                  "peak_over_start_gib": (mem.peak - mem.start) / 2**30,
                                  "scores": scores.double().tolist()})
            row = results[mode][-1]
            print(f"scoring study round {r} {mode:18s}: val_grad {row['val_grad']:.1f}s, "
                  f"scoring {row['scoring']:.1f}s, peak +{row['peak_over_start_gib']:.2f} GiB", flush=True)
    policy.length_batches, ippo.kernels.InfluenceScorer = real_batches, real_scorer
    ref = torch.tensor(results["before"][0]["scores"])
    out = {}
    for mode, rows in results.items():
        diff = (torch.tensor(rows[0]["scores"]) - ref).abs().max() / ref.abs().max()
        out[mode] = {k: min(r[k] for r in rows) for k in ("val_grad", "scoring", "peak_over_start_gib")} | {
            "max_rel_score_diff_vs_before": float(diff)}
        print(f"scoring study, fastest {mode:18s}: val_grad {out[mode]['val_grad']:.1f}s, scoring "
              f"{out[mode]['scoring']:.1f}s, peak +{out[mode]['peak_over_start_gib']:.2f} GiB, scores vs before "
              f"{float(diff):.1e}")
    return out


def val_study(L, cfg, sizes: list[int], draws: int, restore) -> list[dict]:
    """Scores of one buffer from ``draws`` pairs of disjoint validation draws per size: Spearman rank correlation
    within each pair, agreement of the keep decisions (score > tol), and the seconds of each validation gradient."""
    import torch

    from ippo.train import learner, scoring

    restore()
    buf = learner.rollout(L, 1)
    learner.compute_advantages(L.cfg, buf)
    val_split, rng, out = L.task.split("validation"), random.Random(1), []

    def ranks(x):
        return torch.argsort(torch.argsort(x)).double()

    for n in sizes:
        row = {"val_size": n, "spearman": [], "keep_agreement": [], "val_grad_s": [], "kept": []}
        for _ in range(draws):
            draw = rng.sample(val_split, 2 * n)
            scores = []
            for part in (draw[:n], draw[n:]):
                timing = Counter()
                scores.append(scoring.score_episodes(L.lm, L.tokenizer, L.task, L.cfg, buf.ro, buf.old_logp,
                                               buf.advantages, part, timing).double())
                row["val_grad_s"].append(timing["val_grad"])
                row["kept"].append(float((scores[-1] > cfg.tol).double().mean()))
            row["spearman"].append(float(torch.corrcoef(torch.stack([ranks(s) for s in scores]))[0, 1]))
            row["keep_agreement"].append(float(((scores[0] > cfg.tol) == (scores[1] > cfg.tol)).double().mean()))
        out.append(row)
        print(f"val_size {n:4d}: rank correlation of two disjoint draws' scores "
              f"{', '.join(f'{x:.2f}' for x in row['spearman'])}; keep decisions agree "
              f"{', '.join(f'{x:.0%}' for x in row['keep_agreement'])}; kept "
              f"{', '.join(f'{x:.2f}' for x in row['kept'])}; validation gradient {min(row['val_grad_s']):.1f}s",
              flush=True)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="output folder")
    parser.add_argument("--model", default="random-smollm2-135m",
                        help="default (SmolLM2-135M-Instruct), random-smollm2-135m, random-tiny, or a model dir")
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds of one iteration per variant (the order reverses every other round)")
    parser.add_argument("--variants", default="ppo,ippo,ippo-keepall", help="iterations per round, in this order "
                        "(reversed every other round): ppo, ippo, ippo-keepall")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per iteration")
    parser.add_argument("--samples", type=int, default=8, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="tokens per completion (default: config's)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    parser.add_argument("--sft-steps", type=int, default=40, help="SFT warm start steps (real model; cached)")
    parser.add_argument("--val-sizes", default="", help="also: for each size (e.g. 16,32,64,100), the scores of one "
                        "buffer from two disjoint validation draws of that size: their rank correlation, keep-decision "
                        "agreement, and the validation gradient's seconds")
    parser.add_argument("--scoring-study", type=int, default=0, metavar="N", help="also: N interleaved rounds of "
                        "the scoring phase alone on one buffer, as the trainer does it and as it did before (the whole "
                        "buffer in one batch; the validation gradient in one batch)")
    parser.add_argument("--val-draws", type=int, default=1, help="pairs of disjoint draws per --val-sizes size")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other Config option")
    args = parser.parse_args(argv)
    if any(os.environ.get(k) != v for k, v in _MALLOC.items()):  # freed big blocks go back to the OS: honest RSS
        os.execve(sys.executable, [sys.executable, *sys.argv], os.environ | _MALLOC)

    import torch

    from ippo.train import checkpoint, config, learner, trainer
    from ippo.train import ppo_math as pm

    args.out.mkdir(parents=True, exist_ok=True)
    real = args.model not in SHAPES
    cfg = config.Config(algo="ppo", model=args.model, prompts_per_iter=args.prompts, samples_per_prompt=args.samples,
                   sft_steps=args.sft_steps if real else 0, threads=args.threads, eval_every=10**6)
    if args.max_new_tokens:
        cfg.max_new_tokens = args.max_new_tokens
    cfg = dataclasses.replace(cfg, **parse_sets(args.set, cfg))
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model_and_tokenizer, reward_fn = None, None
    if not real:
        from transformers import LlamaConfig, LlamaForCausalLM

        from ippo.testing import tiny_tokenizer

        with torch.device(config.resolve_device(cfg)):
            torch.manual_seed(0)
            model = LlamaForCausalLM(LlamaConfig(**SHAPES[args.model], max_position_embeddings=4096, bos_token_id=2,
                                                 eos_token_id=3, pad_token_id=0))
        model_and_tokenizer = (model, tiny_tokenizer())
        coin = random.Random(0)

        def reward_fn(completions, examples):  # a seeded coin flip per episode (see the docstring)
            return [float(coin.random() < 0.5) for _ in completions]

    # resume=True only skips the base model's eval; the SFT warm start comes from its cache (or is trained once)
    L, _, sft_info = learner.setup_learner(cfg, args.out / "run", True, model_and_tokenizer, reward_fn, print, False)
    snapshot = copy.deepcopy((checkpoint.trainable_state(L.lm), L.value_head.state_dict(), L.opt.state_dict(),
                              L.rng.getstate()))
    coin_state = coin.getstate() if not real else None

    real_filter = pm.ippo_filter

    def keep_all(scores, tol, signal=None):
        real_filter(scores, tol, signal)  # the same checks and work
        return pm.FilterResult(torch.ones_like(scores, dtype=torch.bool), torch.ones_like(scores), False)

    def restore(algo: str) -> None:
        lora, head, opt, rng = copy.deepcopy(snapshot)
        checkpoint.load_trainable_state(L.lm, lora)
        L.value_head.load_state_dict(head)
        L.opt.load_state_dict(opt)
        L.rng.setstate(rng)
        if coin_state is not None:
            coin.setstate(coin_state)
        L.cfg = dataclasses.replace(cfg, algo=algo)
        torch.manual_seed(cfg.seed)
        L.lm.train()

    def one_iteration(variant: str) -> dict:
        algo = variant.split("-")[0]
        pm.ippo_filter = keep_all if variant == "ippo-keepall" else real_filter
        restore(algo)
        timing = Counter({k: 0.0 for k in PHASES})
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            record, stop = trainer.rl_iteration(L, 1, timing)
            total = time.perf_counter() - t0
        texts = [e["completion"] for e in record["top_episodes"] + record["bottom_episodes"]]
        return {"algo": variant, "total": total, **{k: timing[k] for k in PHASES}, "peak_rss_gib": mem.peak / 2**30,
                "peak_over_start_gib": (mem.peak - mem.start) / 2**30, "kept_fraction": record["kept_fraction"],
                "reward": record["reward"], "stop": stop,
                "buffer": hashlib.sha256(json.dumps([record["reward"], record["response_len"]]).encode()
                                         ).hexdigest()[:12], "shown": texts}

    variants = args.variants.split(",")
    runs = []
    for r in range(args.rounds):
        for algo in (variants if r % 2 == 0 else variants[::-1]):
            runs.append(one_iteration(algo) | {"round": r})
            row = runs[-1]
            print(f"round {r} {algo:12s}: {row['total']:6.1f}s = " + ", ".join(f"{k} {row[k]:.1f}" for k in PHASES)
                  + f"; peak {row['peak_rss_gib']:.2f} GiB (+{row['peak_over_start_gib']:.2f}); kept "
                  f"{row['kept_fraction']:.2f}, reward {row['reward']:.2f}", flush=True)
    same_buffer = len({(r["buffer"], r["reward"]) for r in runs}) == 1
    summary = {"device": torch.cuda.get_device_name() if config.resolve_device(cfg).type == "cuda" else "cpu",
               "torch": torch.__version__, "threads": torch.get_num_threads(), "model": args.model,
               "episodes_per_iteration": args.prompts * args.samples, "config": dataclasses.asdict(cfg),
               "sft": sft_info, "same_buffer": same_buffer, "runs": runs, "fastest": {}, "median": {}}
    variants = [v for v in variants if any(r["algo"] == v for r in runs)]  # none with --rounds 0
    for algo in variants:
        mine = [r for r in runs if r["algo"] == algo]
        for key in ("total", *PHASES, "peak_rss_gib", "peak_over_start_gib"):
            summary["fastest"].setdefault(algo, {})[key] = min(r[key] for r in mine)
            summary["median"].setdefault(algo, {})[key] = statistics.median(r[key] for r in mine)
    for stat in ("fastest", "median"):
        for algo in variants:
            if algo != "ppo" and "ppo" in variants:
                summary[stat][algo]["ratio"] = summary[stat][algo]["total"] / summary[stat]["ppo"]["total"]
    if args.scoring_study:
        summary["scoring_study"] = scoring_study(L, args.scoring_study, lambda: restore("ippo"))
    if args.val_sizes:
        summary["val_sizes"] = val_study(L, cfg, [int(n) for n in args.val_sizes.split(",")], args.val_draws,
                                         lambda: restore("ippo"))
    (args.out / "e2e_ippo.json").write_text(json.dumps(summary, indent=1))
    print(f"{args.model}, {summary['episodes_per_iteration']} episodes, {summary['threads']} threads, same buffer: "
          f"{same_buffer}")
    for stat in ("fastest", "median"):
        for algo in variants:
            row = summary[stat][algo]
            print(f"  {stat:7s} {algo:12s}: {row['total']:6.1f}s = " + ", ".join(f"{k} {row[k]:.1f}" for k in PHASES)
                  + f"; peak {row['peak_rss_gib']:.2f} GiB (+{row['peak_over_start_gib']:.2f})"
                  + (f"; x PPO {row['ratio']:.3f}" if "ratio" in row else ""))


if __name__ == "__main__":
    main()
