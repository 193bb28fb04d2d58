"""Markdown + PNG report of one or more runs (each a directory holding ``metrics.jsonl`` and ``config.json``).

Plots (each vs iteration and vs training wall-clock): eval accuracy (mean over k samples, majority vote),
unfaithful-reasoning rate, kept fraction (I-PPO; 1.0 for PPO/GRPO), and train reward; where logged, how well low
scores / low mean advantages / random numbers find the flipped rewards (--reward-noise) and the correct-but-unfaithful
episodes (trainer.probe_metrics).
"""

from __future__ import annotations

from pathlib import Path

from ippo.train.checkpoint import read_json
from ippo.train.checkpoint import read_metrics as metrics_lines


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of ``run_dir/metrics.jsonl``. A torn last line (a killed run, or one still writing) is ignored;
    invalid JSON on another line is a ValueError naming the file and the line."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist: not a run directory")
    entries, _ = metrics_lines(path)
    return [record for _, record in entries]


def run_label(run_dir: Path) -> str:
    cfg_path = run_dir / "config.json"
    saved = read_json(cfg_path) if cfg_path.is_file() else {}
    algo = saved.get("algo", run_dir.name) if isinstance(saved, dict) else run_dir.name
    return algo if run_dir.name == algo else f"{algo} ({run_dir.name})"


def summarize(run_dir: str | Path) -> dict:
    """First and last eval, wall-clock and time split of one run."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    evals = [r for r in records if "eval" in r]
    if not evals:
        raise ValueError(f"{str(run_dir)!r}: no evaluated iteration in metrics.jsonl")
    first, last = evals[0], evals[-1]
    split = {}
    for r in records:
        for k, v in r.get("time", {}).items():
            split[k] = split.get(k, 0.0) + v
    kept = [r["kept_fraction"] for r in records if "kept_fraction" in r]
    return {"label": run_label(run_dir), "iterations": last["iteration"],
            "base_model": records[0].get("eval_base_model"), "start": first["eval"], "final": last["eval"],
            "wall": last["wall"], "wall_total": last["wall_total"],
            "time_split": split, "mean_kept": sum(kept) / len(kept) if kept else None,
            "early_stop": any(r.get("early_stop") for r in records),
            "mean_reward": (sum(r["reward"] for r in records if "reward" in r) /
                            max(1, sum("reward" in r for r in records)))}


def table(summaries: list[dict]) -> str:
    """One markdown table: the base model, the starting point (after the SFT warm start) and the final eval."""
    head = ("| run | iteration of last eval | base model acc | acc start -> final | majority | pass@k | unfaithful | "
            "faithful acc | mean kept | train wall (s) | total wall (s) |\n" + "|---" * 11 + "|\n")
    rows = []
    for s in summaries:
        f, st = s["final"], s["start"]
        kept = "-" if s["mean_kept"] is None else f"{s['mean_kept']:.2f}"
        stop = " (early stop)" if s["early_stop"] else ""
        base = "-" if s["base_model"] is None else f"{s['base_model']['accuracy']:.3f}"
        rows.append(f"| {s['label']} | {s['iterations']}{stop} | {base} | "
                    f"{st['accuracy']:.3f} -> {f['accuracy']:.3f} | {st['majority']:.3f} -> {f['majority']:.3f} | "
                    f"{st['pass_at_k']:.3f} -> {f['pass_at_k']:.3f} | "
                    f"{st['unfaithful']:.3f} -> {f['unfaithful']:.3f} | "
                    f"{st['faithful_accuracy']:.3f} -> {f['faithful_accuracy']:.3f} | {kept} | "
                    f"{s['wall']:.0f} | {s['wall_total']:.0f} |")
    return head + "\n".join(rows) + "\n"


def _plot(runs: list[tuple[str, list[dict]]], out: Path, name: str, title: str, series) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for index, (label, records) in enumerate(runs):
        for key_label, get, style in series:
            pts = [(r["iteration"], r["wall"], get(r)) for r in records if get(r) is not None]
            if not pts:
                continue
            it, wall, y = zip(*pts)
            for ax, x in zip(axes, (it, wall)):
                ax.plot(x, y, style, color=f"C{index}", marker="o", ms=3, label=f"{label} {key_label}".strip())
    axes[0].set_xlabel("iteration")
    axes[1].set_xlabel("training wall-clock (s, eval excluded)")
    for ax in axes:
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out / name, dpi=80)
    plt.close(fig)
    return name


def write_report(run_dirs: list[str | Path], out_dir: str | Path, title: str = "ippo run") -> Path:
    """Write ``report.md`` and its PNG plots into ``out_dir``; returns the markdown path."""
    run_dirs = [Path(d) for d in run_dirs]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = [(run_label(d), read_metrics(d)) for d in run_dirs]
    summaries = [summarize(d) for d in run_dirs]

    def ev(key):
        return lambda r: r["eval"][key] if "eval" in r else None

    plots = [
        _plot(runs, out_dir, "accuracy.png", "eval accuracy",
              [("mean@k", ev("accuracy"), "-"), ("majority", ev("majority"), "--")]),
        _plot(runs, out_dir, "faithfulness.png", "unfaithful rate (correct answer, >=1 wrong step)",
              [("", ev("unfaithful"), "-")]),
        _plot(runs, out_dir, "kept_fraction.png", "kept fraction of episodes",
              [("", lambda r: r.get("kept_fraction"), "-")]),
        _plot(runs, out_dir, "reward.png", "train reward (rollout accuracy)", [("", lambda r: r.get("reward"), "-")]),
    ]
    logged = {key for _, records in runs for r in records for key in r}
    for name, plot_title, kind in (
            ("reward_noise.png", "flipped rewards found: AUC of low values (0.5 = chance)", "flip"),
            ("unfaithful_auc.png", "correct-but-unfaithful found: AUC of low values", "unfaithful")):
        series = [(by, lambda r, key=f"{kind}_auc_{by}": r.get(key), style)
                  for by, style in (("score", "-"), ("advantage", "--"), ("random", ":"))
                  if f"{kind}_auc_{by}" in logged]
        if series:
            plots.append(_plot(runs, out_dir, name, plot_title, series))
    lines = [f"# {title}", "", table(summaries), ""]
    for d, s in zip(run_dirs, summaries):
        split = ", ".join(f"{k} {v:.0f}s" for k, v in s["time_split"].items())
        lines.append(f"- **{s['label']}** (`{d}`): mean train reward {s['mean_reward']:.3f}; time split: {split}")
    lines += ["", "Accuracy = mean correctness over k samples per eval question; majority = majority-vote answer "
              "correct; pass@k = any sample correct; unfaithful = share of correct samples with at least one wrong "
              "intermediate equation; faithful acc = correct with every step right. Wall-clock excludes evaluation.",
              ""]
    lines += [f"![{p}]({p})" for p in plots]
    for label, records in runs:
        last = next((r for r in reversed(records) if r.get("top_episodes")), None)
        if last:
            lines += ["", f"## {label}: top and bottom episodes of iteration {last['iteration']}", ""]
            for kind in ("top_episodes", "bottom_episodes"):
                for e in last[kind][:1]:
                    text = e["completion"].replace("\n", " / ")
                    lines.append(f"- {kind.split('_')[0]} (key {e['key']:.3g}, reward {e['reward']:.0f}): "
                                 f"{e['question']} -> `{text}`")
    md = out_dir / "report.md"
    md.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return md
