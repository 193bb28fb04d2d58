"""Helpers shared by the test modules (one place; test modules never import each other): random op inputs, the
float64 tiny LoRA model and its batches for the scorer tests, and the tiny trainer set-up of tests/train."""

import json

import pytest
import torch
from conftest import DEVICE

from ippo.kernels import validation_gradients
from ippo.testing import episode_losses, lora_llama, tiny_llama, tiny_tokenizer
from ippo.train import config
from ippo.train import trainer as T

# ---------------------------------------------------------------------------- op inputs


def random_inputs(n, d_in, d_out, r, episodes, dtype, generator):
    """Inputs in ``dtype`` (values drawn in float32), ids in [-1, episodes) so some tokens are padding and
    some episodes empty; grad_y and x are strided views to exercise non-contiguous loads."""
    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(DEVICE, dtype)
    x = randn(d_in, n).T
    grad_y = randn(n, 2 * d_out)[:, ::2]
    args = dict(x=x, h=randn(n, r), grad_y=grad_y, grad_h=randn(n, r), val_A=randn(r, d_in), val_B=randn(d_out, r))
    segment_ids = torch.randint(-1, episodes, (n,), generator=generator).to(DEVICE)
    return args, segment_ids


def folded_inputs(n, d_in, d_out, r, episodes, dtype, generator):
    """``random_inputs`` plus the scorer's folded GEMM outputs in ``dtype``: x [A; V_A]^T and grad_y [B, V_B]
    (N, 2r), whose column halves (strided views) are h, x_va = x V_A^T and g B, g_vb = grad_y V_B."""
    args, segment_ids = random_inputs(n, d_in, d_out, r, episodes, dtype, generator)
    weight_A = torch.randn(r, d_in, generator=generator).to(DEVICE, dtype)
    weight_B = torch.randn(d_out, r, generator=generator).to(DEVICE, dtype)
    hv = args["x"] @ torch.cat([weight_A, args["val_A"]]).T
    gv = args["grad_y"] @ torch.cat([weight_B, args["val_B"]], 1)
    args.update(h=hv[:, :r], grad_h=gv[:, :r] * 0.37)
    return args, dict(h=hv[:, :r], x_va=hv[:, r:], g_vb=gv[:, r:], grad_h=args["grad_h"]), segment_ids


# ---------------------------------------------------------------------------- the scorer's tiny model and batches


VOCAB = 50


LENGTHS = [1, 7, 12, 0, 4, 9]  # an episode of one token, and an empty one


def tiny_model(dropout=0.0, seed=0):
    """float64 2-layer Llama (hidden 24, MLP 40, 4 heads, 2 kv heads), LoRA r=3, scaling 5/3, on every projection."""
    return lora_llama(VOCAB, rank=3, alpha=5, dropout=dropout, lora_B_std=0.2, seed=seed, hidden_size=24,
                      intermediate_size=40, dtype=torch.float64, device=DEVICE)


def random_episodes(lengths, seed=0):
    """Per episode: token ids, per-token target ids and per-token loss weights (like PPO advantages)."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, VOCAB, (n,), generator=g), torch.randint(0, VOCAB, (n,), generator=g),
             torch.randn(n, generator=g, dtype=torch.float64)) for n in lengths]


def batch(episodes, padding="right", row_length=None):
    """(input_ids, targets, weights, attention_mask, position_ids, segment_ids) on DEVICE, one episode per row,
    padded to ``row_length`` on the given side; padding has segment id -1 and weight 0. The first five are
    ``episode_losses``' arguments."""
    length = row_length or max(1, max(len(e[0]) for e in episodes))
    rows = len(episodes)
    input_ids = torch.zeros(rows, length, dtype=torch.long)
    targets = torch.zeros(rows, length, dtype=torch.long)
    weights = torch.zeros(rows, length, dtype=torch.float64)
    segment_ids = torch.full((rows, length), -1, dtype=torch.long)
    mask = torch.zeros(rows, length, dtype=torch.long)
    for i, (ids, tgt, w) in enumerate(episodes):
        n = len(ids)
        cols = slice(length - n, length) if padding == "left" else slice(0, n)
        input_ids[i, cols], targets[i, cols], weights[i, cols], segment_ids[i, cols], mask[i, cols] = ids, tgt, w, i, 1
    position_ids = (mask.cumsum(1) - 1).clamp_min(0)
    return tuple(t.to(DEVICE) for t in (input_ids, targets, weights, mask, position_ids, segment_ids))


