"""FSDP2 (``fully_shard``, LoRA weights sharded as DTensors) on 2 processes (torchrun, CPU, gloo), in float64: the
kernel-level validation gradient and scores against the 1-process run (``_fsdp2_kernel_worker.py``), and
IPPOGRPOTrainer under accelerate's FSDP2 plugin against the DDP run and the 1-process run
(``_trl_fsdp2_worker.py``)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _trl_tiny import check_one_process_union, one_thread, torchrun_workers  # noqa: E402, F401

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


def test_trainer_under_fsdp2(tmp_path):
    """IPPOGRPOTrainer and IPPORLOOTrainer with accelerate's FSDP2 plugin (fsdp_version 2, decoder layers
    wrapped): the validation gradient, scores, reweighted advantages and the weights after one optimizer step equal
    the DDP run's (same rows, same split of the validation pairs) to 1e-12; every rank gets the same V and takes the
    same keep/weights decision and stop; the LoRA gradients at the optimizer step are Shard(0) DTensors; a batch of
    which only rank 1 keeps rows trains without a hang; the 1-process filter on the union of both ranks' rows agrees
    (to TRL's float32 log-prob level, as for DDP: ``check_one_process_union``)."""
    from _trl_ddp_worker import SETTINGS

    runs = torchrun_workers(tmp_path, ("real", "mixed", "empty", "rloo", "ddp", "rloo-ddp"),
                            worker="_trl_fsdp2_worker.py")
    for name, (r0, r1) in runs.items():  # both ranks: same weights, same decisions, same V
        assert r0["stopped"] == r1["stopped"] and r0["global_step"] == r1["global_step"] == 1, name
        assert all(torch.equal(r0["final"][n], v) for n, v in r1["final"].items()), name
        assert len(r0["records"]) == len(r1["records"]) == 1, name
        a, b = r0["records"][0], r1["records"][0]
        for key in ("ippo/kept_fraction", "ippo/score_mean", "ippo/score_pos_frac", "ippo/signal_fraction"):
            assert a["metrics_after"][key][-1] == b["metrics_after"][key][-1], (name, key)
        for layer, (va, vb) in a["val_grads"].items():
            assert torch.equal(va, b["val_grads"][layer][0]) and torch.equal(vb, b["val_grads"][layer][1]), name
    real, ddp, mixed, empty = runs["real"], runs["ddp"], runs["mixed"], runs["empty"]
    for fsdp, plain in ((real, ddp), (runs["rloo"], runs["rloo-ddp"])):  # GRPO, RLOO
        for r in range(2):
            assert fsdp[r]["grad_types"] == [["DTensor(Shard(dim=0),)"]] and plain[r]["grad_types"] == [["Tensor"]]
            got, want = fsdp[r]["records"][0], plain[r]["records"][0]
            assert_pairs_close(got["val_grads"], want["val_grads"], **EXACT)
            for key in ("scores", "after"):
                for x, y in zip(got[key], want[key]):
                    torch.testing.assert_close(x, y, **EXACT)
            for n, v in plain[r]["final"].items():  # one optimizer step: FSDP2's full_tensor weights = DDP's
                torch.testing.assert_close(fsdp[r]["final"][n], v, rtol=1e-12, atol=1e-15)
        assert any(not torch.equal(fsdp[0]["final"][n], v) for n, v in fsdp[0]["initial"].items())
    assert mixed[0]["grad_types"] == [["DTensor(Shard(dim=0),)"]]
    # rank 0 keeps nothing, rank 1 everything: no stop, no hang, rank 0's advantages 0, rank 1's unchanged
    a, b = mixed[0]["records"][0], mixed[1]["records"][0]
    assert not mixed[0]["stopped"] and a["metrics_after"]["ippo/kept_fraction"][-1] == 0.5
    assert all(torch.all(x == 0) for x in a["after"])
    assert all(torch.equal(x, y["advantages"]) for x, y in zip(b["after"], b["before"]))
    assert any(not torch.equal(mixed[0]["final"][n], v) for n, v in mixed[0]["initial"].items())
    # nothing kept anywhere: both ranks stop at the first generation batch, without an update
    assert all(r["stopped"] and r["optimizer_steps"] == 0 for r in empty)
    assert all(torch.equal(r["final"][n], v) for r in empty for n, v in r["initial"].items())
    check_one_process_union(tmp_path / "union", [r["records"][0] for r in real], **SETTINGS)


# ---- refused set-ups (1 process) ---------------------------------------------------------------------------------

def _with_plugin(trainer, **plugin):
    """Gives ``trainer`` an accelerator whose state carries ``plugin`` (what accelerate builds for FSDP or DeepSpeed
    on GPUs), keeping the real accelerator's other attributes."""
    real = trainer.accelerator
    state = type("State", (), {"fsdp_plugin": type("Plugin", (), plugin)(),
                               "deepspeed_plugin": type("Plugin", (), plugin)()})()
    trainer.accelerator = type("Accelerator", (), {"state": state, "num_processes": real.num_processes,
                                                   "unwrap_model": staticmethod(real.unwrap_model)})()
    return trainer


def test_fsdp1_and_zero3_are_refused_with_the_reason(tmp_path):
    from _trl_tiny import make_trainer

    from ippo.integrations.trl import IPPOGRPOTrainer

    trainer = _with_plugin(make_trainer(IPPOGRPOTrainer, tmp_path), fsdp_version=1)
    trainer.is_fsdp_enabled = True
    with pytest.raises(ValueError, match=r"FSDP1 \(fsdp_version 1\) is not supported: it flattens and shards"):
        trainer._ippo_lora_weights()
    trainer = _with_plugin(make_trainer(IPPOGRPOTrainer, tmp_path), fsdp_version=2)
    trainer.is_fsdp_enabled = True
    assert len(trainer._ippo_lora_weights()) == 10  # FSDP2 is taken
    trainer.ippo_score = "adam"
    with pytest.raises(ValueError, match="ippo_score='adam' is not supported with FSDP yet"):
        trainer._ippo_check_score(trainer._ippo_lora_weights())
    trainer = _with_plugin(make_trainer(IPPOGRPOTrainer, tmp_path), zero_stage=3)
    trainer.is_deepspeed_enabled = True
    with pytest.raises(ValueError, match="ZeRO-3 is not supported: it shards the LoRA parameters"):
        trainer._ippo_lora_weights()


@pytest.mark.parametrize("deepspeed", [False, True])
def test_process_count_mismatch_is_refused(tmp_path, monkeypatch, deepspeed):
    """accelerate reporting 1 process while torch.distributed has 2 (seen with DeepSpeed on CPU under torchrun):
    the decision would be per process, so it is an error, at construction and at any later check."""
    from _trl_tiny import make_trainer

    from ippo.integrations.trl import IPPOGRPOTrainer

    trainer = make_trainer(IPPOGRPOTrainer, tmp_path)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    if deepspeed:
        trainer = _with_plugin(trainer, zero_stage=2)
        trainer.is_deepspeed_enabled = True
    match = r", but torch.distributed has world size 2: the I-PPO keep/weights decision and the stop would be taken per"
    with pytest.raises(ValueError, match="num_processes=1" + (" with DeepSpeed" if deepspeed else "") + match):
        trainer._ippo_lora_weights()
    with pytest.raises(ValueError, match="num_processes=1" + match):
        make_trainer(IPPOGRPOTrainer, tmp_path)
