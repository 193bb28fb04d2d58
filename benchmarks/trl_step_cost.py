"""The I-PPO filter's price in TRL (issue 20): CPU time per GRPO step of TRL's plain GRPOTrainer, IPPOGRPOTrainer on
the two-pass path (a scoring forward+backward, then TRL's) and on the one-backward path (the scores and the filtered
update from TRL's own backward), the latter also with the validation gradient computed at every 4th and every 8th
generation batch only (``ippo_val_every``), on examples/trl_grpo_ippo.py's setting (SmolLM2-135M-Instruct, LoRA r=16,
2 prompts x 4 completions of up to 32 tokens, 8 validation pairs per V), and each arm's peak resident memory.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/trl_step_cost.py [--steps 9] [--rounds 2] [--out DIR] [--resume]

Each arm runs in its own process (so that its peak RSS is its own), one torch thread, arms interleaved over
``--rounds`` rounds; a step's cost is the process's CPU time from the Trainer's step begin to its end
(generation, rewards, the filter, forward, backward, optimizer), the first step of each run left out (warm-up).
Prints, per arm, the mean step CPU time over steps 2..steps (a mean, not a median: with ``ippo_val_every`` = k one
step in k computes V; steps - 1 must be a multiple of every arm's k, so that the window holds whole periods), its
ratio to plain GRPO's, the filter's price as a fraction of a plain step ((arm - plain) / plain) and the peak RSS
ratio; writes ``trl_step_cost.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

# arm: the IPPOConfig fields that differ from the example's (None: TRL's plain GRPOTrainer)
ARMS = {"plain": None, "two-pass": {"ippo_one_backward": False}, "one-backward": {"ippo_one_backward": True},
        "one-backward-every4": {"ippo_one_backward": True, "ippo_val_every": 4},
        "one-backward-every8": {"ippo_one_backward": True, "ippo_val_every": 8}}


def run_arm(arm: str, steps: int, out: Path) -> None:
    """In a child process: one arm's run; writes {step CPU seconds, path, peak RSS} as JSON to ``out``."""
    import torch
    from transformers import TrainerCallback

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    from trl_grpo_ippo import build

    torch.set_num_threads(1)
    fields = ARMS[arm]
    trainer = build(str(out.parent / f"trainer-{arm}"), steps, ippo=fields is not None, **(fields or {}))
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            self.start = time.process_time()

        def on_step_end(self, *args, **kwargs):
            times.append(time.process_time() - self.start)

    trainer.add_callback(Clock())
    trainer.train()
    scoring = [h["ippo/scoring_seconds"] for h in trainer.state.log_history if "ippo/scoring_seconds" in h]
    out.write_text(json.dumps({"arm": arm, "path": getattr(trainer, "ippo_path", "plain"), "step_cpu_s": times,
                               "ippo_scoring_wall_s": scoring,
                               "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=9, help="GRPO steps per run (the first is left out; steps - 1 a "
                                                             "multiple of every arm's ippo_val_every)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each arm, interleaved")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"), help="output folder")
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs already in --out (one JSON per arm and round) and run only the others")
    parser.add_argument("--arm", choices=list(ARMS), help=argparse.SUPPRESS)  # the child process's arm
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    periods = [(fields or {}).get("ippo_val_every", 1) for fields in ARMS.values()]
    if args.steps < 2 or any((args.steps - 1) % k for k in periods) or args.rounds < 1:
        parser.error(f"--steps must be >= 2 (the first step is left out) with steps - 1 a multiple of each of "
                     f"{sorted(set(periods))} (whole ippo_val_every periods), and --rounds >= 1")
    if args.arm:
        return run_arm(args.arm, args.steps, args.result)
    args.out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    for round_ in range(args.rounds):
        for arm in ARMS:
            result = args.out / f"trl_step_cost-{arm}-{round_}.json"
            kept = None
            if args.resume and result.is_file():
                try:
                    kept = json.loads(result.read_text())
                    steps = len(kept["step_cpu_s"])
                except (ValueError, KeyError, TypeError) as err:
                    parser.error(f"--resume: {result} is not a result of this benchmark ({err}); delete it to rerun")
                if steps != args.steps:
                    parser.error(f"--resume: {result} has {steps} steps, not --steps {args.steps}")
            if kept is None:
                print(f"round {round_ + 1}/{args.rounds}: {arm} ...", flush=True)
                subprocess.run([sys.executable, __file__, "--arm", arm, "--result", str(result), "--steps",
                                str(args.steps), "--out", str(args.out)], check=True)
            runs[arm].append(kept or json.loads(result.read_text()))
    mean = {arm: statistics.mean(t for run in rs for t in run["step_cpu_s"][1:]) for arm, rs in runs.items()}
    rss = {arm: max(run["peak_rss_mib"] for run in rs) for arm, rs in runs.items()}
    import torch
    import transformers
    import trl

    summary = {"steps": args.steps, "rounds": args.rounds, "mean_step_cpu_s": mean, "peak_rss_mib": rss,
               "paths": {arm: rs[0]["path"] for arm, rs in runs.items()}, "runs": runs,
               "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                            "trl": trl.__version__}}
    (args.out / "trl_step_cost.json").write_text(json.dumps(summary, indent=1))
    print(f"\n{'arm':>19} {'path':>13} {'step CPU s':>10} {'x plain':>8} {'filter/step':>11} {'peak RSS MiB':>12} "
          f"{'x plain':>8}")
    for arm in ARMS:
        print(f"{arm:>19} {summary['paths'][arm]:>13} {mean[arm]:10.2f} {mean[arm] / mean['plain']:8.3f} "
              f"{(mean[arm] - mean['plain']) / mean['plain']:11.3f} {rss[arm]:12.0f} "
              f"{rss[arm] / rss['plain']:8.3f}")


if __name__ == "__main__":
    main()
