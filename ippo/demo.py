"""``python -m ippo.demo``: score a batch of episodes in one backward and check it against the per-episode loop.

A random-init Llama-shaped model with peft LoRA on every projection; episodes of random lengths with
random advantages; the validation gradient from a held-out batch. Prints each episode's score from
``InfluenceScorer`` (one backward) and from one backward per episode, which episodes I-PPO keeps
(score > 0), and the time of a plain forward+backward, the scored one, and the loop.
"""

from __future__ import annotations

import argparse
import time

import torch

from ippo.kernels import InfluenceScorer, segment_ids_from_mask, validation_gradients
from ippo.kernels.backends import select_backend
from ippo.testing import episode_losses, lora_llama, next_token_targets, per_episode_loop


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ippo.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--episodes", type=int, default=16, help="episodes in the batch (default 16)")
    parser.add_argument("--max-tokens", type=int, default=96, help="longest episode, in tokens (default 96)")
    parser.add_argument("--hidden", type=int, default=256, help="model width (default 256)")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    if args.episodes < 1 or args.max_tokens < 2:
        parser.error("--episodes must be >= 1 and --max-tokens >= 2")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(args.seed)
    vocab = 2048
    model = lora_llama(vocab, args.rank, seed=args.seed, hidden_size=args.hidden, num_layers=args.layers,
                       intermediate_size=args.hidden * 8 // 3, num_heads=max(1, args.hidden // 64),
                       num_kv_heads=max(1, args.hidden // 192), device=device)
    lengths = torch.randint(2, args.max_tokens + 1, (args.episodes,))
    input_ids = torch.randint(0, vocab, (args.episodes, args.max_tokens), device=device)
    mask = (torch.arange(args.max_tokens)[None, :] < lengths[:, None]).long().to(device)  # right padding
    advantages = torch.randn(args.episodes, device=device)
    targets, weights = next_token_targets(input_ids, advantages, mask)
    segment_ids = segment_ids_from_mask(mask)
    val_ids = torch.randint(0, vocab, (8, args.max_tokens), device=device)
    val_weights = torch.full((8,), 1 / 8, device=device)  # val loss: mean negative log-likelihood of 8 sequences
    val_loss = episode_losses(model, val_ids, *next_token_targets(val_ids, val_weights)).sum()
    val_grads = validation_gradients(model, val_loss)
    backend, _ = select_backend(torch.device(device))
    print(f"model: {args.layers} layers x {args.hidden} wide, LoRA r={args.rank} on 7 projections; "
          f"{args.episodes} episodes of {lengths.min().item()}..{lengths.max().item()} tokens; "
          f"device {device}, backend {backend}")

    def loss():
        return episode_losses(model, input_ids, targets, weights, mask).sum()

    loss().backward()  # warm-up, untimed
    model.zero_grad()
    start = time.perf_counter()
    loss().backward()
    plain_s = time.perf_counter() - start
    model.zero_grad()

    start = time.perf_counter()
    with InfluenceScorer(model, val_grads, segment_ids, args.episodes) as scorer:
        loss().backward()
    scores = scorer.scores
    scored_s = time.perf_counter() - start

    start = time.perf_counter()
    loop = per_episode_loop(model, val_grads, input_ids, targets, weights, mask)
    loop_s = time.perf_counter() - start

    print(f"{'episode':>7} {'tokens':>6} {'one backward':>14} {'per-episode':>14}  I-PPO")
    for i in range(args.episodes):
        keep = "keep" if scores[i] > 0 else "drop"
        print(f"{i:7d} {int(lengths[i]):6d} {scores[i].item():14.6e} {loop[i].item():14.6e}  {keep}")
    rel = ((scores - loop).abs().max() / loop.abs().max()).item()
    print(f"max |difference| / max |score| = {rel:.2e}; kept {(scores > 0).sum().item()}/{args.episodes}")
    print(f"time: plain fwd+bwd {plain_s:.3f} s | with InfluenceScorer {scored_s:.3f} s ({scored_s / plain_s:.2f}x) | "
          f"per-episode loop {loop_s:.3f} s ({loop_s / plain_s:.2f}x); single runs after one warm-up")


if __name__ == "__main__":
    main()
