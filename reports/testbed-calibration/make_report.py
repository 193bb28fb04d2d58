"""Issue 19's test-bed calibration: one table from the runs' own metrics.jsonl (copied here by ``collect``).

    .venv/bin/python reports/testbed-calibration/make_report.py [RUNS_ROOT ...]   # copies, then writes summary.md

RUNS_ROOT: folders written by run.sh (``<root>/<candidate>/<algo>-seed<s>/``); their config.json and metrics.jsonl
are copied into this folder (checkpoints are not). Per run: the warm start's eval (iteration 0), the evals at
iterations 10 and 20 (100 held-out problems, 2 samples at temperature 0.6 + greedy), the change against the warm
start, distinct completions per prompt group (of 8) at the first three iterations (the warm start's sampling) and
the training wall-clock.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).parent


def records(run: Path) -> list[dict]:
    """The run's metrics.jsonl records; none when it has no such file (or an empty one: killed before iteration 0's
    eval was written)."""
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def collect(roots: list[Path]) -> None:
    for root in roots:
        for run in sorted(root.glob("*/*-seed*")):
            if not records(run):
                continue
            dest = HERE / run.parent.name / run.name
            dest.mkdir(parents=True, exist_ok=True)
            for name in ("config.json", "metrics.jsonl"):
                shutil.copy2(run / name, dest / name)


def row(run: Path) -> dict:
    by_iteration = {r["iteration"]: r for r in records(run)}  # a resumed run may repeat a line: the last one counts
    evals = {i: r["eval"] for i, r in sorted(by_iteration.items()) if "eval" in r}
    first = [by_iteration[i]["distinct_per_group"] for i in (1, 2, 3) if "distinct_per_group" in by_iteration.get(i, {})]
    last = max(by_iteration)
    start, final = evals.get(0, {}), evals.get(last, {})
    return {"run": f"{run.parent.name}/{run.name}", "iterations": last, "wall": by_iteration[last].get("wall", 0.0),
            "start": start.get("accuracy"), "n": start.get("n_questions"),
            "mid": evals.get(json.loads((run / "config.json").read_text())["iterations"] // 2, {}).get("accuracy"),
            "final": final.get("accuracy") if last else None,
            "start_greedy": start.get("greedy_accuracy"), "final_greedy": final.get("greedy_accuracy") if last else None,
            "distinct": statistics.fmean(first) if first else None,
            "reward": statistics.fmean([r["reward"] for i, r in by_iteration.items() if i and "reward" in r] or [0.0])}


def fmt(x, digits=3):
    return "-" if x is None else f"{x:.{digits}f}"


def main(argv: list[str]) -> None:
    collect([Path(a) for a in argv])
    rows = [row(run) for run in sorted(HERE.glob("*/*-seed*")) if records(run)]
    lines = ["# Test-bed calibration: every run", "",
             "From the runs' metrics.jsonl in this folder (`make_report.py`). Accuracy: the same n held-out problems "
             "at every eval, mean over 2 samples at temperature 0.6; greedy: one greedy completion each; acc mid: at "
             "half the run's iterations; change = final - iteration 0 (the "
             "warm start, same problems). distinct: distinct completions per prompt group of 8 at iterations 1-3 "
             "(sampled at temperature 1.0 from the warm start, give or take the first updates). wall: training "
             "seconds (eval excluded) on one thread of a shared 2-core machine.", "",
             "| run | iterations | wall (s) | eval n | acc it 0 | acc mid | acc final | change | greedy it 0 | "
             "greedy final | greedy change | distinct of 8 | mean reward |", "|---" * 13 + "|"]
    for r in rows:
        change = None if None in (r["final"], r["start"]) else r["final"] - r["start"]
        greedy = None if None in (r["final_greedy"], r["start_greedy"]) else r["final_greedy"] - r["start_greedy"]
        lines.append(f"| {r['run']} | {r['iterations']} | {r['wall']:.0f} | {r['n']} | {fmt(r['start'])} | "
                     f"{fmt(r['mid'])} | "
                     f"{fmt(r['final'])} | {fmt(change, 3) if change is None else f'{change:+.3f}'} | "
                     f"{fmt(r['start_greedy'])} | {fmt(r['final_greedy'])} | "
                     f"{fmt(greedy) if greedy is None else f'{greedy:+.3f}'} | {fmt(r['distinct'], 2)} | "
                     f"{fmt(r['reward'])} |")
    (HERE / "summary.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
