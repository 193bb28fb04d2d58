"""Time, peak memory and score error of every way to get per-episode gradient . validation-gradient scores.

Methods (``baselines.py``): plain forward+backward (the baseline), InfluenceScorer per backend, the
per-episode backward loop (published method), torch.func vmap per-sample gradients, eager "reduced ghost"
hooks, eager LoGra-style projection hooks; and the scorer's variants: with whole-model sketches
(k = ``SKETCH_K`` = 512, the width of the LoGra hooks' k = 16 per side per LoRA layer), sketches only, and
scoring only (no LoRA weight gradients). Run: ``pytest benchmarks/ --benchmark-only`` (the configurations outside
the default set need ``IPPO_BENCH_FULL=1``: see conftest.py).
"""

from __future__ import annotations

import pytest
import torch
from baselines import METHODS, full_row_losses
from conftest import DEVICE, RESULTS, config_params, save_results, setup

from ippo.kernels import validation_gradients
from ippo.kernels.backends import unavailable_reason
from ippo.testing import lora_llama

SCORERS = ["scorer[torch]", "scorer[triton]", "scorer[cuda]"]
# Rounds per measurement (after one warm-up); the loop costs B backward passes a round.
ROUNDS = {"cuda": {"plain": 5, "per-episode loop": 2, "other": 3}, "cpu": {"per-episode loop": 4, "other": 10}}[DEVICE]


def plain(model, batch, val_grads):
    full_row_losses(model, *batch).sum().backward()


def method_fn(method: str, monkeypatch):
    if method in SCORERS:
        backend = method[len("scorer["):-1]
        reason = unavailable_reason(backend, DEVICE)
        if reason is not None:
            pytest.skip(f"{backend} backend: {reason}")
        if backend == "triton" and DEVICE == "cpu":
            pytest.skip("triton on CPU is its interpreter, for tests; its timings mean nothing")
        monkeypatch.setenv("IPPO_BACKEND", backend)
        return METHODS["scorer"]
    return plain if method == "plain" else METHODS[method]


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="module", params=config_params())
def config(request):
    return request.param


@pytest.mark.parametrize("method", ["plain", *SCORERS, "scorer+sketch", "sketches only", "scorer, no LoRA grads",
                                    "per-episode loop", "vmap per-sample", "ghost hooks", "logra hooks"])
def test_time_and_memory(benchmark, config, method, monkeypatch):
    fn = method_fn(method, monkeypatch)
    model, batch, val_grads = setup(config)
    benchmark.group = config

    def step():
        model.zero_grad(set_to_none=True)
        fn(model, batch, val_grads)
        sync()

    row = RESULTS[config]["methods"].setdefault(method, {})
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        benchmark.pedantic(step, rounds=ROUNDS.get(method, ROUNDS["other"]), warmup_rounds=1, iterations=1)
    except torch.cuda.OutOfMemoryError:
        row["error"] = "out of memory"
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        save_results()
        pytest.skip(f"{method} ran out of GPU memory at {config}")
    row["median_s"], row["min_s"] = benchmark.stats.stats.median, benchmark.stats.stats.min
    if DEVICE == "cuda":
        row["peak_bytes"] = torch.cuda.max_memory_allocated()
    save_results()


def test_score_error_vs_float64_loop(benchmark):
    """Relative error (max |s - s_ref| / max |s_ref|) of each method against the float64 per-episode loop,
    at a small size in float64 (exact methods: rounding only) and in the benchmark dtype."""
    torch.manual_seed(1)
    shape = dict(hidden_size=64, intermediate_size=176, seed=1, device=DEVICE)
    model64 = lora_llama(512, 16, dtype=torch.float64, **shape)
    batch = (torch.randint(0, 512, (6, 32), device=DEVICE), torch.randn(6, device=DEVICE, dtype=torch.float64))
    val_ids = torch.randint(0, 512, (2, 32), device=DEVICE)
    val = validation_gradients(model64, full_row_losses(model64, val_ids, torch.ones(2, device=DEVICE)).sum())
    reference = METHODS["per-episode loop"](model64, batch, val)
    low = {"float64": (model64, val)}
    if DEVICE == "cuda":
        model_low = lora_llama(512, 16, dtype=torch.bfloat16, **shape)
        model_low.load_state_dict(model64.state_dict())
        low["bfloat16"] = (model_low, {k: type(v)(v.A.bfloat16(), v.B.bfloat16()) for k, v in val.items()})

    def measure():
        errors = {}
        for dtype, (model, val_grads) in low.items():
            for name, fn in METHODS.items():
                scores = fn(model, (batch[0], batch[1].to(model.dtype)), val_grads).double()
                errors[f"{name} ({dtype})"] = ((scores - reference).abs().max() / reference.abs().max()).item()
                model.zero_grad(set_to_none=True)
        return errors

    RESULTS.setdefault("score error", {})["relative"] = benchmark.pedantic(measure, rounds=1, iterations=1)
    save_results()
