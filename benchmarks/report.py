"""Turn benchmark results (JSON from ``pytest benchmarks/ --benchmark-only``) into a markdown table and plots.

    python benchmarks/report.py [RESULTS_JSON ...] [--out DIR]

Ratios are to the plain forward+backward of the same configuration, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


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


def markdown_table(payload: dict) -> str:
    v = payload["versions"]
    lines = [f"Device: {payload['device']}; {payload['date']}; torch {v['torch']}, triton {v['triton']}, "
             f"transformers {v['transformers']}, CUDA {v['cuda']}", "",
             "| configuration | method | median time | x plain (fastest rounds) | peak memory x plain |",
             "|---|---|---|---|---|"]
    for config, method, median, ratio, memory, error in rows(payload):
        time_text = error or f"{median * 1e3:.1f} ms"
        lines.append(f"| {config} | {method} | {time_text} | {f'{ratio:.3f}' if ratio else '-'} | "
                     f"{f'{memory:.3f}' if memory else '-'} |")
    bandwidth = payload["configs"].get("kernel bandwidth", {})
    if "copy_GBps" in bandwidth:
        copy = bandwidth["copy_GBps"]
        lines += ["", f"Influence kernel alone, {16 * 512} bf16 tokens; device-to-device copy: {copy:.0f} GB/s",
                  "", "| backend (d_in, d_out, r) | time | GB/s | fraction of copy |", "|---|---|---|---|"]
        lines += [f"| {name} | {row['seconds'] * 1e6:.1f} us | {row['GBps']:.0f} | {row['GBps'] / copy:.2f} |"
                  for name, row in bandwidth.items() if name != "copy_GBps"]
    errors = payload["configs"].get("score error", {}).get("relative")
    if errors:
        lines += ["", "| method (dtype) | max relative score error vs float64 loop |", "|---|---|"]
        lines += [f"| {name} | {value:.2e} |" for name, value in errors.items()]
    return "\n".join(lines)


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
                        help="result JSON files (default: benchmarks/results/*.json)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results",
                        help="folder for tables and plots")
    args = parser.parse_args(argv)
    files = args.results or sorted((Path(__file__).parent / "results").glob("*.json"))
    if not files:
        parser.error("no result files: run `pytest benchmarks/ --benchmark-only` first")
    args.out.mkdir(parents=True, exist_ok=True)
    for file in files:
        payload = json.loads(file.read_text())
        (args.out / f"{file.stem}.md").write_text(markdown_table(payload) + "\n")
        plot(payload, args.out / f"{file.stem}_overhead.png")
        print(f"{file}: wrote {args.out / (file.stem + '.md')} and {args.out / (file.stem + '_overhead.png')}")


if __name__ == "__main__":
    main()