def packed_token_model():
    """(model, x (1, 40, 12), weights (1, 40, 9), segment_ids (1, 40)) in float64: a token-wise MLP (it mixes no
    tokens) with LoRA r=5 on both Linears, and one packed row whose tokens interleave episodes 0..5 and padding (-1)
    in random order; the loss is (model(x) * weights).sum()."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.Tanh(), torch.nn.Linear(20, 9)).double().to(DEVICE)
    model = get_peft_model(base, LoraConfig(r=5, lora_alpha=3, target_modules=["0", "2"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.3)
    x = torch.randn(1, 40, 12, dtype=torch.float64, device=DEVICE)
    weights = torch.randn(1, 40, 9, dtype=torch.float64, device=DEVICE)
    return model, x, weights, torch.randint(-1, 6, (1, 40), device=DEVICE)


def val_grads_of(model, seed=99):
    return validation_gradients(model, episode_losses(model, *batch(random_episodes([10, 6, 8], seed=seed))[:5]).sum())


# ---------------------------------------------------------------------------- the trainer on a tiny model (tests/train)


TOK = tiny_tokenizer()


def tiny(dtype=torch.float32):
    return tiny_llama(len(TOK), hidden_size=32, num_layers=2, dtype=dtype), TOK


def saved_tiny(tmp_path):
    """The tiny model and tokenizer saved (safetensors) to tmp_path/tiny-model, for the command line; its path."""
    model_dir = tmp_path / "tiny-model"
    model, tok = tiny()
    model.save_pretrained(model_dir, safe_serialization=True)
    tok.save_pretrained(model_dir)
    return model_dir


def cfg_for(tmp_path, **kw) -> config.Config:
    base = dict(model=str(tmp_path / "tiny-model"), arith_steps=1, arith_digits=1, arith_sizes="40,8,8",
                lora_r=4, lora_alpha=8, sft_steps=2, sft_batch=4, iterations=1, prompts_per_iter=2,
                samples_per_prompt=3, max_new_tokens=10, minibatch=4, val_size=4, eval_size=3, eval_k=2,
                eval_every=1, cache_dir=str(tmp_path / "cache"), threads=1)
    return config.Config(**(base | kw))


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def coin(completions, examples):
    """A deterministic reward that varies between episodes (a random tiny model is never right)."""
    return [float(sum(map(ord, text)) % 2 == 0) for text in completions]


def run(cfg, run_dir, dtype=torch.float32, **kw):
    """``T.train`` on the tiny model in ``dtype``, quietly, with the coin reward unless told otherwise."""
    return T.train(cfg, run_dir, **({"progress": False, "model_and_tokenizer": tiny(dtype), "reward_fn": coin} | kw))


def lora_params(lm):
    """The trainable parameters of a LoRA model: its LoRA A and B weights, in the model's order."""
    return [p for p in lm.parameters() if p.requires_grad]


def lora_state(run_dir):
    from safetensors.torch import load_file

    latest = json.loads((run_dir / "latest.json").read_text())
    return load_file(run_dir / f"{latest['checkpoint']}.safetensors")


def kill_sft_warm_start(tmp_path, monkeypatch, steps: int, dies_at: int):
    """An uninterrupted warm start of ``steps`` steps (cache ``whole``), then one killed (KeyboardInterrupt) at
    its step ``dies_at`` (cache ``killed``); returns the killed run's config, to be run again."""
    from ippo.train import sft

    cfg = dict(sft_steps=steps, iterations=0, eval_size=1, eval_k=1)
    run(cfg_for(tmp_path, **cfg, cache_dir=str(tmp_path / "whole")), tmp_path / "a")
    real_loss, calls = sft.sft_loss, []

    def dies(*args):
        calls.append(1)
        if len(calls) == dies_at:
            raise KeyboardInterrupt
        return real_loss(*args)

    monkeypatch.setattr(sft, "sft_loss", dies)
    killed = cfg_for(tmp_path, **cfg, cache_dir=str(tmp_path / "killed"))
    with pytest.raises(KeyboardInterrupt):
        run(killed, tmp_path / "b")
    monkeypatch.setattr(sft, "sft_loss", real_loss)
    return killed
