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
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from ippo.kernels import InfluenceScorer, validation_gradients
from ippo.kernels.backends import select_backend
from ippo.train.model import add_lora


def lora_llama(config: LlamaConfig, rank: int, device: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Random-init Llama of ``config`` with peft LoRA (rank, alpha = 2 rank) on every projection; lora_B
    is drawn N(0, 0.02) instead of peft's zeros, as after some training (else every dl/dA is zero)."""
    with torch.device(device):  # initialize in place: a 1.5B model is slow to init on CPU and move
        model = add_lora(LlamaForCausalLM(config).to(dtype), r=rank, alpha=2 * rank)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model


def episode_losses(model, input_ids, mask, advantages) -> torch.Tensor:
    """(B,) l_i = -A_i * sum_t log p(token_t+1 | <= t) over the episode's own tokens (REINFORCE-style)."""
    logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
    logp = torch.log_softmax(logits, -1).gather(-1, input_ids[:, 1:, None])[..., 0] * mask[:, 1:]
    return -advantages * logp.sum(1)


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
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3, num_hidden_layers=args.layers,
                         num_attention_heads=max(1, args.hidden // 64), num_key_value_heads=max(1, args.hidden // 192),
                         vocab_size=vocab, max_position_embeddings=args.max_tokens)
    model = lora_llama(config, args.rank, device)
    lengths = torch.randint(2, args.max_tokens + 1, (args.episodes,))
    input_ids = torch.randint(0, vocab, (args.episodes, args.max_tokens), device=device)
    mask = (torch.arange(args.max_tokens)[None, :] < lengths[:, None]).long().to(device)  # right padding
    advantages = torch.randn(args.episodes, device=device)
    segment_ids = torch.where(mask.bool(), torch.arange(args.episodes, device=device)[:, None], -1)
    val_ids = torch.randint(0, vocab, (8, args.max_tokens), device=device)
    val_loss = -episode_losses(model, val_ids, torch.ones_like(val_ids), torch.ones(8, device=device)).mean()
    val_grads = validation_gradients(model, val_loss)
    backend, _ = select_backend(torch.device(device))
    print(f"model: {args.layers} layers x {args.hidden} wide, LoRA r={args.rank} on 7 projections; "
          f"{args.episodes} episodes of {lengths.min().item()}..{lengths.max().item()} tokens; "
          f"device {device}, backend {backend}")

    episode_losses(model, input_ids, mask, advantages).sum().backward()  # warm-up, untimed
    model.zero_grad()
    start = time.perf_counter()
    episode_losses(model, input_ids, mask, advantages).sum().backward()
    plain_s = time.perf_counter() - start
    model.zero_grad()

    start = time.perf_counter()
    with InfluenceScorer(model, val_grads, segment_ids, args.episodes) as scorer:
        episode_losses(model, input_ids, mask, advantages).sum().backward()
    scores = scorer.scores
    scored_s = time.perf_counter() - start

    params = [p for n, p in model.named_parameters() if "lora_" in n]
    flat_val = torch.cat([g.flatten().float() for v in val_grads.values() for g in v])
    start = time.perf_counter()
    loop = []
    for i in tqdm(range(args.episodes), desc="per-episode backward loop", leave=False):
        n = int(lengths[i])
        loss = episode_losses(model, input_ids[i:i + 1, :n], mask[i:i + 1, :n], advantages[i:i + 1]).sum()
        loop.append(torch.cat([g.flatten().float() for g in torch.autograd.grad(loss, params)]) @ flat_val)
    loop = torch.stack(loop)
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
