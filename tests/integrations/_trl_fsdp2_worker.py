"""Worker for tests/integrations/test_integrations_fsdp2.py::test_trainer_under_fsdp2, launched with ``python -m
torch.distributed.run --standalone --nproc_per_node 2 _trl_fsdp2_worker.py OUT_DIR`` (CPU, gloo;
``_trl_tiny.torchrun_workers``).

FSDP2 through accelerate's own plugin, switched on by the environment that ``accelerate launch --config_file
examples/accelerate/fsdp2.yaml`` exports (``FSDP_ENV``; on CPU with ``fsdp_on_cpu``): IPPOGRPOTrainer
(``_trl_ddp_worker.SETTINGS``) runs "real" (real scores, 1 step), "mixed" (rank 0's scores forced to -1, rank 1's
to +1: only rank 1 keeps rows) and "empty" (every score -1, ``ippo_stop_patience=1``: both ranks stop at the first
generation batch) and "rloo" (IPPORLOOTrainer, 1 step), then "ddp" and "rloo-ddp", the "real" and "rloo" runs
again without FSDP (accelerate's state reset in between), the references for the FSDP2 runs' V, scores and updated
weights. Each saves ``OUT_DIR/<run>-rank<r>.pt``, with the LoRA
weights as full tensors and the types and placements of the LoRA gradients at the optimizer step."""

import os
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _trl_ddp_worker import SETTINGS, forced  # noqa: E402
from _trl_tiny import RecordingGRPO, RecordingRLOO, make_trainer  # noqa: E402

# the environment that `accelerate launch --config_file examples/accelerate/fsdp2.yaml` gives its processes
# (accelerate 1.16, printed from a launched script)
FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_ACTIVATION_CHECKPOINTING": "false",
            "FSDP_ACTIVATION_CHECKPOINTING_OFFLOAD": "false", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
            "FSDP_CPU_RAM_EFFICIENT_LOADING": "false", "FSDP_FORWARD_PREFETCH": "false",
            "FSDP_MIN_NUM_PARAMS": "100000000", "FSDP_OFFLOAD_PARAMS": "false", "FSDP_RESHARD_AFTER_FORWARD": "true",
            "FSDP_SHARDING_STRATEGY": "FULL_SHARD", "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT",
            "FSDP_SYNC_MODULE_STATES": "true", "FSDP_TRANSFORMER_CLS_TO_WRAP": "Qwen2DecoderLayer",
            "FSDP_USE_ORIG_PARAMS": "true", "FSDP_VERSION": "2"}
# Each run's make_trainer keywords (IPPOConfig / IPPORLOOConfig fields, the ippo_* ones among them, and force_scores).
# "mixed" also scores with ippo_score="deflated" (before the forced scores replace them) and draws 5 validation pairs,
# 3 for rank 0 and 2 for rank 1: with 2 pairs per forward, rank 1 runs a forward on a masked pair to keep FSDP2's
# collectives matched (without it, the run hangs)
RUNS = {"real": dict(max_steps=1),
        "mixed": dict(max_steps=1, force_scores=forced([-1.0, 1.0]), ippo_val_size=5, ippo_score="deflated",
                      ippo_deflate_dim=8),
        "empty": dict(max_steps=2, force_scores=forced([-1.0, -1.0]), ippo_stop_patience=1),
        "rloo": dict(max_steps=1, cls=RecordingRLOO),
        "ddp": dict(max_steps=1),
        "rloo-ddp": dict(max_steps=1, cls=RecordingRLOO)}
# IPPORLOOTrainer's runs take RLOO's own loss (no loss_type), with the rest of SETTINGS
RLOO_SETTINGS = {k: v for k, v in SETTINGS.items() if k != "loss_type"}


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t.detach().clone()


def lora_full(model) -> dict[str, torch.Tensor]:
    return {n: full(p.detach()) for n, p in model.named_parameters() if "lora_" in n}


class GradTypes(TrainerCallback):
    """Records, at each optimizer step, the type and placements of the trained LoRA weights' gradients."""

    def __init__(self):
        self.seen = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.seen.append(sorted({f"{type(p.grad).__name__}{getattr(p.grad, 'placements', '')}"
                                 for n, p in model.named_parameters() if "lora_" in n and p.requires_grad}))


def fsdp_on_cpu() -> None:
    """accelerate 1.16 takes FSDP only on GPU-like devices: on CPU its ``AcceleratorState`` keeps MULTI_CPU and drops
    the FSDP plugin without a word. This patches the state's constructor to finish as it does on GPUs (FSDP, the
    plugin that ``Accelerator`` built from ``FSDP_ENV``), so that the rest (accelerate's FSDP2 wrapping, its
    no_sync, the Trainer's FSDP paths, the I-PPO trainer) runs as there."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__
    if getattr(original, "_fsdp_on_cpu", False):
        return

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if (os.environ.get("ACCELERATE_USE_FSDP") == "true" and fsdp_plugin is not None
                and self.distributed_type == DistributedType.MULTI_CPU):
            self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    init._fsdp_on_cpu = True
    AcceleratorState.__init__ = init


def main(out: Path) -> None:
    from accelerate.state import AcceleratorState

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    for name, kwargs in RUNS.items():
        if "ddp" in name:  # the DDP runs come last
            for key in FSDP_ENV:
                os.environ.pop(key, None)
            AcceleratorState._reset_state()
        else:
            os.environ.update(FSDP_ENV)
            fsdp_on_cpu()
        cls = kwargs.pop("cls", RecordingGRPO)
        trainer = make_trainer(cls, out / name, **{**(SETTINGS if cls is RecordingGRPO else RLOO_SETTINGS), **kwargs})
        assert trainer.accelerator.num_processes == 2, trainer.accelerator.num_processes
        assert trainer.is_fsdp_enabled == ("ddp" not in name), (name, trainer.is_fsdp_enabled)
        grad_types = GradTypes()
        trainer.add_callback(grad_types)
        initial = lora_full(trainer.model)
        trainer.train()
        records = [{k: r[k] for k in ("step", "before", "after", "scores", "val_grads", "metrics_after")}
                   for r in trainer.records]
        for record, full_record in zip(records, trainer.records):
            record["lora"] = {n: full(v) for n, v in full_record["lora"].items()}
        torch.save({"initial": initial, "final": lora_full(trainer.model), "records": records,
                    "stopped": trainer.ippo_stopped, "global_step": trainer.state.global_step,
                    "grad_types": grad_types.seen, "optimizer_steps": len(trainer.optimizer.state)},
                   out / f"{name}-rank{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
