"""Issue 19, step 3: the score variants x stratified flip AUCs, from the probes' own probe.json (copied here).

    .venv/bin/python reports/score-variants/make_report.py [PROBE_DIR ...]   # copies, then writes summary.md + PNG

PROBE_DIR: folders written by run.sh (``probe-noise<p>-seed<s>/probe.json``); each is copied into this folder (the
latest copy wins), then every probe.json here is read and its draws pooled per (options but the seed). Per score
(the advantage and a random number as baselines; raw = the paper's <g_i, V>; every --variants score): the flip AUC
over the buffer, within reward 0, within reward 1 and within a reward level and prompt group (only pairs of
episodes of the same prompt and reward: grpo's advantage is constant there, so it gets exactly 0.5, and a score
above 0.5 reads the content) (low value finds a flipped reward; 0.5 = chance), each as
median [q1, q3] over the draws and the draws below 0.5 (inverted) of those where it is defined; the faithfulness
AUC (among right answers, low value finds a wrong step) where such episodes occur; seconds per draw of each
variant's validation gradient and scoring pass.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
from pathlib import Path

from ippo.train.probe import describe

HERE = Path(__file__).parent
LEVELS = (("", "all"), ("_r0", "within reward 0"), ("_r1", "within reward 1"),
          ("_rg", "within reward and prompt group"))


def collect(dirs: list[Path]) -> None:
    for d in dirs:
        if (d / "probe.json").is_file():
            (HERE / d.name).mkdir(exist_ok=True)
            shutil.copy2(d / "probe.json", HERE / d.name / "probe.json")


def stat(values: list[float]) -> dict | None:
    """The probe summary's numbers of one AUC over the pooled draws (``probe.describe``); None without draws."""
    return describe(values, auc=True) if values else None


def cell(s: dict | None) -> str:
    return "-" if s is None else f"{s['median']:.2f} [{s['q1']:.2f}, {s['q3']:.2f}] ({s['inverted']}/{s['n']})"


def names(probe: dict) -> list[tuple[str, str]]:
    """(label, key suffix) of every score in the probe: the baselines, the probed --score, its variants."""
    cfg = probe["config"]
    return [("advantage (baseline)", "advantage"), ("random (baseline)", "random"),
            (f"{cfg['score']} (the trainer's --score)", "score")] + [(v, v) for v in probe["variants"]]


def table(draws: list[dict], scores: list[tuple[str, str]]) -> str:
    head = ("| score | " + " | ".join(f"flip AUC {label}" for _, label in LEVELS)
            + " | faithfulness AUC | seconds per draw |\n" + "|---" * (len(LEVELS) + 3) + "|\n")
    lines = []
    for label, key in scores:
        aucs = [cell(stat([r[f"flip_auc_{key}{sfx}"] for r in draws if f"flip_auc_{key}{sfx}" in r]))
                for sfx, _ in LEVELS]
        faithful = cell(stat([r[f"unfaithful_auc_{key}"] for r in draws if f"unfaithful_auc_{key}" in r]))
        seconds = [r[f"seconds_{key}"] for r in draws if f"seconds_{key}" in r]
        lines.append(f"| {label} | " + " | ".join(aucs) + f" | {faithful} | "
                     + (f"{statistics.fmean(seconds):.1f}" if seconds else "-") + " |")
    return head + "\n".join(lines) + "\n"


