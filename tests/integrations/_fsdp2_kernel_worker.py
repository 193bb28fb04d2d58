"""Worker for tests/integrations/test_integrations_fsdp2.py::test_fsdp2_validation_gradients, launched with
``python -m torch.distributed.run --standalone --nproc_per_node 2 _fsdp2_kernel_worker.py OUT_DIR`` (CPU, gloo).

A float64 tiny Llama with peft LoRA, ``fully_shard`` on each decoder layer and on the root (FSDP2: the LoRA weights
become Shard(0) DTensors). Every rank computes, on the same data: ``ippo.kernels.validation_gradients`` of the SFT
loss, ``ippo.train.policy.validation_gradient`` (2 pairs per micro-batch), the influence scores of its own half of
the episodes (``InfluenceScorer`` inside a ``loss.backward()``) and the LoRA gradients that backward leaves; it
saves them to ``OUT_DIR/kernel-rank<r>.pt``. ``build()`` and ``data()`` are shared with the test's 1-process
reference."""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ippo.kernels import InfluenceScorer, lora_weights, validation_gradients  # noqa: E402
from ippo.testing import episode_losses, lora_llama, tiny_tokenizer  # noqa: E402
from ippo.train import policy  # noqa: E402
from ippo.train.tasks import make_task  # noqa: E402

TOK = tiny_tokenizer()
ROWS = 6  # episodes scored (3 per rank)


def build():
    return lora_llama(len(TOK), rank=4, alpha=8, lora_B_std=0.1, seed=0, hidden_size=32, dtype=torch.float64)


def data():
    """(task, validation examples, episodes (input_ids, targets, weights, attention_mask, segment_ids))."""
    task = make_task("arith", n_steps=2, digits=1, seed=0, sizes=(40, 12, 8))
    task.system_prompt = "Solve."
    g = torch.Generator().manual_seed(1)
    lengths = [5, 9, 7, 4, 8, 6]
    input_ids = torch.randint(3, len(TOK), (ROWS, 9), generator=g)
    targets = torch.randint(3, len(TOK), (ROWS, 9), generator=g)
    mask = (torch.arange(9)[None] < torch.tensor(lengths)[:, None]).long()
    weights = torch.randn(ROWS, 9, generator=g, dtype=torch.float64) * mask
    segment_ids = torch.arange(ROWS)[:, None].expand(ROWS, 9).masked_fill(mask == 0, -1).contiguous()
    return task, task.split("validation")[:6], (input_ids, targets, weights, mask, segment_ids)


def compute(model, task, examples, episodes, rows: slice) -> dict:
    """The kernel-level results on ``model`` (sharded or not); scores and gradients of the episodes ``rows``."""
    val = validation_gradients(model, policy.sft_loss(model, TOK, task, examples))
    untouched = all(w.grad is None for pair in lora_weights(model).values() for w in pair)
    trainer_val = policy.validation_gradient(model, TOK, task, examples, 2)
    input_ids, targets, weights, mask, segment_ids = (t[rows] for t in episodes)
    segment_ids = segment_ids - segment_ids[segment_ids >= 0].min()
    segment_ids = segment_ids.masked_fill(mask == 0, -1)
    with InfluenceScorer(model, val, segment_ids, len(input_ids)) as scorer:
        episode_losses(model, input_ids, targets, weights, mask).sum().backward()
    return {"val": {k: (v.A, v.B) for k, v in val.items()}, "untouched": untouched,
            "trainer_val": {k: (v.A, v.B) for k, v in trainer_val.items()}, "scores": scorer.scores,
            "grads": {k: (w.A.grad, w.B.grad) for k, w in lora_weights(model).items()}}


def main(out: Path) -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build()
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    sharded = all(isinstance(w, DTensor) for pair in lora_weights(model).values() for w in pair)
    task, examples, episodes = data()
    per = ROWS // world
    result = compute(model, task, examples, episodes, slice(rank * per, (rank + 1) * per))
    grads = result.pop("grads")
    result["sharded"] = sharded
    result["grad_placements"] = sorted({str(g.placements) if isinstance(g, DTensor) else type(g).__name__
                                        for pair in grads.values() for g in pair})
    result["grads_full"] = {k: tuple(g.full_tensor() for g in pair) for k, pair in grads.items()}
    torch.save(result, out / f"kernel-rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main(Path(sys.argv[1]))
