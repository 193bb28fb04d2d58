"""Issue 19 step 4: the test bed's training comparison, one summary.md and its figures from the runs' own files.

    .venv/bin/python reports/testbed-comparison/make_report.py [RUNS_ROOT]   # copies finished runs, then writes

RUNS_ROOT (default runs/testbed-comparison): the folder run.sh writes (``<root>/noise<N>/<arm>-seed<s>/``). Each
finished run's config.json and metrics.jsonl are copied into ``noise<N>/<arm>-seed<s>/`` here (checkpoints are
not); a run still training or killed before its final eval is not copied, so every number below is of a finished
run. The tables are `ippo compare`'s own (``compare.stats_tables``, ``compare.runs_table``): per arm the mean and
95% t interval over seeds of the final eval, the paired differences vs grpo (same seed: same warm start, same eval
problems) and between the filtered arms (``contrasts_table``); ``noise<N>/accuracy_vs_wall.png`` per noise level;
``paired.png``: the paired differences vs grpo of both noise levels side by side.
"""

from __future__ import annotations

import json
import re
import shutil
import statistics
import sys
from pathlib import Path

from ippo.train import compare, report
from ippo.train.stats import mean_interval, t_test

HERE = Path(__file__).parent
ARMS = ["grpo", "ippo", "ippo:score=centred", "ippo:keep_by=random"]
RUN = re.compile(r"(?P<arm>.+)-seed(?P<seed>\d+)$")


def finished(run: Path) -> bool:
    """The run's last metrics record is its final eval: an eval past iteration 0 that ends the run (the wall
    budget, its last iteration, or a stop)."""
    config = run / "config.json"
    if not ((run / "metrics.jsonl").is_file() and config.is_file()):
        return False
    lines = report.read_metrics(run)  # a torn last line (still writing) is left out
    if not lines:
        return False
    last, iterations = lines[-1], json.loads(config.read_text())["iterations"]
    ends = "stopped_by" in last or last["iteration"] == iterations or last.get("early_stop")
    return last["iteration"] > 0 and "eval" in last and bool(ends)


def copy_finished(root: Path) -> None:
    for run in sorted(root.glob("noise*/*-seed*")):
        if finished(run):
            dest = HERE / run.parent.name / run.name
            dest.mkdir(parents=True, exist_ok=True)
            for name in ("config.json", "metrics.jsonl"):
                shutil.copy2(run / name, dest / name)


def seeds_of(folder: Path) -> list[int]:
    return sorted({int(m["seed"]) for p in folder.iterdir() if (m := RUN.match(p.name))})


def paired_diffs(results: dict, a: str, b: str, key: str, seeds: list[int]) -> list[float]:
    """``key`` of arm ``a`` minus that of arm ``b``, per seed where both finished."""
    return [results[a, s][key] - results[b, s][key] for s in seeds if (a, s) in results and (b, s) in results]


def per_seed_table(results: dict, seeds: list[int]) -> str:
    """Markdown: each seed's paired difference vs grpo of the final sampled accuracy, per arm."""
    lines = ["Per seed, final sampled accuracy: arm - grpo.", "",
             "| seed | " + " | ".join(f"{a} - grpo" for a in ARMS[1:]) + " |", "|---" * len(ARMS) + "|"]
    for s in seeds:
        cells = [f"{d[0]:+.3f}" if (d := paired_diffs(results, a, "grpo", "accuracy", [s])) else "-"
                 for a in ARMS[1:]]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


CONTRASTS = [(arm, "grpo") for arm in ARMS[1:]] + [
    ("ippo", "ippo:keep_by=random"), ("ippo:score=centred", "ippo:keep_by=random"), ("ippo:score=centred", "ippo")]


