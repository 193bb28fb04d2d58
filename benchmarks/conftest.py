"""Shared set-up for the benchmarks: Llama-shaped random-init models with peft LoRA, and a results table.

Every ratio is taken against the plain forward+backward measured in the same session, on the same device.
Results are printed at the end and written to benchmarks/results/<device>.json.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")

RESULTS: dict[str, dict] = {}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# name: (hidden, intermediate, layers, heads, kv heads, vocab, batch B, tokens T, dtype)
SHAPES = {
    "cpu-tiny": (128, 344, 2, 4, 2, 1024, 8, 64, torch.float32),
    "smollm2-135m": (576, 1536, 30, 9, 3, 49152, 16, 512, torch.bfloat16),
    "qwen2.5-1.5b": (1536, 8960, 28, 12, 2, 151936, 16, 512, torch.bfloat16),
}


def shapes_for_device() -> list[str]:
    return ["smollm2-135m", "qwen2.5-1.5b"] if DEVICE == "cuda" else ["cpu-tiny"]


def device_name() -> str:
    return torch.cuda.get_device_name() if DEVICE == "cuda" else f"cpu ({platform.processor() or platform.machine()})"


def record(shape: str, method: str, benchmark, **extra) -> None:
    RESULTS.setdefault(shape, {})[method] = {"median_s": benchmark.stats.stats.median, **extra}


def pytest_terminal_summary(terminalreporter):
    if not RESULTS:
        return
    write = terminalreporter.write_line
    write(f"\ninfluence overhead on {device_name()}, torch {torch.__version__} (ratios vs plain fwd+bwd, same run)")
    for shape, methods in RESULTS.items():
        plain = methods.get("plain", {}).get("median_s")
        for method, row in methods.items():
            ratio = f"{row['median_s'] / plain:7.3f}x" if plain else "   n/a"
            memory = f"{row['peak_mem_ratio']:.3f}x mem" if "peak_mem_ratio" in row else ""
            write(f"  {shape:14s} {method:22s} {row['median_s'] * 1e3:10.2f} ms {ratio} {memory}")
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    payload = {"device": device_name(), "torch": torch.__version__, "results": RESULTS}
    (out / f"{DEVICE}.json").write_text(json.dumps(payload, indent=2))


@pytest.fixture(scope="session")
def results():
    return RESULTS
