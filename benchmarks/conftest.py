"""Benchmark set-up: Llama-shaped random-init models with peft LoRA r on all projections, and the results file.

Configurations are chosen by device: small ones on CPU; on CUDA the SmolLM2-135M and Qwen2.5-1.5B shapes
and sweeps over T, B and r (bf16). Every ratio is against the plain forward+backward measured in the same
session on the same device. Results go to benchmarks/results/<device>.json (or $IPPO_BENCH_OUT/), and
``python benchmarks/report.py`` turns them into a table and plots.
"""

from __future__ import annotations

import json
import os
import platform
from datetime import date
from pathlib import Path

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
os.environ.setdefault("TRITON_INTERPRET", "0" if DEVICE == "cuda" else "1")

from baselines import full_row_losses  # noqa: E402

from ippo.kernels import validation_gradients  # noqa: E402
from ippo.testing import lora_llama  # noqa: E402

# model shapes: (hidden, intermediate, layers, heads, kv heads, vocab)
MODELS = {
    "cpu-small": (128, 344, 2, 4, 2, 1024),
    "cpu-smollm2-width": (576, 1536, 2, 9, 3, 4096),  # SmolLM2-135M's layer widths, 2 layers, small vocab
    "smollm2-135m": (576, 1536, 30, 9, 3, 49152),
    "qwen2.5-1.5b": (1536, 8960, 28, 12, 2, 151936),
}
# configuration name: (model, episodes B, tokens T, LoRA rank r)
if DEVICE == "cuda":
    CONFIGS = {"smollm2-135m B16 T512": ("smollm2-135m", 16, 512, 16),
               "qwen2.5-1.5b B16 T512": ("qwen2.5-1.5b", 16, 512, 16),
               "smollm2-135m B64 T512": ("smollm2-135m", 64, 512, 16),
               "qwen2.5-1.5b B64 T512": ("qwen2.5-1.5b", 64, 512, 16)}
    CONFIGS.update({f"smollm2-135m B8 T{t}": ("smollm2-135m", 8, t, 16) for t in (256, 1024, 2048, 4096)})
    CONFIGS.update({f"smollm2-135m B16 T512 r{r}": ("smollm2-135m", 16, 512, r) for r in (8, 64)})
    DTYPE = torch.bfloat16
else:
    CONFIGS = {f"cpu-small B8 T{t}": ("cpu-small", 8, t, 16) for t in (32, 64, 128)}
    CONFIGS["cpu-smollm2-width B8 T64"] = ("cpu-smollm2-width", 8, 64, 16)
    DTYPE = torch.float32
if os.environ.get("IPPO_BENCH_CONFIGS"):  # comma-separated subset, e.g. for a rerun with less device time
    wanted = [c.strip() for c in os.environ["IPPO_BENCH_CONFIGS"].split(",")]
    unknown = [c for c in wanted if c not in CONFIGS]
    if unknown:
        raise ValueError(f"IPPO_BENCH_CONFIGS: unknown configurations {unknown}; known: {list(CONFIGS)}")
    CONFIGS = {c: CONFIGS[c] for c in wanted}
RESULTS: dict[str, dict] = {}
_SETUPS: dict[str, tuple] = {}


def setup(config: str):
    """(model, batch, val_grads) for a configuration, cached: one model at a time stays in memory."""
    if config not in _SETUPS:
        _SETUPS.clear()
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        name, episodes, tokens, rank = CONFIGS[config]
        hidden, inter, layers, heads, kv, vocab = MODELS[name]
        torch.manual_seed(0)
        model = lora_llama(vocab, rank, hidden_size=hidden, num_layers=layers, intermediate_size=inter,
                           num_heads=heads, num_kv_heads=kv, dtype=DTYPE, device=DEVICE)
        input_ids = torch.randint(0, vocab, (episodes, tokens), device=DEVICE)
        advantages = torch.randn(episodes, device=DEVICE)
        val_ids = input_ids[:2].roll(1, dims=1)
        val_loss = full_row_losses(model, val_ids, torch.full((2,), 0.5, device=DEVICE)).sum()  # mean NLL
        _SETUPS[config] = (model, (input_ids, advantages), validation_gradients(model, val_loss))
        RESULTS.setdefault(config, {"model": name, "episodes": episodes, "tokens": tokens, "rank": rank,
                                    "dtype": str(DTYPE), "methods": {}})
    return _SETUPS[config]


def device_name() -> str:
    return torch.cuda.get_device_name() if DEVICE == "cuda" else f"cpu ({platform.machine()}, {os.cpu_count()} cores)"


def versions() -> dict:
    import transformers
    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "cuda": torch.version.cuda}
    try:
        import triton
        versions["triton"] = triton.__version__
    except ImportError:
        versions["triton"] = None
    return versions


def results_payload() -> dict:
    return {"device": device_name(), "date": date.today().isoformat(), "versions": versions(), "configs": RESULTS}


def save_results() -> Path:
    """Write what has been measured so far (after every measurement: a run stopped by a time limit keeps it)."""
    out = Path(os.environ.get("IPPO_BENCH_OUT", Path(__file__).parent / "results"))
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{DEVICE}.json"
    path.write_text(json.dumps(results_payload(), indent=2))
    return path


def pytest_terminal_summary(terminalreporter):
    if not RESULTS:
        return
    path = save_results()
    from report import markdown_table

    terminalreporter.write_line("\n" + markdown_table(results_payload()))
    terminalreporter.write_line(f"results written to {path}")