def plot(draws: list[dict], scores: list[tuple[str, str]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(LEVELS), figsize=(4.2 * len(LEVELS), 3.8), sharey=True)
    for ax, (sfx, label) in zip(axes, LEVELS):
        data = [[r[f"flip_auc_{key}{sfx}"] for r in draws if f"flip_auc_{key}{sfx}" in r] for _, key in scores]
        ax.boxplot(data, showfliers=False)
        for i, values in enumerate(data, 1):
            ax.plot([i + 0.06 * ((j % 5) - 2) for j in range(len(values))], values, "o", ms=2.5, alpha=0.5,
                    color="C0")
        ax.set_xticks(range(1, len(scores) + 1), [label.split(" (")[0] for label, _ in scores], fontsize=8,
                      rotation=30)
        ax.axhline(0.5, color="grey", ls="--", lw=1)
        ax.set_title(f"flip AUC, {label}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("AUC (low value finds a flipped reward)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def widths(groups: dict[str, list[tuple[Path, dict]]]) -> list[str]:
    """The deflated score's AUCs per --deflate-dim (the sketch width of its top directions), over every probe that
    scored it (as --score or a variant) on the same seeds' draws."""
    rows: dict[int, list[dict]] = {}
    for group in groups.values():
        for _, probe in group:
            key = "score" if probe["config"]["score"] == "deflated" else "deflated"
            if key == "score" or "deflated" in probe["variants"]:
                rows.setdefault(probe["config"]["deflate_dim"], []).extend(
                    {f"flip_auc_deflated{sfx}": r[f"flip_auc_{key}{sfx}"] for sfx, _ in LEVELS
                     if f"flip_auc_{key}{sfx}" in r} | {"seed": probe["config"]["seed"]} for r in probe["draws"])
    if len(rows) < 2:
        return []
    common = set.intersection(*({d["seed"] for d in draws} for draws in rows.values()))  # like for like
    rows = {width: [d for d in draws if d["seed"] in common] for width, draws in rows.items()}
    lines = ["## deflated: how its flip AUCs move with the sketch width (--deflate-dim)\n",
             "| width | seeds | " + " | ".join(f"flip AUC {label}" for _, label in LEVELS) + " |",
             "|---" * (len(LEVELS) + 2) + "|"]
    for width, draws in sorted(rows.items()):
        cells = [cell(stat([d[f"flip_auc_deflated{sfx}"] for d in draws if f"flip_auc_deflated{sfx}" in d]))
                 for sfx, _ in LEVELS]
        seeds = ", ".join(str(x) for x in sorted({d["seed"] for d in draws}))
        lines.append(f"| {width} | {seeds} | " + " | ".join(cells) + " |")
    return lines + [""]


def main(argv: list[str]) -> None:
    collect([Path(a) for a in argv])
    groups: dict[str, list[tuple[Path, dict]]] = {}
    for path in sorted(HERE.glob("*/probe.json")):
        probe = json.loads(path.read_text())
        cfg = {k: v for k, v in probe["config"].items() if k != "seed"}
        groups.setdefault(json.dumps([cfg, probe["variants"]], sort_keys=True), []).append((path, probe))
    out = ["# Score variants: stratified flip AUCs on the test bed's warm start\n",
           "From the probes' probe.json in this folder (`make_report.py`). Each cell: median [q1, q3] over the draws "
           "(inverted draws, AUC < 0.5 / draws where defined). A flip AUC within a reward level compares a flipped "
           "episode with its neighbours of the same (flipped) reward; grpo's advantage can still tell them apart by "
           "the other rewards of its prompt group (a 0 among mostly right answers is likely a flip). Within a reward "
           "level and a prompt group it cannot (it is constant there: AUC 0.5), so a score above 0.5 there knows "
           "something of the content.\n"]
    for n, group in enumerate(groups.values()):
        cfg = group[0][1]["config"]
        draws = [r for _, probe in group for r in probe["draws"]]
        scores = names(group[0][1])
        seeds = [p["config"]["seed"] for _, p in group]
        seed_list = f"seed{'s' * (len(seeds) > 1)} {', '.join(map(str, seeds))}"
        title = (f"{len(draws)} draws ({seed_list}) of {cfg['prompts_per_iter']}x{cfg['samples_per_prompt']}, "
                 f"reward noise {cfg['reward_noise']}, ippo base {cfg['ippo_base']}")
        png = f"variants-{n}.png"
        plot(draws, scores, HERE / png, title)
        flipped = sum(r.get("flipped", 0) for r in draws)
        unfaithful = sum(r.get("unfaithful", 0) for r in draws)
        out += [f"## {title}\n",
                f"Probes: {', '.join(str(p.parent.name) for p, _ in group)}. Options: arith steps "
                f"{cfg['arith_steps']}, SFT steps {cfg['sft_steps']}, temperature {cfg['temperature']}, val size "
                f"{cfg['val_size']}, deflate top {cfg['deflate_top']} at width {cfg['deflate_dim']}. Flipped "
                f"episodes: {flipped}; right-but-unfaithful episodes: {unfaithful}; mean distinct completions per "
                f"group of {cfg['samples_per_prompt']}: "
                f"{statistics.fmean(r['distinct_per_group'] for r in draws):.2f}.\n",
                table(draws, scores), f"![flip AUCs]({png})\n"]
        if len(group) > 1:  # each seed is its own warm start: its draws alone, next to the pooled table
            for _, probe in group:
                out += [f"### seed {probe['config']['seed']} alone ({len(probe['draws'])} draws)\n",
                        table(probe["draws"], scores)]
    out += widths(groups)
    (HERE / "summary.md").write_text("\n".join(out))
    print("\n".join(out))


if __name__ == "__main__":
    main(sys.argv[1:])
