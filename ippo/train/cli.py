"""``ippo train|sft|eval|compare|probe|attribute|report``: the command line of the thin I-PPO trainer (also
``python -m ippo.train``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path


def _add_config_options(parser: argparse.ArgumentParser, skip=(), preset: str | None = None) -> None:
    """One option per :class:`Config` field, with the help text declared next to the field; its default is the
    field's, or ``preset``'s value (``--preset``, also added here: a pre-parse reads it, see :func:`main`)."""
    from ippo.train.config import PRESETS, Config, flag, preset_config

    defaults = preset_config(preset)
    parser.add_argument("--preset", default=preset, choices=tuple(PRESETS),
                        help="a named set of defaults that explicit options override: testbed = the test bed of "
                        "reports/testbed-calibration (the defaults below show the preset's values when it is given)")
    for f in dataclasses.fields(Config):
        if f.name in skip:
            continue
        default = getattr(defaults, f.name)
        help_text = f"{f.metadata['help']} (default: {default})".replace("%", "%%")  # argparse formats help
        if isinstance(default, bool):
            parser.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            kind = {int: int, float: float}.get(type(default), str)
            parser.add_argument(flag(f.name), type=kind, default=default, help=help_text, metavar=f.name.upper())


def _config(args, **override):
    from ippo.train.config import Config

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if hasattr(args, f.name)}
    return Config(**(values | override))


def build_parser(preset: str | None = None) -> argparse.ArgumentParser:
    """The ``ippo`` parser; with ``preset`` (a :data:`config.PRESETS` name) its values are the config defaults."""
    parser = argparse.ArgumentParser(
        prog="ippo", description="Thin I-PPO trainer: SFT warm start (cached), then SFT / PPO / GRPO / I-PPO on a "
        "LoRA policy, with eval metrics, a report and resumable checkpoints. With no options, `ippo train` runs the "
        "embedded default (SmolLM2-135M-Instruct, arith task, I-PPO) in about 9 minutes on 2 CPU cores (8.5 measured, "
        "after the environment is set up).")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, out_help):
        p.add_argument("--out", default=None, help=out_help)
        p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")

    p = sub.add_parser("train", help="SFT warm start then RL (default I-PPO); writes a run directory",
                       description="SFT warm start (cached), then --iterations of --algo. The run directory gets "
                       "config.json, metrics.jsonl, the newest checkpoint (safetensors + JSON) and report.md + PNGs.")
    common(p, "run directory (default runs/<algo>-seed<seed>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its newest checkpoint (LoRA, value head, optimizer, RNG); "
                        "--iterations may be raised")
    _add_config_options(p, preset=preset)

    p = sub.add_parser("sft", help="only the SFT warm start (cached) and an eval of it",
                       description="Train (or reuse from the cache) the SFT warm start and evaluate it.")
    common(p, "run directory (default runs/sft-warmstart-seed<seed>)")
    _add_config_options(p, skip=("algo", "iterations"), preset=preset)

    p = sub.add_parser("eval", help="evaluate the newest checkpoint of a run directory",
                       description="Evaluate a run's newest checkpoint on the eval split; prints the metrics as JSON.")
    p.add_argument("run", help="run directory (written by ippo train)")
    p.add_argument("--eval-size", type=int, default=None, help="eval problems (default: the run's)")
    p.add_argument("--eval-k", type=int, default=None, help="samples per problem (default: the run's)")

    p = sub.add_parser("compare", help="run several algorithms on the same seeds and print one table",
                       description="Runs each of --algos with the same options and seed into <out>/<algo>, then "
                       "prints and writes (<out>/report.md, PNGs) one comparison table. With --seeds: each (algo, "
                       "seed) into <out>/<algo>-seed<s>, and per algorithm the mean and 95% t interval over seeds "
                       "of the final eval, with paired differences vs the first algo.")
    common(p, "output directory (default runs/compare-seed<seed>, with --seeds runs/compare-seeds)")
    p.add_argument("--algos", default="sft,ppo,ippo", help="comma-separated arms: an algorithm, or an algorithm with "
                   "options of its own, ALGO:OPTION=VALUE[:...], e.g. grpo,ippo,ippo:score=centred,ippo:keep_by=random "
                   "(run folders write ':' as '+'; default: sft,ppo,ippo)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds, e.g. 0,1,2 (replaces --seed; default: none, "
                   "one run per algo with --seed)")
    p.add_argument("--resume", action="store_true", help="resume each run that has a checkpoint (with --seeds: "
                   "finished runs are skipped, and a run whose config.json differs from the sweep's, but for what "
                   "`ippo train --resume` may change, is neither resumed nor counted: the report names it, exit 1)")
    _add_config_options(p, skip=("algo",), preset=preset)

    p = sub.add_parser("probe", help="score many rollout draws at the SFT warm start (no training): how well the "
                       "scores find flipped rewards and unfaithful episodes, and how stable they are",
                       description="Draws --draws buffers at the cached SFT warm start, scores them with the trainer's "
                       "scoring pass and writes <out>/probe.json and probe.png (see ippo/train/probe.py).")
    common(p, "output directory (default runs/probe-seed<seed>)")
    p.add_argument("--draws", type=int, default=20, help="rollout draws (default: 20)")
    p.add_argument("--big-val-size", type=int, default=64, help="validation pairs of the larger draw that the scores "
                   "are compared with (default: 64)")
    p.add_argument("--variants", default="", help="other --score values scored on the same draws, e.g. "
                   "answer,centred,deflated: each gets flip AUCs (also within reward 0 and 1) and its seconds")
    p.add_argument("--resume", action="store_true", help="continue the probe.json in --out from its next draw (same "
                   "options)")
    p.add_argument("--no-stability", action="store_true", help="skip the stability scores (two more validation "
                   "gradients and scoring passes per draw)")
    _add_config_options(p, preset=preset)

    p = sub.add_parser("attribute", help="TracIn attribution of a run's stored episodes (train --sketch-dim) to the "
                       "SFT loss of a validation set",
                       description="For each episode stored by `ippo train --sketch-dim K`: lr x its update weight "
                       "x <its gradient sketch, the sketch of the gradient of VAL's SFT loss at that iteration's "
                       "adapter> (> 0: the step on it lowered VAL's loss, to first order; Adam and the minibatch steps "
                       "ignored, as TracIn does). One forward+backward over VAL per stored iteration. Writes "
                       "attribution.json, attribution.md and attribution.png (see ippo/train/attribution.py).")
    p.add_argument("run", help="run directory trained with --sketch-dim K")
    p.add_argument("--data", required=True, help="VAL: a jsonl of GSM8K-format {question, answer} lines, or "
                   "'validation' / 'eval' for the run task's own split")
    common(p, "output directory (default RUN/attribution)")
    p.add_argument("--val-size", type=int, default=None, help="use the first N examples of VAL (default: all)")
    p.add_argument("--val-batch", type=int, default=None, help="examples per forward+backward (default: the run's "
                   "--val-batch)")

    p = sub.add_parser("report", help="write report.md + PNG plots for one or more run directories")
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--title", default="ippo runs", help="report title")
    return parser


def _print_eval(label: str, ev: dict) -> None:
    greedy = f"  greedy {ev['greedy_accuracy']:.3f}" if "greedy_accuracy" in ev else ""
    print(f"{label}: accuracy {ev['accuracy']:.3f}{greedy}  majority {ev['majority']:.3f}  pass@{ev['k']} "
          f"{ev['pass_at_k']:.3f}  unfaithful {ev['unfaithful']:.3f}  faithful accuracy {ev['faithful_accuracy']:.3f}")


def main(argv: list[str] | None = None) -> int:
    pre = argparse.ArgumentParser(add_help=False)  # --preset first: it sets the defaults of the real parse
    pre.add_argument("--preset", default=None)
    preset = pre.parse_known_args(argv)[0].preset
    from ippo.train.config import PRESETS

    args = build_parser(preset if preset in PRESETS else None).parse_args(argv)  # an unknown name: argparse's error
    try:
        return _run(args)
    except (FileNotFoundError, FileExistsError, ValueError, ImportError) as err:
        print(f"ippo {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # NotADirectoryError, PermissionError, IsADirectoryError, a full disk...: name the path
        where = [str(f) for f in (err.filename, err.filename2) if f is not None]
        what = f"{' -> '.join(where)}: {err.strerror}" if where and err.strerror else str(err)
        print(f"ippo {args.command}: error: {what}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ippo {args.command}: interrupted; the newest checkpoint is kept (continue with --resume)",
              file=sys.stderr)
        return 130


def _run(args) -> int:
    from ippo.train import report, trainer
    from ippo.train.evaluation import evaluate_run

    progress = not getattr(args, "no_progress", False)
    if args.command == "train":
        cfg = _config(args)
        out = Path(args.out or f"runs/{cfg.algo}-seed{cfg.seed}")
        ev = trainer.train(cfg, out, resume=args.resume, progress=progress)
        md = report.write_report([out], out, title=f"{cfg.algo} run ({out})")
        _print_eval(f"{cfg.algo} final", ev)
        print(f"run directory: {out}\nreport: {md}")
    elif args.command == "sft":
        cfg = _config(args, algo="sft", iterations=0)
        out = Path(args.out or f"runs/sft-warmstart-seed{cfg.seed}")
        ev = trainer.train(cfg, out, resume=False, progress=progress)
        _print_eval("SFT warm start", ev)
        print(f"run directory: {out}")
    elif args.command == "eval":
        ev = evaluate_run(args.run, eval_size=args.eval_size, eval_k=args.eval_k)
        print(json.dumps(ev, indent=1))
    elif args.command == "compare":
        from ippo.train.compare import arm_config, arm_dir, parse_algos

        algos = parse_algos(args.algos)
        if args.seeds is not None:
            return _compare_seeds(args, algos, progress)
        from ippo.train.checkpoint import check_run_dir

        out = Path(args.out or f"runs/compare-seed{args.seed}")
        jobs = [(algo, out / arm_dir(algo), arm_config(_config(args), algo)) for algo in algos]
        resumed = {algo: args.resume and (run / "latest.json").is_file() for algo, run, _ in jobs}
        for algo, run, cfg in jobs:  # every folder can be trained into, before the first algorithm trains
            cfg.validate()
            check_run_dir(cfg, run, resumed[algo])
        dirs = []
        for algo, run, cfg in jobs:
            start = time.perf_counter()
            trainer.train(cfg, run, resume=resumed[algo], progress=progress)
            print(f"{algo}: done in {time.perf_counter() - start:.0f}s")
            dirs.append(run)
        md = report.write_report(dirs, out, title=f"compare {', '.join(algos)} (seed {args.seed})")
        print(report.table([report.summarize(d) for d in dirs]))
        print(f"report: {md}")
    elif args.command == "probe":
        from ippo.train import probe

        cfg = _config(args)
        out = Path(args.out or f"runs/probe-seed{cfg.seed}")
        variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
        result = probe.probe(cfg, out, args.draws, args.big_val_size, stability=not args.no_stability,
                             progress=progress, variants=variants, resume=args.resume)
        print(json.dumps(result["summary"], indent=1))
        print(f"probe: {out / 'probe.json'}, {out / 'probe.png'}")
    elif args.command == "attribute":
        from ippo.train import attribution

        result = attribution.attribute(args.run, args.data, out=args.out, val_size=args.val_size,
                                       val_batch=args.val_batch, progress=progress)
        print(f"{len(result['episodes'])} episodes of {len(result['iterations'])} iterations, {result['val_examples']} "
              f"validation examples: total attribution {result['total']:.4g}\nreport: {result['report']}")
    elif args.command == "report":
        md = report.write_report(args.runs, args.out, title=args.title)
        print(report.table([report.summarize(d) for d in args.runs]))
        print(f"report: {md}")
    return 0


def _compare_seeds(args, algos: list[str], progress: bool) -> int:
    """``ippo compare --seeds``: every (algo, seed) run, then the report over seeds; 1 if a run is left out."""
    from ippo.train import compare

    seeds = compare.parse_seeds(args.seeds)
    cfg = _config(args)
    out = Path(args.out or "runs/compare-seeds")
    failed = compare.run_all(cfg, algos, seeds, out, resume=args.resume, progress=progress)
    md, tables, problems = compare.write_seed_report(cfg, algos, seeds, out, failed)
    print(tables)
    for name, why in problems.items():
        print(f"left out {name}: {why}")
    print(f"report: {md}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
