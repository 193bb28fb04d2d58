"""Benchmark set-up: Llama-shaped random-init models with peft LoRA r on all projections, the opt-in to the long
studies, the results folder and the closing table of ratios.

    pytest benchmarks/ --benchmark-only                     # default: small, ~1 minute on 2 CPU cores
    IPPO_BENCH_FULL=1 pytest benchmarks/ --benchmark-only   # also the long studies (what run_gpu.sh runs)

Default set: on CPU the configurations ``cpu-small B8 T64`` and ``cpu-smollm2-width B8 T64`` (SmolLM2-135M's
layer widths, 2 layers) with every method, and the score-error check; on CUDA ``smollm2-135m B16 T512`` and the
kernel bandwidth. The long studies carry the marker ``full`` and are skipped, with the reason, unless
``IPPO_BENCH_FULL=1``: on CPU the T = 32 / 128 configurations and the scorer-overhead study at the full
SmolLM2-135M shape (test_scorer_overhead.py, minutes of CPU: ~7 s a forward+backward on one core); on CUDA the
Qwen2.5-1.5B shape, B = 64, and the sweeps over T and r (bf16), and the scorer-overhead study.
``IPPO_BENCH_CONFIGS="name,name"`` runs exactly the configurations named (full or not) instead.

On CPU torch uses 1 thread unless OMP_NUM_THREADS is set: on a shared 2-core machine 2 threads made a step of
the small model up to 40x slower and erratic (and the committed pytest-benchmark CPU numbers were measured
with 1 thread). With 1 thread the timer is the process's CPU time (``time.process_time``) unless
``--benchmark-timer`` is given: on the shared 2-core machine, with wall-clock time the plain baseline (run first)
and the methods after it met different loads and the ratios were noise (a per-episode loop at 1.02x plain, most
methods below 1x); with CPU time they came out near RESULTS.md's CPU tables, moving by up to 0.12x between two
runs at load average 6 (other jobs still share caches and memory bandwidth: a ratio needs several runs, or an
idle machine).

Every ratio is against the plain forward+backward measured in the same session on the same device. At the end
of the session a table gives, per group (configuration, or study of interleaved rounds), each method's median
time over the plain one's (pytest-benchmark's own table gives absolute times); the score errors against the
float64 loop and (CUDA) peak memory and kernel bandwidth follow. Results go to $IPPO_BENCH_OUT/ if set, else to
runs/bench/ (git-ignored): <device>.json (rewritten after every measurement, so a run stopped by a time limit
keeps what it measured), <device>_ratios.md (the closing table), scorer_overhead_<device>.json. The files in
benchmarks/results/ are the committed record cited by RESULTS.md and are written only if IPPO_BENCH_OUT names
that folder. ``python benchmarks/report.py`` turns <device>.json into a table and a plot.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from datetime import date
from functools import cache
from pathlib import Path

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
os.environ.setdefault("TRITON_INTERPRET", "0" if DEVICE == "cuda" else "1")
if DEVICE == "cpu" and not os.environ.get("OMP_NUM_THREADS"):
    torch.set_num_threads(1)
FULL = os.environ.get("IPPO_BENCH_FULL", "") not in ("", "0")

from baselines import full_row_losses  # noqa: E402
from report import header, other_tables, out_dir, ratio_table  # noqa: E402

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
    DEFAULT_CONFIGS = {"smollm2-135m B16 T512"}
    DTYPE = torch.bfloat16
else:
    CONFIGS = {f"cpu-small B8 T{t}": ("cpu-small", 8, t, 16) for t in (32, 64, 128)}
    CONFIGS["cpu-smollm2-width B8 T64"] = ("cpu-smollm2-width", 8, 64, 16)
    DEFAULT_CONFIGS = {"cpu-small B8 T64", "cpu-smollm2-width B8 T64"}
    DTYPE = torch.float32
if os.environ.get("IPPO_BENCH_CONFIGS"):  # comma-separated subset, e.g. for a rerun with less device time
    wanted = [c.strip() for c in os.environ["IPPO_BENCH_CONFIGS"].split(",")]
    unknown = [c for c in wanted if c not in CONFIGS]
    if unknown:
        raise ValueError(f"IPPO_BENCH_CONFIGS: unknown configurations {unknown}; known: {list(CONFIGS)}")
    CONFIGS = {c: CONFIGS[c] for c in wanted}
    DEFAULT_CONFIGS = set(wanted)  # named, so run without IPPO_BENCH_FULL
RESULTS: dict[str, dict] = {}
RUN = {"timer": None}  # pytest-benchmark's timer of this session (pytest_configure)
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


def config_params() -> list:
    """CONFIGS as pytest parameters, the ones outside the default set marked ``full``."""
    return [c if c in DEFAULT_CONFIGS else pytest.param(c, marks=pytest.mark.full) for c in CONFIGS]


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


@cache
def git_commit() -> str | None:
    """The commit measured: HEAD, with "+changes" if tracked files differ from it (None outside a checkout)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True,
                              check=True).stdout.strip()
    try:
        return git("rev-parse", "--short", "HEAD") + ("+changes" if git("status", "--porcelain", "-uno") else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def results_payload() -> dict:
    return {"device": device_name(), "date": date.today().isoformat(), "commit": git_commit(),
            "threads": torch.get_num_threads(), "timer": RUN["timer"], "versions": versions(), "configs": RESULTS}


def save_results() -> Path:
    """Write what has been measured so far (after every measurement: a run stopped by a time limit keeps it)."""
    out = out_dir()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{DEVICE}.json"
    path.write_text(json.dumps(results_payload(), indent=2))
    return path


def pytest_configure(config):
    config.addinivalue_line("markers", "full: a long study, run only with IPPO_BENCH_FULL=1 (benchmarks/conftest.py)")
    # Runs before pytest-benchmark's own pytest_configure (trylast), which reads the option.
    given = " ".join([*config.invocation_params.args, os.environ.get("PYTEST_ADDOPTS", "")])
    if DEVICE == "cpu" and torch.get_num_threads() == 1 and "--benchmark-timer" not in given:
        config.option.benchmark_timer = "time.process_time"
    RUN["timer"] = str(config.getoption("benchmark_timer", None))


def pytest_collection_modifyitems(config, items):
    if FULL:
        return
    skip = pytest.mark.skip(reason="long study: set IPPO_BENCH_FULL=1 to run it (benchmarks/conftest.py)")
    for item in items:
        if "full" in item.keywords:
            item.add_marker(skip)


def benchmark_timings(config) -> list[dict]:
    """Each finished benchmark of the session as {group, method, round, median, min, rounds}, from
    pytest-benchmark's stats. The method is the test's ``method`` parameter (else its name); a benchmark with
    ``extra_info["study"]`` is one round (its group) of that study."""
    timings = []
    for bench in getattr(getattr(config, "_benchmarksession", None), "benchmarks", []):
        if not bench:  # no stats: failed or skipped inside the measurement
            continue
        study = bench.extra_info.get("study")
        timings.append({"group": study or bench.group or "(no group)", "round": bench.group if study else None,
                        "method": (bench.params or {}).get("method", bench.name), "median": bench.stats.median,
                        "min": bench.stats.min, "rounds": bench.stats.rounds})
    return timings


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's table of absolute times
def pytest_terminal_summary(terminalreporter, config):
    timings = benchmark_timings(config)
    if not timings and not RESULTS:
        return
    out = out_dir()
    if RESULTS:
        save_results()
    payload = results_payload()
    text = "\n\n".join([header(payload) + f"; torch threads {payload['threads']}; timer {payload['timer']}",
                         "Time x plain forward+backward (same run, same device):\n\n" + ratio_table(timings),
                         *other_tables(payload)])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{DEVICE}_ratios.md").write_text(text + "\n")
    terminalreporter.write_sep("=", "ratios to the plain forward+backward")
    terminalreporter.write_line(text)
    terminalreporter.write_line(f"\nresults written to {out}/")
