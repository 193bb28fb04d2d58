"""Worker for tests/integrations/ (test_integrations_trl.py::test_two_process_gloo,
test_integrations_trl_scores.py::test_two_process_scores, test_integrations_trl_one_backward.py::test_two_process_gloo),
launched with ``python -m torch.distributed.run --standalone --nproc_per_node 2 _trl_ddp_worker.py OUT_DIR
[scores|one-backward]`` (CPU, gloo; ``_trl_tiny.torchrun_workers``).

Short IPPOGRPOTrainer runs on every rank, each saving ``OUT_DIR/<run>-rank<r>.pt``. Without ``scores``: "real"
(real scores, 2 steps), "mixed" (rank 0's scores forced to -1, rank 1's to +1: rank 0 keeps nothing, yet no rank
stops) and "empty" (every score forced to -1, ``ippo_stop_patience=1``: both ranks stop at the first generation
batch). With ``scores``: "deflated" (``ippo_score="deflated"``, 1 step) and "adam" (``ippo_score="adam"``, 2 steps,
scores forced to +1 after they are recorded, so that the second batch is scored with AdamW state). With
``one-backward``: see ``one_backward_runs``."""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _trl_tiny import RecordingGRPO, float64_exact, lora_state, make_trainer  # noqa: E402

from ippo.integrations.trl import IPPOGRPOTrainer  # noqa: E402

# The run's shared settings (make_trainer's: IPPOConfig fields, the ippo_* ones among them); the test builds its
# 1-process reference with the same ones.
SETTINGS = dict(loss_type="dapo", beta=0.04, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                ippo_val_size=4, perturb=True)
# The runs with ippo_score (the "scores" mode): {run: (IPPOConfig fields, max_steps, forced scores)}.
SCORE_RUNS = {"deflated": (dict(ippo_score="deflated", ippo_deflate_dim=8, ippo_deflate_top=2), 1, None),
              "adam": (dict(ippo_score="adam", adam_beta2=0.9, adam_epsilon=1e-4), 2, lambda s, t: torch.ones_like(s))}


def forced(values):
    return lambda scores, trainer: torch.full_like(scores, values[trainer.accelerator.process_index])


def runs(mode: str):
    """(name, make_trainer keywords: IPPOConfig fields and force_scores) of every run of ``mode``."""
    if mode == "scores":
        return [(name, dict(max_steps=steps, force_scores=force, **kwargs))
                for name, (kwargs, steps, force) in SCORE_RUNS.items()]
    return [(name, dict(max_steps=2, force_scores=force, ippo_stop_patience=1 if name == "empty" else 2))
            for name, force in (("real", None), ("mixed", forced([-1.0, 1.0])), ("empty", forced([-1.0, -1.0])))]


def one_backward_runs(out: Path, rank: int) -> None:
    """Mode "one-backward": the same 2-step GRPO run (beta 0, float64 log-probs) on the one-backward and on the
    two-pass path."""
    for name in ("one-backward", "two-pass"):
        trainer = make_trainer(IPPOGRPOTrainer, out / name, max_steps=2, ippo_one_backward=name == "one-backward",
                               **{**SETTINGS, "loss_type": "grpo", "beta": 0.0, "seed": 1})
        float64_exact(trainer)
        initial = lora_state(trainer.model)
        trainer.train()
        torch.save({"initial": initial, "final": lora_state(trainer.model), "path": trainer.ippo_path,
                    "optimizer_steps": len(trainer.optimizer.state)}, out / f"{name}-rank{rank}.pt")


def main(out: Path, mode: str) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    if mode == "one-backward":
        return one_backward_runs(out, rank)
    for name, kwargs in runs(mode):
        trainer = make_trainer(RecordingGRPO, out / name, **kwargs, **SETTINGS)
        assert trainer.accelerator.num_processes == 2, trainer.accelerator.num_processes
        initial = lora_state(trainer.model)
        trainer.train()
        records = [{k: r[k] for k in ("step", "before", "after", "scores", "val_grads", "lora", "metrics_after")}
                   for r in trainer.records]
        torch.save({"initial": initial, "final": lora_state(trainer.model), "records": records,
                    "stopped": trainer.ippo_stopped, "global_step": trainer.state.global_step,
                    "optimizer_steps": len(trainer.optimizer.state)}, out / f"{name}-rank{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "filter")
