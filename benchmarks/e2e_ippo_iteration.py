"""Wall-clock split of I-PPO iterations of the thin trainer (rollout / validation gradient / scoring /
update), at the SmolLM2-135M shape with random weights (no download needed), on the GPU if there is one.

    python benchmarks/e2e_ippo_iteration.py OUT_DIR [--shape smollm2-135m|tiny] [--iterations 2]

Random weights emit no end-of-sequence token, so every completion runs to --max-new-tokens: the rollout
cost is that of full-length episodes. Their answers are never right, so the reward is a seeded coin flip
per episode instead (else every advantage is 0, every score 0, and I-PPO stops at once); the work per
phase is that of a real run. Writes OUT_DIR/e2e_ippo.json and the run directory OUT_DIR/e2e-run/.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ippo.testing import tiny_tokenizer
from ippo.train.trainer import Config, resolve_device, train

SHAPES = {"smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                               num_attention_heads=9, num_key_value_heads=3, vocab_size=49152),
          "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=256)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="output folder")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m", help="model shape")
    parser.add_argument("--iterations", type=int, default=2, help="I-PPO iterations (the first warms up)")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per iteration (x 8 samples)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens per completion")
    args = parser.parse_args(argv)
    cfg = Config(algo="ippo", model=f"random-{args.shape}", sft_steps=0, iterations=args.iterations,
                 prompts_per_iter=args.prompts, samples_per_prompt=8, max_new_tokens=args.max_new_tokens,
                 minibatch=16, eval_size=2, eval_k=1, eval_every=10**6, cache_dir=str(args.out / "cache"))
    device = resolve_device(cfg)
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**SHAPES[args.shape], max_position_embeddings=4096, bos_token_id=2,
                                             eos_token_id=3, pad_token_id=0))
    coin = random.Random(0)

    def coin_reward(completions, examples):  # a seeded coin flip per episode (see the docstring)
        return [float(coin.random() < 0.5) for _ in completions]

    run_dir = args.out / "e2e-run"
    train(cfg, run_dir, progress=False, model_and_tokenizer=(model, tokenizer), reward_fn=coin_reward)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    summary = {"device": device_name, "torch": torch.__version__, "shape": args.shape,
               "episodes_per_iteration": args.prompts * 8, "max_new_tokens": args.max_new_tokens,
               "iterations": [{"iteration": r["iteration"], "kept_fraction": r.get("kept_fraction"),
                               "seconds": {k: r["time"][k] for k in ("rollout", "val_grad", "scoring", "update")}}
                              for r in records]}
    (args.out / "e2e_ippo.json").write_text(json.dumps(summary, indent=1))
    print(f"I-PPO iteration breakdown, {args.shape} random weights, {summary['episodes_per_iteration']} episodes "
          f"x {args.max_new_tokens} new tokens, {device_name}")
    for row in summary["iterations"]:
        total = sum(row["seconds"].values())
        split = ", ".join(f"{k} {v:.2f}s ({v / total:.0%})" for k, v in row["seconds"].items())
        print(f"  iteration {row['iteration']}: {total:.2f}s = {split}; kept {row['kept_fraction']}")


if __name__ == "__main__":
    main()
