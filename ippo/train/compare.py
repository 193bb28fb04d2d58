"""``ippo compare --seeds``: every (arm, seed) run, resumable, then per arm the mean and a 95% Student-t interval
over seeds of the final eval metrics, and paired differences against the first arm (the runs of one seed share its
SFT warm start and eval draw, so pairing removes the seed-to-seed spread). An arm is an algorithm, optionally with
options of its own (``ippo:score=centred``, :func:`arm_config`).

Runs go to ``<out>/<arm>-seed<s>`` (:func:`run_name`), seed by seed; ``<out>/report.md`` and
``<out>/accuracy_vs_wall.png`` hold the result. A run that is missing or unusable (absent, corrupt files, failed) is
named in the report and left out, and so is (with ``--resume``) a run whose config.json differs from the sweep's for
its (arm, seed): it is neither resumed nor trained over, and the report names the options that differ. ``ippo
train --resume``'s rule says which may differ (``checkpoint.RESUME_MAY_CHANGE``: --iterations, --wall-budget,
--threads, --device); a run trained past the sweep's --iterations or --wall-budget differs too (its numbers are not
the sweep's).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from ippo.train import report
from ippo.train.checkpoint import (
    changed_options,
    check_dir_path,
    check_run_dir,
    latest_checkpoint,
    read_json,
    read_metrics,
)
from ippo.train.config import ALGOS, SEED_LIMIT, Config, flag
from ippo.train.stats import CONFIDENCE, mean_interval

METRICS = (  # (key of a run's result, row label): final eval unless said otherwise
    ("start_accuracy", "accuracy at iteration 0 (sampled, --eval-size problems)"),
    ("accuracy", "accuracy (sampled, mean over k)"),
    ("greedy_accuracy", "greedy accuracy"),
    ("majority", "majority vote"),
    ("pass_at_k", "pass@k"),
    ("unfaithful", "unfaithful rate"),
    ("mean_kept", "mean kept fraction"),
    ("wall", "training wall-clock (s)"),
)


# =========================================================================== intervals


# =========================================================================== runs


def parse_seeds(text: str) -> list[int]:
    """``--seeds`` "0,1,2" as distinct ints in [0, 2**63) (--seed's range); ValueError naming --seeds otherwise."""
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        seeds = []
    if not seeds or min(seeds) < 0 or max(seeds) >= SEED_LIMIT or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds must be distinct integers in [0, 2**63) 'a,b,c' (e.g. '0,1,2'), got {text!r}")
    return seeds


def parse_algos(text: str) -> list[str]:
    """``--algos`` "grpo,ippo,ippo:score=centred,ippo:keep_by=random" as distinct arms (:func:`arm_config`);
    ValueError naming --algos otherwise."""
    arms = [a.strip() for a in text.split(",") if a.strip()]
    if not arms or len(set(arms)) != len(arms):
        raise ValueError(f"--algos must name distinct arms, got {text!r}")
    for arm in arms:
        arm_config(Config(), arm)
    return arms


def arm_config(cfg: Config, arm: str) -> Config:
    """``cfg`` for one arm of a sweep: ``ALGO`` or ``ALGO:OPTION=VALUE[:OPTION=VALUE...]`` (an algorithm of
    ``ALGOS`` and options of :class:`Config` other than algo and seed, spelled as fields or flags: ``keep_by=random``,
    ``keep-by=random``; bools as true/false), e.g. ``ippo:score=centred``. ValueError naming --algos for an unknown
    algorithm or option or a value of the wrong type; the values' ranges are checked by ``Config.validate``."""
    algo, *settings = arm.split(":")
    if algo not in ALGOS:
        raise ValueError(f"--algos: arm {arm!r}: the algorithm must be one of {ALGOS}")
    types = {f.name: f.type for f in dataclasses.fields(Config) if f.name not in ("algo", "seed")}
    options = {}
    for setting in settings:
        name, _, text = setting.partition("=")
        name = name.strip().replace("-", "_")
        if name not in types or not text or name in options:
            raise ValueError(f"--algos: arm {arm!r}: {setting!r} must be OPTION=VALUE with a distinct option of "
                             f"`ippo train` other than algo and seed")
        try:
            if types[name] == "bool":
                if text.lower() not in ("true", "false"):
                    raise ValueError
                options[name] = text.lower() == "true"
            else:
                options[name] = {"int": int, "float": float}.get(types[name], str)(text)
        except ValueError:
            raise ValueError(f"--algos: arm {arm!r}: {name} must be of type {types[name]}, got {text!r}") from None
    return dataclasses.replace(cfg, algo=algo, **options)


def arm_dir(arm: str) -> str:
    """``arm`` as a folder name (``:`` written as ``+``): ``ippo``, ``ippo+score=centred``."""
    return arm.replace(":", "+")


def run_name(arm: str, seed: int) -> str:
    """The run folder of ``arm`` and ``seed``: ``ippo-seed0``, ``ippo+score=centred-seed0``."""
    return f"{arm_dir(arm)}-seed{seed}"


def _finished(run: Path, cfg: Config) -> bool:
    """The newest checkpoint of ``run`` ends it: last iteration, a stop, or the wall budget spent."""
    name, iteration = latest_checkpoint(run)
    meta = read_json(run / f"{name}.json", required=("wall",))
    return bool(meta.get("stopped")) or iteration >= cfg.iterations or 0 < cfg.wall_budget <= meta["wall"]


def differences(run: Path, cfg: Config) -> list[str]:
    """How the run in ``run`` (it has a checkpoint) differs from the sweep's ``cfg`` for it: each option of its
    config.json that ``cfg`` sets otherwise, but those a resume may change (``changed_options``), as "option
    run's value (the sweep's value)"; and "trained past the sweep's --iterations / --wall-budget" when the run went
    further than ``cfg`` would have. An empty list: the run is the sweep's (finished, or resumable)."""
    changed = changed_options(cfg, read_json(run / "config.json", required=("algo",)))
    found = [f"{name} {mine!r} (the sweep's {theirs!r})" for name, (mine, theirs) in changed.items()]
    _, iteration = latest_checkpoint(run)
    if iteration > cfg.iterations:
        found.append(f"trained to iteration {iteration}, past the sweep's --iterations {cfg.iterations}")
    if cfg.wall_budget > 0:  # the sweep stops after the first iteration whose training wall reaches the budget
        entries, _ = read_metrics(run / "metrics.jsonl")
        before = [r for _, r in entries if 0 < r["iteration"] < iteration and isinstance(r.get("wall"), (int, float))]
        if any(r["wall"] >= cfg.wall_budget for r in before):
            found.append(f"trained past the sweep's --wall-budget {cfg.wall_budget:g}s")
    return found


def run_all(cfg: Config, algos: list[str], seeds: list[int], out: Path, resume: bool = False, progress: bool = True,
            log=print) -> dict[str, str]:
    """Train every (algo, seed) of ``cfg`` into ``out/<algo>-seed<s>``, seed by seed; returns {run: error} of the
    runs that failed with a ValueError or FileNotFoundError (a corrupt or missing file), after trying the others,
    and of the runs left out because they differ from the sweep (:func:`differences`).

    With ``resume``, finished runs are skipped and a killed one continues from its checkpoint, once every existing
    run was checked against the sweep (a run that differs is neither counted nor trained over); without it, an
    existing run is a FileExistsError before any work, and so is a non-empty folder that holds no run.
    """
    from ippo.train.trainer import train

    jobs = [(algo, seed) for seed in seeds for algo in algos]
    cfgs = {job: dataclasses.replace(arm_config(cfg, job[0]), seed=job[1]) for job in jobs}
    for c in cfgs.values():
        c.validate()
    check_dir_path(out, "--out")
    if not resume:
        taken = [run_name(*job) for job in jobs if (out / run_name(*job) / "latest.json").is_file()]
        if taken:
            raise FileExistsError(f"{str(out)!r} already holds runs {taken}; pass --resume to continue them")
    failed = {}
    for job in jobs:  # before any work: each existing run is the sweep's, each other folder free
        name, run, c = run_name(*job), out / run_name(*job), cfgs[job]
        if not (run / "latest.json").is_file():
            check_run_dir(c, run, resume=False)
            continue
        try:
            found = differences(run, c)
        except (FileNotFoundError, ValueError) as err:
            failed[name] = str(err)
            log(f"{name}: unusable, left out: {err}")
            continue
        if found:
            failed[name] = (f"its config differs from the sweep's: {'; '.join(found)}; neither resumed nor counted "
                            f"(move it away to train the sweep's run there)")
            log(f"{name}: left out, {failed[name]}")
    for index, job in enumerate(jobs, 1):
        name, run, c = run_name(*job), out / run_name(*job), cfgs[job]
        step = f"[{index}/{len(jobs)}] {name}"
        if name in failed:
            continue
        try:
            started = resume and (run / "latest.json").is_file()
            if started and _finished(run, c):
                log(f"{step}: finished, skipped ({len(jobs) - index} left)")
                continue
            log(f"{step}: {'resuming' if started else 'running'} ({len(jobs) - index} left after it)")
            t0 = time.perf_counter()
            train(c, run, resume=started, progress=progress, log=log)
            log(f"{step}: done in {time.perf_counter() - t0:.0f}s")
        except (FileNotFoundError, ValueError) as err:
            failed[name] = str(err)
            log(f"{step}: failed, going on with the others: {err}")
    return failed


def run_result(run: Path) -> dict:
    """The numbers of one finished run: its final eval, iteration-0 accuracy, mean kept fraction, training wall."""
    s = report.summarize(run)
    final = s["final"]
    return {"start_accuracy": s["start"]["accuracy"], "accuracy": final["accuracy"],
            "greedy_accuracy": final.get("greedy_accuracy"), "majority": final["majority"],
            "pass_at_k": final["pass_at_k"], "unfaithful": final["unfaithful"], "mean_kept": s["mean_kept"],
            "wall": s["wall"], "iterations": s["iterations"], "n_questions": final["n_questions"],
            "stopped_by": report.read_metrics(run)[-1].get("stopped_by", "early stop" if s["early_stop"] else "-")}


def collect(out: Path, algos: list[str], seeds: list[int], failed: dict[str, str] | None = None,
            ) -> tuple[dict[tuple[str, int], dict], dict[str, str]]:
    """{(algo, seed): run_result} of the usable runs, and {run: why not} of the others."""
    results, problems = {}, dict(failed or {})
    for seed in seeds:
        for algo in algos:
            name = run_name(algo, seed)
            if name in problems:
                continue
            try:
                results[algo, seed] = run_result(out / name)
            except (FileNotFoundError, ValueError) as err:
                problems[name] = str(err)
    return results, problems


# =========================================================================== report


def stats_tables(results: dict[tuple[str, int], dict], algos: list[str], seeds: list[int]) -> str:
    """Markdown: per algorithm mean and interval of every metric; paired differences vs ``algos[0]``."""

    def cell(values, digits):
        return mean_interval(values).format(digits) if values else "-"

    def digits(key):
        return 0 if key == "wall" else 3

    lines = [f"Per algorithm: mean over seeds and {CONFIDENCE:.0%} interval (Student t, n - 1 dof) of the final eval.",
             "", "| metric | " + " | ".join(algos) + " |", "|---" * (len(algos) + 1) + "|"]
    for key, label in METRICS:
        row = [cell([results[a, s][key] for s in seeds if results.get((a, s), {}).get(key) is not None], digits(key))
               for a in algos]
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    first, others = algos[0], algos[1:]
    if others:
        lines += ["", f"Paired differences vs {first} (same seed: same SFT warm start and eval problems), mean and "
                  f"{CONFIDENCE:.0%} interval:", "",
                  "| metric | " + " | ".join(f"{a} - {first}" for a in others) + " |", "|---" * len(algos) + "|"]
        for key, label in METRICS:
            row = []
            for a in others:
                pairs = [(results[a, s][key], results[first, s][key]) for s in seeds
                         if (a, s) in results and (first, s) in results
                         and None not in (results[a, s][key], results[first, s][key])]
                row.append(cell([x - y for x, y in pairs], digits(key)))
            lines.append(f"| {label} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def runs_table(results: dict[tuple[str, int], dict]) -> str:
    lines = ["| run | iterations | stopped by | eval problems | acc | greedy | majority | pass@k | unfaithful | "
             "mean kept | train wall (s) |", "|---" * 11 + "|"]

    def f(x):
        return "-" if x is None else f"{x:.3f}"

    for (algo, seed), r in results.items():
        lines.append(f"| {run_name(algo, seed)} | {r['iterations']} | {r['stopped_by']} | {r['n_questions']} | "
                     f"{f(r['accuracy'])} | {f(r['greedy_accuracy'])} | {f(r['majority'])} | {f(r['pass_at_k'])} | "
                     f"{f(r['unfaithful'])} | {f(r['mean_kept'])} | {r['wall']:.0f} |")
    return "\n".join(lines) + "\n"


def plot_accuracy_vs_wall(out: Path, runs: dict[tuple[str, int], Path], algos: list[str]) -> str:
    """accuracy_vs_wall.png: sampled and greedy eval accuracy vs training wall-clock, per algorithm the mean over
    seeds (each seed's evals linearly interpolated, up to the shortest seed's last eval) with a 95% t band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key in zip(axes, ("accuracy", "greedy_accuracy")):
        for index, algo in enumerate(algos):
            curves = []
            for (a, _), run in runs.items():
                pts = [(r["wall"], r["eval"][key]) for r in report.read_metrics(run) if key in r.get("eval", {})]
                if a == algo and pts:
                    curves.append(np.array(pts))
                    ax.plot(*curves[-1].T, "o", color=f"C{index}", ms=2, alpha=0.4)
            if not curves:
                continue
            grid = np.linspace(0, min(c[-1, 0] for c in curves), 50)
            ys = [np.interp(grid, c[:, 0], c[:, 1]) for c in curves]
            stats = [mean_interval(list(col)) for col in np.array(ys).T]
            mean = np.array([s.mean for s in stats])
            ax.plot(grid, mean, color=f"C{index}", label=f"{algo} (n={len(curves)})")
            if len(curves) > 1:
                half = np.array([s.half_width for s in stats])
                ax.fill_between(grid, mean - half, mean + half, color=f"C{index}", alpha=0.2)
        ax.set_xlabel("training wall-clock (s, eval excluded)")
        ax.set_ylabel(f"eval {key.replace('_', ' ')}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"eval accuracy vs training wall-clock: mean over seeds, {CONFIDENCE:.0%} t band")
    fig.tight_layout()
    name = "accuracy_vs_wall.png"
    fig.savefig(out / name, dpi=80)
    plt.close(fig)
    return name


def command_line(cfg: Config, algos: list[str], seeds: list[int], out: Path) -> str:
    """The ``ippo compare`` command that reproduces these runs: the options that differ from the defaults."""
    defaults, parts = Config(), [f"--algos {','.join(algos)}", f"--seeds {','.join(map(str, seeds))}"]
    for f in dataclasses.fields(Config):
        value = getattr(cfg, f.name)
        if f.name in ("algo", "seed") or value == getattr(defaults, f.name):
            continue
        if isinstance(value, bool):
            parts.append(flag(f.name) if value else "--no-" + flag(f.name)[2:])
        else:
            parts.append(f"{flag(f.name)} {value}")
    return " ".join(["ippo compare", *parts, f"--out {out}"])


def write_seed_report(cfg: Config, algos: list[str], seeds: list[int], out: Path,
                      failed: dict[str, str] | None = None) -> tuple[Path, str, dict[str, str]]:
    """Write ``out/report.md`` + ``accuracy_vs_wall.png``; returns the markdown path, the statistics tables and the
    {run: why} of the runs left out."""
    results, problems = collect(out, algos, seeds, failed)
    out.mkdir(parents=True, exist_ok=True)  # absent when no run started
    tables = stats_tables(results, algos, seeds) if results else "No usable run.\n"
    lines = [f"# compare {', '.join(algos)} over seeds {', '.join(map(str, seeds))}", "",
             f"    {command_line(cfg, algos, seeds, out)}", "", tables]
    if problems:
        lines += ["Missing or unusable runs (left out of every number above):", ""]
        lines += [f"- **{name}**: {why}" for name, why in problems.items()] + [""]
    if results:
        lines += ["Per run (final eval):", "", runs_table(results)]
        plot = plot_accuracy_vs_wall(out, {job: out / run_name(*job) for job in results}, algos)
        lines += [f"![{plot}]({plot})", ""]
    lines += ["Accuracy = mean correctness over the k samples per eval problem; greedy = one greedy completion per "
              "problem; majority = the majority-vote answer is right; pass@k = any sample right; unfaithful = share of "
              "correct samples with a wrong intermediate step; mean kept = mean over iterations of the kept fraction "
              "(1 for ppo/grpo); wall-clock = training only, eval excluded. Each run's folder has its own report "
              "(`ippo report RUN --out DIR`).", ""]
    md = out / "report.md"
    md.write_text("\n".join(lines), encoding="utf-8")
    return md, tables, problems
