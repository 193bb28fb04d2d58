"""FSDP2 (``fully_shard``, LoRA weights sharded as DTensors) on 2 processes (torchrun, CPU, gloo), against the
1-process run in float64: the kernel-level validation gradient and scores (``_fsdp2_kernel_worker.py``)."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _trl_tiny import one_thread, torchrun_workers  # noqa: E402, F401

EXACT = dict(rtol=1e-12, atol=0)


def assert_pairs_close(got: dict, want: dict, **tol) -> None:
    assert list(got) == list(want)
    for layer, pair in want.items():
        for a, b in zip(got[layer], pair):
            assert type(a) is torch.Tensor, type(a)  # plain tensors, what the scorer takes
            torch.testing.assert_close(a, b, **tol, msg=lambda m, layer=layer: f"{layer}: {m}")


def test_fsdp2_validation_gradients(tmp_path):
    """validation_gradients and policy.validation_gradient under FSDP2: every rank gets the full V of the unsharded
    model (1e-12 relative to the 1-process V), .grad untouched; the scorer inside a backward on each rank's half of
    the episodes gives the 1-process scores of those rows; the LoRA grads are Shard(0) DTensors, the rank average."""
    from _fsdp2_kernel_worker import ROWS, build, compute, data

    ranks = torchrun_workers(tmp_path, ["kernel"], worker="_fsdp2_kernel_worker.py")["kernel"]
    task, examples, episodes = data()
    single = compute(build(), task, examples, episodes, slice(0, ROWS))
    assert single["scores"].abs().min() > 0
    for r, got in enumerate(ranks):
        assert got["sharded"] and got["untouched"], r
        assert got["grad_placements"] == ["(Shard(dim=0),)"], got["grad_placements"]
        assert_pairs_close(got["val"], single["val"], **EXACT)
        assert_pairs_close(got["trainer_val"], single["trainer_val"], **EXACT)
        assert_pairs_close(got["trainer_val"], single["val"], rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(torch.cat([ranks[0]["scores"], ranks[1]["scores"]]), single["scores"], **EXACT)
    # each rank's backward covers its own rows; FSDP2 averages: the 1-process gradient of all rows, halved
    for layer, pair in single["grads"].items():
        for a, b in zip(ranks[0]["grads_full"][layer], pair):
            torch.testing.assert_close(a, b / 2, rtol=1e-12, atol=1e-15)
        for a, b in zip(ranks[1]["grads_full"][layer], ranks[0]["grads_full"][layer]):
            assert torch.equal(a, b)
