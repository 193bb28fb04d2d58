"""Tables and figure of reports/does-the-filter-help from the sweeps' run files (config.json + metrics.jsonl copies).

    .venv/bin/python reports/does-the-filter-help/make_report.py

Reads ../compare-noise0, ../compare-noise0.3 (ppo and ippo x seeds 0-4, grpo x seeds 0-2), the random-keep
controls ../compare-noise0-randomkeep and ../compare-noise0.3-randomkeep (seeds 0-2), ../compare-sft-warmstart (the
SFT warm start of each seed, evaluated on the same 200 problems) and gsm8k-ippo/; writes summary.md (every number
the README quotes) and differences.png here. Intervals: mean over seeds and 95% Student t
(ippo.train.stats.mean_interval); a difference is paired by seed (same warm start, same eval problems).
"""

from __future__ import annotations

from pathlib import Path

from ippo.train import report
from ippo.train.compare import collect
from ippo.train.stats import mean_interval

HERE = Path(__file__).resolve().parent
SEEDS = {"ppo": [0, 1, 2, 3, 4], "ippo": [0, 1, 2, 3, 4], "grpo": [0, 1, 2], "sft": [0, 1, 2, 3, 4],
         "random": [0, 1, 2]}
ALGOS = ["ppo", "ippo", "grpo"]
ALL_SEEDS = sorted(set().union(*SEEDS.values()))
SWEEPS = {"reward noise 0": HERE.parent / "compare-noise0", "reward noise 0.3": HERE.parent / "compare-noise0.3"}
WARM_START = HERE.parent / "compare-sft-warmstart"
# the control for the scores (ippo --keep-by random): its ippo runs appear as algo "random"
CONTROL = {"reward noise 0": HERE.parent / "compare-noise0-randomkeep",
           "reward noise 0.3": HERE.parent / "compare-noise0.3-randomkeep"}
KEYS = {"accuracy": "sampled accuracy", "greedy_accuracy": "greedy accuracy", "majority": "majority vote",
        "unfaithful": "unfaithful rate"}
# (label, algo a, algo b): the paired differences a - b shown; "sft" = the warm start the RL runs start from
CONTRASTS = [("I-PPO - PPO", "ippo", "ppo"), ("I-PPO - random keep", "ippo", "random"),
             ("random keep - PPO", "random", "ppo"), ("GRPO - PPO", "grpo", "ppo"), ("PPO - warm start", "ppo", "sft"),
             ("I-PPO - warm start", "ippo", "sft"), ("random keep - warm start", "random", "sft"),
             ("GRPO - warm start", "grpo", "sft")]
NAMES = {"sft": "SFT warm start (no RL)", "random": "ippo --keep-by random (control)"}


def load() -> tuple[dict[str, dict], dict[str, str]]:
    """{sweep: {(algo, seed): run_result}} with the warm start's results as algo 'sft' in every sweep, and the
    runs left out, by name."""
    warm, problems = collect(WARM_START, ["sft"], SEEDS["sft"])
    sweeps = {}
    for label, folder in SWEEPS.items():
        results = dict(warm)
        for algo in ALGOS:
            found, missing = collect(folder, [algo], SEEDS[algo])
            results |= found
            problems |= {f"{folder.name}/{name}": why for name, why in missing.items()}
        if label in CONTROL:
            found, missing = collect(CONTROL[label], ["ippo"], SEEDS["random"])
            results |= {("random", seed): r for (_, seed), r in found.items()}
            problems |= {f"{CONTROL[label].name}/{name}": why for name, why in missing.items()}
        sweeps[label] = results
    return sweeps, problems


def difference(results: dict, a: str, b: str, key: str):
    values = [results[a, s][key] - results[b, s][key] for s in ALL_SEEDS
              if (a, s) in results and (b, s) in results and None not in (results[a, s][key], results[b, s][key])]
    return mean_interval(values) if values else None


def summary_md(sweeps: dict[str, dict], problems: dict[str, str]) -> str:
    lines = ["# Summary (written by make_report.py; do not edit)", "",
             "Final eval on 200 held-out arith problems (2 samples at temperature 0.6 + 1 greedy each); mean over "
             "seeds and 95% Student-t interval (n = seeds).", ""]
    for label, results in sweeps.items():
        lines += [f"## {label}", "", "| run | " + " | ".join(KEYS.values()) + " | mean kept | iterations | "
                  "train wall (s) |", "|---" * (len(KEYS) + 4) + "|"]
        for algo in ["sft"] + ALGOS + ["random"]:
            rows = [results[algo, s] for s in ALL_SEEDS if (algo, s) in results]
            if not rows:
                continue
            cells = [mean_interval([r[k] for r in rows if r[k] is not None]).format() for k in KEYS]
            kept = mean_interval([r["mean_kept"] for r in rows]).format(2) if algo in ("ippo", "random") else "-"
            its = "/".join(str(r["iterations"]) for r in rows)
            wall = "/".join(f"{r['wall']:.0f}" for r in rows) if algo != "sft" else "-"
            name = NAMES.get(algo, algo)
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {kept} | {its} | {wall} |")
        lines += ["", "Paired differences (same seed), mean and 95% interval:", "",
                  "| difference | " + " | ".join(KEYS.values()) + " |", "|---" * (len(KEYS) + 1) + "|"]
        for name, a, b in CONTRASTS:
            cells = [difference(results, a, b, k) for k in KEYS]
            if all(c is None for c in cells):
                continue
            lines.append(f"| {name} | " + " | ".join("-" if c is None else c.format() for c in cells) + " |")
        lines += ["", f"Per seed ({', '.join(map(str, ALL_SEEDS))}), sampled accuracy: " + "; ".join(
            f"{algo} " + " / ".join(f"{results[algo, s]['accuracy']:.3f}" if (algo, s) in results else "-"
                                    for s in ALL_SEEDS) for algo in ["sft"] + ALGOS + ["random"]), ""]
        lines += filter_lines(label)
    lines += gsm8k_lines()
    if problems:
        lines += ["Runs left out (missing or unusable):", ""] + [f"- {k}: {v}" for k, v in problems.items()] + [""]
    return "\n".join(lines)