def contrasts_table(results: dict, seeds: list[int], levels: int) -> str:
    """Markdown: the paired differences (same seed) of each contrast: an arm against grpo, a score against random
    keep (does the score choose better than chance at the same kept fraction?), centred against raw (which score
    should be the default?). Mean and 95% t interval of the sampled and greedy accuracy; for the sampled one, the
    one-sample t test's t and two-sided p, p times the number of contrasts over the ``levels`` noise levels
    (Bonferroni, capped at 1), the seeds in which the first arm is ahead and the lowest and highest mean with one
    seed left out (does one seed carry the mean?)."""
    total = len(CONTRASTS) * levels
    lines = ["Paired differences (same seed), mean and 95% interval; t test of the sampled accuracy's differences "
             f"(p two-sided; Bonferroni: p x {total}, the contrasts of every noise level):", "",
             f"| contrast | accuracy (sampled) | greedy accuracy | t | p | p x {total} | seeds ahead | "
             "one seed left out |", "|---|---|---|---|---|---|---|---|"]
    for a, b in CONTRASTS:
        diffs = {key: paired_diffs(results, a, b, key, seeds) for key in ("accuracy", "greedy_accuracy")}
        cells = [mean_interval(d).format(3) if d else "-" for d in diffs.values()]
        d = diffs["accuracy"]
        if len(d) > 1 and len(set(d)) > 1:
            t, p = t_test(d)
            cells += [f"{t:+.2f}", f"{p:.3f}", f"{min(1.0, p * total):.2f}"]
        else:
            cells += ["-"] * 3
        cells.append(f"{sum(x > 0 for x in d)} of {len(d)}")
        left_out = [statistics.fmean(d[:i] + d[i + 1:]) for i in range(len(d))] if len(d) > 1 else []
        cells.append(f"{min(left_out):+.3f} to {max(left_out):+.3f}" if left_out else "-")
        lines.append(f"| {a} - {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_paired(results: dict[str, dict], seeds: dict[str, list[int]]) -> str:
    """paired.png: per noise level and arm, the paired difference vs grpo (final eval, sampled and greedy) of each
    seed (dots) and its mean with a 95% t interval (bar)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = ARMS[1:]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, key in zip(axes, ("accuracy", "greedy_accuracy")):
        for n_index, (noise, res) in enumerate(sorted(results.items())):
            for a_index, arm in enumerate(others):
                diffs = paired_diffs(res, arm, "grpo", key, seeds[noise])
                if not diffs:
                    continue
                x = a_index + (n_index - 0.5) * 0.3
                ax.plot([x] * len(diffs), diffs, "o", color=f"C{n_index}", ms=3, alpha=0.5)
                if len(diffs) > 1:
                    ci = mean_interval(diffs)
                    ax.errorbar(x, ci.mean, yerr=ci.half_width, fmt="s", color=f"C{n_index}", capsize=4,
                                label=f"{noise} (n={len(diffs)})" if a_index == 0 else None)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(range(len(others)), [f"{a} - grpo" for a in others], fontsize=7)
        ax.set_ylabel(f"final {key.replace('_', ' ')}: arm - grpo")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, title="reward noise", title_fontsize=7)
    fig.suptitle("paired differences vs grpo per seed (dots), mean and 95% t interval")
    fig.tight_layout()
    fig.savefig(HERE / "paired.png", dpi=80)
    plt.close(fig)
    return "paired.png"


def main(argv: list[str]) -> None:
    root = Path(argv[0]) if argv else Path("runs/testbed-comparison")
    if root.is_dir():
        copy_finished(root)
    lines = ["# I-PPO vs GRPO on the test bed: summary", "",
             "Generated by `make_report.py` from the finished runs' metrics.jsonl in `noise*/`; see README.md for "
             "the setting and the conclusion.", ""]
    results, seeds = {}, {}
    folders = sorted(HERE.glob("noise*"))
    levels = len(folders)
    for folder in folders:
        noise = folder.name.removeprefix("noise")
        seeds[noise] = seeds_of(folder)
        results[noise], problems = compare.collect(folder, ARMS, seeds[noise])
        pending = [name for name in problems if not (folder / name).exists()]  # not copied: not finished yet
        problems = {name: why for name, why in problems.items() if name not in pending}
        lines += [f"## reward noise {noise}: seeds {', '.join(map(str, seeds[noise]))}", "",
                  compare.stats_tables(results[noise], ARMS, seeds[noise])]
        if pending:
            lines += [f"Not finished yet (left out): {', '.join(pending)}.", ""]
        if problems:
            lines += ["Unusable runs (left out):", ""] + [f"- {name}: {why}" for name, why in problems.items()] + [""]
        lines += [contrasts_table(results[noise], seeds[noise], levels), per_seed_table(results[noise], seeds[noise]),
                  "Per run (final eval):", "",
                  compare.runs_table(results[noise])]
        plot = compare.plot_accuracy_vs_wall(folder, {job: folder / compare.run_name(*job)
                                                      for job in results[noise]}, ARMS)
        lines += [f"![{folder.name}/{plot}]({folder.name}/{plot})", ""]
    if results:
        lines += [f"![paired differences]({plot_paired(results, seeds)})", ""]
    (HERE / "summary.md").write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {HERE / 'summary.md'}")


if __name__ == "__main__":
    main(sys.argv[1:])
