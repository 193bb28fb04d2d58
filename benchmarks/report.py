"""Turn benchmark results (JSON from ``pytest benchmarks/ --benchmark-only``) into a markdown table and plots.

    python benchmarks/report.py [RESULTS_JSON ...] [--out DIR]

Ratios are to the plain forward+backward of the same configuration, measured in the same run. Default input and
output folder: ``out_dir()`` ($IPPO_BENCH_OUT, else runs/bench/, which git ignores); the committed record in
benchmarks/results/ is read or rewritten only when named.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def out_dir() -> Path:
    """Where benchmark results go: $IPPO_BENCH_OUT if set, else runs/bench/ at the repository root (untracked)."""
    return Path(os.environ.get("IPPO_BENCH_OUT") or ROOT / "runs" / "bench")


def ratio_rows(entries: list[dict], baseline: str = "plain"):
    """Rows (group, method, median time, x baseline of medians, x baseline of fastest, rounds) from timings
    ``{"group", "method", "round", "median", "min", "rounds"}``, each method against the ``baseline`` method of
    the same group. A group measured in interleaved rounds (several entries per method, told apart by "round")
    gets the median over rounds of each round's median / that round's baseline median; a group with one entry
    per method gets median / median. "Fastest" is min / min over all of the group's rounds. Groups without a
    baseline entry are left out."""
    groups: dict[str, dict[str, list[dict]]] = {}
    for entry in entries:
        groups.setdefault(entry["group"], {}).setdefault(entry["method"], []).append(entry)
    for group, methods in groups.items():
        base = {e["round"]: e for e in methods.get(baseline, [])}
        if not base:
            continue
        for method, runs in methods.items():
            paired = [e["median"] / base[e["round"]]["median"] for e in runs if e["round"] in base]
            fastest = min(e["min"] for e in runs) / min(e["min"] for e in base.values())
            yield (group, method, statistics.median(e["median"] for e in runs),
                   statistics.median(paired) if paired else None, fastest, sum(e["rounds"] for e in runs))


def ratio_table(entries: list[dict], baseline: str = "plain") -> str:
    lines = [f"| group | method | median time | x {baseline} (medians) | x {baseline} (fastest rounds) | rounds |",
             "|---|---|---|---|---|---|"]
    for group, method, median, ratio, fastest, rounds in ratio_rows(entries, baseline):
        time_text = f"{median * 1e3:.1f} ms" if median < 1 else f"{median:.3f} s"
        lines.append(f"| {group} | {method} | {time_text} | {f'{ratio:.3f}' if ratio else '-'} | {fastest:.3f} "
                     f"| {rounds} |")
    return "\n".join(lines)


def rows(payload: dict):
    """(config, method, median_s, time ratio, peak memory ratio or None, error or None) per measurement.
    The time ratio is of the fastest rounds (min / min): on a shared machine the minimum is the least
    disturbed by other work; the table shows medians too."""
    for config, result in payload["configs"].items():
        if "methods" not in result:
            continue
        methods = result["methods"]
        base = methods.get("plain", {})
        for method, row in methods.items():
            median = row.get("median_s")
            ratio = row["min_s"] / base["min_s"] if row.get("min_s") and base.get("min_s") else None
            memory = row["peak_bytes"] / base["peak_bytes"] if "peak_bytes" in row and "peak_bytes" in base else None
            yield config, method, median, ratio, memory, row.get("error")


def header(payload: dict) -> str:
    v = payload["versions"]
    commit = f"; commit {payload['commit']}" if payload.get("commit") else ""
    return (f"Device: {payload['device']}; {payload['date']}{commit}; torch {v['torch']}, triton {v['triton']}, "
            f"transformers {v['transformers']}, CUDA {v['cuda']}")


def markdown_table(payload: dict) -> str:
    lines = [header(payload), "",
             "| configuration | method | median time | x plain (fastest rounds) | peak memory x plain |",
             "|---|---|---|---|---|"]
    for config, method, median, ratio, memory, error in rows(payload):
        time_text = error or f"{median * 1e3:.1f} ms"
        lines.append(f"| {config} | {method} | {time_text} | {f'{ratio:.3f}' if ratio else '-'} | "
                     f"{f'{memory:.3f}' if memory else '-'} |")
    return "\n\n".join(["\n".join(lines), *other_tables(payload, memory=False)])


def other_tables(payload: dict, memory: bool = True) -> list[str]:
    """Markdown tables of what is measured against other baselines: peak memory x plain (CUDA; if ``memory``),
    the influence kernel's bandwidth as a fraction of a device-to-device copy's (CUDA), and the score errors
    against the float64 per-episode loop."""
    tables = []
    peaks = [(config, method, ratio) for config, method, _, _, ratio, _ in rows(payload) if ratio]
    if memory and peaks:
        tables.append("\n".join(["| configuration | method | peak memory x plain |", "|---|---|---|",
                                  *(f"| {config} | {method} | {ratio:.3f} |" for config, method, ratio in peaks)]))
    bandwidth = payload["configs"].get("kernel bandwidth", {})
    if "copy_GBps" in bandwidth:
        copy = bandwidth["copy_GBps"]
        tables.append("\n".join([
            f"Influence kernel alone, {16 * 512} bf16 tokens; device-to-device copy: {copy:.0f} GB/s", "",
            "| backend (d_in, d_out, r) | time | GB/s | fraction of copy |", "|---|---|---|---|",
            *(f"| {name} | {row['seconds'] * 1e6:.1f} us | {row['GBps']:.0f} | {row['GBps'] / copy:.2f} |"
              for name, row in bandwidth.items() if name != "copy_GBps")]))
    errors = payload["configs"].get("score error", {}).get("relative")
    if errors:
        tables.append("\n".join(["| method (dtype) | max relative score error vs float64 loop |", "|---|---|",
                                  *(f"| {name} | {value:.2e} |" for name, value in errors.items())]))
    return tables


def plot(payload: dict, path: Path) -> None:
    """Ratio to plain vs tokens per batch, one line per method (configurations of the default rank)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for config, method, _, ratio, _, _ in rows(payload):
        result = payload["configs"][config]
        if ratio and method != "plain" and result["rank"] == 16:
            series.setdefault((method, result["model"]), []).append((result["episodes"] * result["tokens"], ratio))
    methods = sorted({method for method, _ in series})
    models = sorted({model for _, model in series})
    fig, ax = plt.subplots(figsize=(8, 5))
    for (method, model), points in sorted(series.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], color=f"C{methods.index(method)}",
                marker="os^vD"[models.index(model) % 5], linestyle=["-", "--", ":", "-."][models.index(model) % 4],
                label=f"{method} ({model})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xlabel("tokens per batch (B x T)")
    ax.set_ylabel("time / plain forward+backward")
    ax.set_title(f"Per-episode influence scores: overhead over plain training\n{payload['device']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="*", type=Path,
                        help=f"result JSON files (default: the cpu.json / cuda.json in {out_dir()})")
    parser.add_argument("--out", type=Path, default=out_dir(), help=f"folder for tables and plots ({out_dir()})")
    args = parser.parse_args(argv)
    files = args.results or [p for p in (out_dir() / "cpu.json", out_dir() / "cuda.json") if p.exists()]
    if not files:
        parser.error(f"no result files in {out_dir()}: run `pytest benchmarks/ --benchmark-only` first")
    args.out.mkdir(parents=True, exist_ok=True)
    for file in files:
        payload = json.loads(file.read_text())
        if "configs" not in payload:
            print(f"{file}: not a results file of test_methods.py (no 'configs'), skipped")
            continue
        (args.out / f"{file.stem}.md").write_text(markdown_table(payload) + "\n")
        plot(payload, args.out / f"{file.stem}_overhead.png")
        print(f"{file}: wrote {args.out / (file.stem + '.md')} and {args.out / (file.stem + '_overhead.png')}")


if __name__ == "__main__":
    main()