def filter_lines(label: str) -> list[str]:
    """What I-PPO's filter did in the sweep ``label``, per run: the mean over iterations of the fraction of episodes
    with reward signal, of those kept, and the iterations that updated the policy."""
    lines = ["I-PPO's filter per run (means over iterations): signal = episodes of groups with two different rewards; "
             "kept; kept / signal over all iterations; iterations with an update (kept > 0):", "",
             "| run | signal | kept | kept / signal | iterations with an update |", "|---|---|---|---|---|"]
    folders = {"ippo": SWEEPS[label]} | ({"random": CONTROL[label]} if label in CONTROL else {})
    for algo, folder in folders.items():
        for seed in SEEDS[algo]:
            run = folder / f"ippo-seed{seed}"
            if not (run / "metrics.jsonl").exists():
                continue
            recs = [r for r in report.read_metrics(run) if "kept_fraction" in r]
            signal = sum(r["signal_fraction"] for r in recs) / len(recs)
            kept = sum(r["kept_fraction"] for r in recs) / len(recs)
            updates = sum(r["kept_fraction"] > 0 for r in recs)
            ratio = f"{kept / signal:.2f}" if signal else "-"
            lines.append(f"| {NAMES.get(algo, algo)} seed {seed} | {signal:.2f} | {kept:.2f} | {ratio} | "
                         f"{updates} of {len(recs)} |")
    return lines + [""]


def gsm8k_lines() -> list[str]:
    """The GSM8K run (gsm8k-ippo/): per iteration its reward, kept fraction and time split, and its evals."""
    run = HERE / "gsm8k-ippo"
    records = report.read_metrics(run)
    first = records[0]
    lines = ["## GSM8K, I-PPO, seed 0", "",
             f"Base model eval accuracy {first['eval_base_model']['accuracy']:.3f}, after the SFT warm start "
             f"({first['sft']['steps']} steps, final loss {first['sft']['final_loss']:.3f}) "
             f"{first['eval']['accuracy']:.3f} (greedy {first['eval']['greedy_accuracy']:.3f}) on "
             f"{first['eval']['n_questions']} problems.", "",
             "| iteration | mean reward | kept fraction | response tokens | rollout | log-probs | val_grad | scoring | "
             "update | eval accuracy (greedy) |", "|---" * 10 + "|"]
    for r in records[1:]:
        t = r["time"]
        ev = f"{r['eval']['accuracy']:.3f} ({r['eval']['greedy_accuracy']:.3f})" if "eval" in r else "-"
        lines.append(f"| {r['iteration']} | {r['reward']:.3f} | {r['kept_fraction']:.2f} | {r['response_len']:.0f} | "
                     + " | ".join(f"{t[k]:.0f} s" for k in ("rollout", "logprobs", "val_grad", "scoring", "update"))
                     + f" | {ev} |")
    return lines + [""]


def figure(sweeps: dict[str, dict], path: Path) -> None:
    """differences.png: the paired differences with their 95% intervals, one panel per accuracy metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["accuracy", "greedy_accuracy"]
    fig, axes = plt.subplots(1, len(keys), figsize=(10, 3.6), sharey=True)
    for ax, key in zip(axes, keys):
        for j, (label, results) in enumerate(sweeps.items()):
            for i, (_, a, b) in enumerate(CONTRASTS):
                d = difference(results, a, b, key)
                if d is None:
                    continue
                y = i + (0.15 if j else -0.15)
                ax.errorbar(d.mean, y, xerr=d.half_width or 0, fmt="o" if j else "s", color=f"C{j}", capsize=3,
                            label=label if i == 0 else None)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_yticks(range(len(CONTRASTS)), [c[0] for c in CONTRASTS])
        ax.invert_yaxis()
        ax.set_xlabel(f"{KEYS[key]}: difference, 95% t interval")
        ax.grid(alpha=0.3, axis="x")
    axes[0].legend(fontsize=8)
    fig.suptitle("paired differences, final eval on 200 held-out problems")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main() -> None:
    sweeps, problems = load()
    (HERE / "summary.md").write_text(summary_md(sweeps, problems), encoding="utf-8")
    figure(sweeps, HERE / "differences.png")
    print(f"wrote {HERE / 'summary.md'} and {HERE / 'differences.png'}")


if __name__ == "__main__":
    main()
