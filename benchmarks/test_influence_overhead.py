"""Cost of per-episode influence scores over a plain LoRA forward+backward.

Methods: plain fwd+bwd (the baseline), fwd+bwd inside InfluenceScorer (each available backend), and the
published method (one backward per episode on flattened gradients, dot product). CPU runs a tiny shape;
CUDA runs the SmolLM2-135M and Qwen2.5-1.5B shapes (B=16, T=512, bf16, LoRA r=16 on all projections).
"""

from __future__ import annotations

import os

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import DEVICE, SHAPES, record, shapes_for_device
from ippo.kernels import InfluenceScorer, validation_gradients
from ippo.kernels.backends import unavailable_reason

_MODELS: dict[str, tuple] = {}


def setup(shape: str):
    """(model, batch, val_grads), cached per shape: random weights of the real shapes, LoRA r=16."""
    if shape not in _MODELS:
        hidden, inter, layers, heads, kv, vocab, b, t, dtype = SHAPES[shape]
        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                             max_position_embeddings=t)
        model = LlamaForCausalLM(config).to(DEVICE, dtype)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
        input_ids = torch.randint(0, vocab, (b, t), device=DEVICE)
        advantages = torch.randn(b, device=DEVICE)
        val_grads = validation_gradients(model, loss_fn(model, input_ids[:2], advantages[:2]))
        _MODELS[shape] = (model, input_ids, advantages, val_grads)
    return _MODELS[shape]


def per_episode_losses(model, input_ids, advantages):
    """(B,) policy-gradient-like loss per episode: -A_i * sum_t log p(token_t+1)."""
    logits = model(input_ids=input_ids).logits[:, :-1].float()
    logp = torch.log_softmax(logits, -1).gather(-1, input_ids[:, 1:, None])[..., 0]
    return -advantages * logp.sum(1)


def loss_fn(model, input_ids, advantages):
    return per_episode_losses(model, input_ids, advantages).sum()


def run(benchmark, fn, rounds):
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)

    def timed():
        fn()
        sync()

    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=1, iterations=1)
    return torch.cuda.max_memory_allocated() if DEVICE == "cuda" else None


_PEAK: dict[str, int] = {}


@pytest.mark.parametrize("shape", shapes_for_device())
def test_plain(benchmark, shape):
    model, input_ids, advantages, _ = setup(shape)
    benchmark.group = shape

    def step():
        model.zero_grad(set_to_none=True)
        loss_fn(model, input_ids, advantages).backward()

    _PEAK[shape] = run(benchmark, step, rounds=5)
    record(shape, "plain", benchmark)


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
@pytest.mark.parametrize("shape", shapes_for_device())
def test_influence_scorer(benchmark, shape, backend, monkeypatch):
    reason = unavailable_reason(backend, DEVICE)
    if reason is not None:
        pytest.skip(reason)
    monkeypatch.setenv("IPPO_BACKEND", backend)
    model, input_ids, advantages, val_grads = setup(shape)
    segment_ids = torch.arange(input_ids.shape[0], device=DEVICE)[:, None].expand_as(input_ids)
    benchmark.group = shape

    def step():
        model.zero_grad(set_to_none=True)
        with InfluenceScorer(model, val_grads, segment_ids) as scorer:
            loss_fn(model, input_ids, advantages).backward()
        return scorer.scores

    peak = run(benchmark, step, rounds=5)
    extra = {"peak_mem_ratio": peak / _PEAK[shape]} if peak and shape in _PEAK else {}
    record(shape, f"scorer[{backend}]", benchmark, **extra)


@pytest.mark.parametrize("shape", shapes_for_device())
def test_per_episode_loop(benchmark, shape):
    """The published prototype: a backward per episode, flattened LoRA gradient . flattened val gradient."""
    model, input_ids, advantages, val_grads = setup(shape)
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    flat_val = torch.cat([g.flatten().float() for v in val_grads.values() for g in v])
    benchmark.group = shape

    def step():
        scores = []
        for i in range(input_ids.shape[0]):
            grads = torch.autograd.grad(loss_fn(model, input_ids[i:i + 1], advantages[i:i + 1]), params)
            scores.append(torch.cat([g.flatten().float() for g in grads]) @ flat_val)
        return torch.stack(scores)

    run(benchmark, step, rounds=int(os.environ.get("IPPO_BENCH_LOOP_ROUNDS", "2")))
    record(shape, "per-episode loop", benchmark)
