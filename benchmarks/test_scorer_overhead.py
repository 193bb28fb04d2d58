"""InfluenceScorer's cost next to a plain forward+backward at the full SmolLM2-135M shape (30 layers, hidden 576,
MLP 1536, vocab 49152, LoRA r = 16 on every projection, random init, no download), interleaved round by round.

Each round runs every method once, in order (plain first), so the ratio method / plain of one round compares runs
minutes apart at most; a shared machine's drift cancels there, not across rounds. ``IPPO_BENCH_SCORERS=
"name=path.py,..."`` adds other versions of ``ippo/kernels/scorer.py`` (e.g. ``git show HEAD:ippo/kernels/scorer.py
> /tmp/before.py``) as methods ``scorer (name)``, so a change is measured against the code before it in the same
run. ``IPPO_BENCH_ROUNDS`` (default 5), ``IPPO_BENCH_TOKENS`` (episodes x tokens, default ``8x128``). Results:
scorer_overhead_<device>.json in $IPPO_BENCH_OUT (default runs/bench/). A long study (on one CPU core a
forward+backward at this shape took ~7 s of CPU time, so the default 5 rounds of 3 methods and a warm-up take ~2
minutes at least): marked ``full``, so it runs only with ``IPPO_BENCH_FULL=1``:

    IPPO_BENCH_FULL=1 OMP_NUM_THREADS=1 pytest benchmarks/test_scorer_overhead.py --benchmark-only
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
from datetime import date

import pytest
import torch
from baselines import full_row_losses
from conftest import DEVICE, DTYPE, MODELS, device_name, git_commit, versions
from report import out_dir

from ippo.kernels import InfluenceScorer, validation_gradients
from ippo.testing import lora_llama

ROUNDS = int(os.environ.get("IPPO_BENCH_ROUNDS", "5"))
EPISODES, TOKENS = (int(v) for v in os.environ.get("IPPO_BENCH_TOKENS", "8x128").split("x"))
OTHER_SCORERS = dict(item.split("=", 1) for item in os.environ.get("IPPO_BENCH_SCORERS", "").split(",") if item)
METHODS = ["plain", *(f"scorer ({name})" for name in OTHER_SCORERS), "scorer", "scorer, no LoRA grads"]
TIMES: dict[str, list[float]] = {}
STUDY = f"scorer overhead, smollm2-135m {EPISODES}x{TOKENS}, interleaved rounds"

pytestmark = pytest.mark.full


def scorer_class(method: str):
    if method in ("scorer", "scorer, no LoRA grads"):
        return InfluenceScorer
    name = method[len("scorer ("):-1]
    spec = importlib.util.spec_from_file_location(f"scorer_{name}", OTHER_SCORERS[name])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.InfluenceScorer


@pytest.fixture(scope="module")
def setup():
    hidden, inter, layers, heads, kv, vocab = MODELS["smollm2-135m"]
    torch.manual_seed(0)
    model = lora_llama(vocab, 16, hidden_size=hidden, num_layers=layers, intermediate_size=inter, num_heads=heads,
                       num_kv_heads=kv, dtype=DTYPE, device=DEVICE)
    input_ids = torch.randint(0, vocab, (EPISODES, TOKENS), device=DEVICE)
    advantages = torch.randn(EPISODES, device=DEVICE)
    val_loss = full_row_losses(model, input_ids[:2].roll(1, dims=1), torch.full((2,), 0.5, device=DEVICE)).sum()
    segment_ids = torch.arange(EPISODES, device=DEVICE)[:, None].expand_as(input_ids)
    return model, (input_ids, advantages), validation_gradients(model, val_loss), segment_ids, {}


def save() -> dict:
    """Per method: each round's time and its ratio to that round's plain run; the fastest-round and median ratios."""
    plain = TIMES.get("plain", [])
    summary = {}
    for method, times in TIMES.items():
        ratios = [t / p for t, p in zip(times, plain)]
        summary[method] = {"times_s": times, "ratio_per_round": ratios,
                           "ratio_of_fastest": min(times) / min(plain) if plain else None,
                           "median_ratio": statistics.median(ratios) if ratios else None}
    payload = {"device": device_name(), "date": date.today().isoformat(), "commit": git_commit(),
               "versions": versions(), "threads": torch.get_num_threads(),
               "shape": f"smollm2-135m {EPISODES}x{TOKENS} r16 {DTYPE}", "methods": summary}
    out = out_dir()
    out.mkdir(parents=True, exist_ok=True)
    (out / f"scorer_overhead_{DEVICE}.json").write_text(json.dumps(payload, indent=2))
    return summary


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("round_", range(ROUNDS))
def test_scorer_overhead(benchmark, setup, round_, method):
    model, (input_ids, advantages), val_grads, segment_ids, classes = setup
    if method != "plain" and method not in classes:
        classes[method] = scorer_class(method)

    def step():
        model.zero_grad(set_to_none=True)
        if method == "plain":
            full_row_losses(model, input_ids, advantages).sum().backward()
        else:
            with classes[method](model, val_grads, segment_ids, EPISODES,
                                 **({"lora_grads": False} if "no LoRA grads" in method else {})) as scorer:
                full_row_losses(model, input_ids, advantages).sum().backward()
            assert scorer.scores.shape == (EPISODES,)
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"round {round_}"
    benchmark.extra_info["study"] = STUDY  # the closing table: median over rounds of each round's ratio
    benchmark.pedantic(step, rounds=1, warmup_rounds=1 if round_ == 0 else 0, iterations=1)
    TIMES.setdefault(method, []).append(benchmark.stats.stats.min)
    summary = save()
    if round_ == ROUNDS - 1 and method == METHODS[-1]:
        for name, row in summary.items():
            print(f"{name}: x plain {row['ratio_of_fastest']:.4f} (fastest rounds), {row['median_ratio']:.4f} "
                  f"(median of per-round ratios {', '.join(f'{r:.3f}' for r in row['ratio_per_round'])})")
