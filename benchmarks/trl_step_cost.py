"""The I-PPO filter's price in TRL (issue 20): CPU time per GRPO step of TRL's plain GRPOTrainer, IPPOGRPOTrainer on
the two-pass path (a scoring forward+backward, then TRL's) and on the one-backward path (the scores and the filtered
update from TRL's own backward), on examples/trl_grpo_ippo.py's setting (SmolLM2-135M-Instruct, LoRA r=16, 2
prompts x 4 completions of up to 32 tokens, 8 validation pairs per step), and each arm's peak resident memory.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/trl_step_cost.py [--steps 3] [--rounds 2] [--out runs/bench]

Each arm runs in its own process (so that its peak RSS is its own), one torch thread, arms interleaved over
``--rounds`` rounds; a step's cost is the process's CPU time from the Trainer's step begin to its end
(generation, rewards, the filter, forward, backward, optimizer), the first step of each run left out (warm-up).
Prints, per arm, the median step CPU time, its ratio to plain GRPO's, the filter's price as a fraction of a plain
step ((arm - plain) / plain) and the peak RSS ratio; writes ``trl_step_cost.json`` to ``--out``.
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

ARMS = {"plain": None, "two-pass": False, "one-backward": True}  # arm: ippo_one_backward (None: plain GRPOTrainer)


def run_arm(arm: str, steps: int, out: Path) -> None:
    """In a child process: one arm's run; writes {step CPU seconds, path, peak RSS} as JSON to ``out``."""
    import torch
    from transformers import TrainerCallback

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    from trl_grpo_ippo import build

    torch.set_num_threads(1)
    one_backward = ARMS[arm]
    trainer = build(str(out.parent / f"trainer-{arm}"), steps, ippo=one_backward is not None,
                    **({} if one_backward is None else {"ippo_one_backward": one_backward}))
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
    parser.add_argument("--steps", type=int, default=3, help="GRPO steps per run (the first is left out)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each arm, interleaved")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"), help="output folder")
    parser.add_argument("--arm", choices=list(ARMS), help=argparse.SUPPRESS)  # the child process's arm
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 2 or args.rounds < 1:
        parser.error("--steps must be >= 2 (the first step is left out) and --rounds >= 1")
    if args.arm:
        return run_arm(args.arm, args.steps, args.result)
    args.out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    for round_ in range(args.rounds):
        for arm in ARMS:
            result = args.out / f"trl_step_cost-{arm}-{round_}.json"
            print(f"round {round_ + 1}/{args.rounds}: {arm} ...", flush=True)
            subprocess.run([sys.executable, __file__, "--arm", arm, "--result", str(result), "--steps",
                            str(args.steps), "--out", str(args.out)], check=True)
            runs[arm].append(json.loads(result.read_text()))
    median = {arm: statistics.median(t for run in rs for t in run["step_cpu_s"][1:]) for arm, rs in runs.items()}
    rss = {arm: max(run["peak_rss_mib"] for run in rs) for arm, rs in runs.items()}
    import torch
    import transformers
    import trl

    summary = {"steps": args.steps, "rounds": args.rounds, "median_step_cpu_s": median, "peak_rss_mib": rss,
               "paths": {arm: rs[0]["path"] for arm, rs in runs.items()}, "runs": runs,
               "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                            "trl": trl.__version__}}
    (args.out / "trl_step_cost.json").write_text(json.dumps(summary, indent=1))
    print(f"\n{'arm':>13} {'path':>13} {'step CPU s':>10} {'x plain':>8} {'filter/step':>11} {'peak RSS MiB':>12} "
          f"{'x plain':>8}")
    for arm in ARMS:
        print(f"{arm:>13} {summary['paths'][arm]:>13} {median[arm]:10.2f} {median[arm] / median['plain']:8.3f} "
              f"{(median[arm] - median['plain']) / median['plain']:11.3f} {rss[arm]:12.0f} "
              f"{rss[arm] / rss['plain']:8.3f}")


if __name__ == "__main__":
    main()
