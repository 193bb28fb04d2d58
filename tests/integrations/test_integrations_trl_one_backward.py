"""The one-backward path of IPPOGRPOTrainer / IPPORLOOTrainer (issue 20): the scores and the filtered update from
TRL's own backward (``InfluenceScorer(episode_grads=True)``) against the two-pass path (a scoring pass, then TRL's
backward on reweighted advantages): equal LoRA weights after one and two optimizer steps for every tested loss type
and RLOO, with 2 micro-batches of gradient accumulation; nothing kept -> no optimizer step; every fallback condition
takes the two-pass path and says why; 2 gloo processes."""

import logging

import pytest
import torch
from _trl_tiny import (  # noqa: F401
    float64_exact,
    lora_state,
    make_trainer,
    one_thread,
    torchrun_workers,
)

import ippo.integrations.trl as trl
from ippo.integrations.trl import IPPOGRPOTrainer, IPPORLOOTrainer

# two micro-batches of 2 rows per generation batch (1 prompt x 2 completions each), one optimizer step per batch
SETTINGS = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, ippo_val_size=4, perturb=True, seed=1)


def trained(cls, out, one_backward, exact=True, **overrides):
    """(trainer, LoRA weights before, after) of a run of ``cls``; ``exact``: a float64 loss throughout
    (``float64_exact``)."""
    trainer = make_trainer(cls, out, ippo_one_backward=one_backward, **{**SETTINGS, **overrides})
    if exact:
        float64_exact(trainer)
    before = lora_state(trainer.model)
    trainer.train()
    return trainer, before, lora_state(trainer.model)


def assert_same_weights(a: dict, b: dict, before: dict, rtol: float) -> None:
    """Equal LoRA weights, relative to each tensor's largest weight, and the runs did move them."""
    moved = max((a[k] - before[k]).abs().max().item() for k in a)
    assert moved > 1e-4
    for key in a:
        scale = a[key].abs().max().item()
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=rtol * scale, msg=key)


CASES = [(IPPOGRPOTrainer, dict(loss_type=loss)) for loss in ("grpo", "dapo", "bnpo", "dr_grpo")] + \
    [(IPPORLOOTrainer, {})]


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("cls,settings", CASES, ids=["grpo", "dapo", "bnpo", "dr_grpo", "rloo"])
def test_one_backward_equals_two_pass(tmp_path, cls, settings, steps):
    two, before, two_final = trained(cls, tmp_path / "two", False, max_steps=steps, **settings)
    one, _, one_final = trained(cls, tmp_path / "one", True, max_steps=steps, **settings)
    assert (two.ippo_path, one.ippo_path) == ("two-pass", "one-backward")
    assert_same_weights(two_final, one_final, before, rtol=1e-10)
    kept = lambda t: [h["ippo/kept_fraction"] for h in t.state.log_history if "ippo/kept_fraction" in h]  # noqa: E731
    assert kept(one) == kept(two) and 0 < min(kept(one)) and max(kept(one)) < 1  # some rows kept, some dropped
    assert len(one.optimizer.state) == len(two.optimizer.state) > 0


@pytest.mark.parametrize("seed, pattern", [(0, [[False, False], [True, True]]), (1, [[True, True], [False, False]])])
def test_one_backward_equals_two_pass_when_a_micro_batch_keeps_nothing(tmp_path, monkeypatch, seed, pattern):
    """One micro-batch of the generation batch keeps nothing, the other keeps both rows (first or second: the
    .grad are then set by the second micro-batch, or left as the first set them)."""
    kept = []
    real_filter = trl.ippo_filter
    monkeypatch.setattr(trl, "ippo_filter", lambda *a: kept.append(real_filter(*a).keep.tolist()) or real_filter(*a))
    two, before, two_final = trained(IPPOGRPOTrainer, tmp_path / "two", False, max_steps=1, seed=seed)
    kept.clear()
    one, _, one_final = trained(IPPOGRPOTrainer, tmp_path / "one", True, max_steps=1, seed=seed)
    assert kept == pattern  # the one-backward path filters per micro-batch
    assert_same_weights(two_final, one_final, before, rtol=1e-10)


def test_one_backward_equals_two_pass_with_val_every(tmp_path):
    """ippo_val_every=2: V computed at batches 0 and 2, reused at 1, on both paths alike."""
    two, before, two_final = trained(IPPOGRPOTrainer, tmp_path / "two", False, max_steps=3, ippo_val_every=2)
    one, _, one_final = trained(IPPOGRPOTrainer, tmp_path / "one", True, max_steps=3, ippo_val_every=2)
    assert (two.ippo_path, one.ippo_path) == ("two-pass", "one-backward")
    assert (two._ippo_draws, two._ippo_batches) == (one._ippo_draws, one._ippo_batches) == (2, 3)
    assert_same_weights(two_final, one_final, before, rtol=1e-10)


def test_one_backward_with_gradient_checkpointing(tmp_path):
    """TRL's default gradient checkpointing (non-reentrant): the re-run forward adds nothing to the scores or to the
    rows' gradients."""
    settings = dict(max_steps=2, gradient_checkpointing=True)
    two, before, two_final = trained(IPPOGRPOTrainer, tmp_path / "two", False, **settings)
    one, _, one_final = trained(IPPOGRPOTrainer, tmp_path / "one", True, **settings)
    assert one.ippo_path == "one-backward" and one.args.gradient_checkpointing
    assert_same_weights(two_final, one_final, before, rtol=1e-10)


def test_one_backward_through_trls_float32_log_probs(tmp_path):
    """With TRL's own (float32) log-prob kernel the paths agree to float32 rounding (SGD, so the update is the
    gradient: Adam's first step divides by |g| and turns tiny rounding differences of tiny gradients into sign
    flips)."""
    two, before, two_final = trained(IPPOGRPOTrainer, tmp_path / "two", False, exact=False, max_steps=2, optim="sgd")
    one, _, one_final = trained(IPPOGRPOTrainer, tmp_path / "one", True, exact=False, max_steps=2, optim="sgd")
    updates = {k: two_final[k] - before[k] for k in before}
    for key, update in updates.items():
        torch.testing.assert_close(one_final[key] - before[key], update, rtol=0,
                                   atol=1e-5 * max(u.abs().max().item() for u in updates.values()), msg=key)


@pytest.mark.parametrize("one_backward", [True, False])
def test_nothing_kept_makes_no_optimizer_step(tmp_path, one_backward):
    """ippo_tol above every score: nothing kept, so no optimizer step (and no scheduler step), on either path; the
    run goes on (ippo_stop_when_empty=False) and logs kept_fraction 0."""
    trainer, before, after = trained(IPPOGRPOTrainer, tmp_path, one_backward, max_steps=2, ippo_tol=1e6,
                                     ippo_stop_when_empty=False)
    assert trainer.state.global_step == 2 and not trainer.ippo_stopped
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert len(trainer.optimizer.state) == 0 and trainer.lr_scheduler.last_epoch == 0
    assert [h["ippo/kept_fraction"] for h in trainer.state.log_history if "ippo/kept_fraction" in h] == [0.0, 0.0]


def test_one_backward_stop(tmp_path):
    """The intrinsic stop on the one-backward path: decided at the generation batch's last micro-batch, no step."""
    trainer, before, after = trained(IPPOGRPOTrainer, tmp_path, True, max_steps=3, ippo_tol=1e6,
                                     ippo_stop_rule="paper")
    assert trainer.ippo_stopped and trainer.state.global_step == 1
    assert all(torch.equal(before[k], after[k]) for k in before) and len(trainer.optimizer.state) == 0


FALLBACKS = {
    "ippo_one_backward": (dict(ippo_one_backward=False), "ippo_one_backward=False"),
    "num_iterations": (dict(num_iterations=2), "num_iterations=2"),
    "steps_per_generation": (dict(steps_per_generation=4), "steps_per_generation=4"),
    "beta": (dict(beta=0.04), "beta=0.04"),
    "entropy": (dict(entropy_coef=0.01), "entropy bonus"),
    "loss_type": (dict(loss_type="sapo"), "loss_type='sapo'"),
    "deflated": (dict(ippo_score="deflated", ippo_deflate_dim=8), "ippo_score='deflated'"),
    "reentrant": (dict(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True}),
                  "reentrant gradient checkpointing"),
}


@pytest.mark.parametrize("name", FALLBACKS)
def test_each_fallback_condition_takes_the_two_pass_path(tmp_path, caplog, name):
    settings, reason = FALLBACKS[name]
    trainer = make_trainer(IPPOGRPOTrainer, tmp_path, **{**SETTINGS, "ippo_one_backward": True, **settings})
    assert trainer.ippo_path == "two-pass" and reason in trainer._ippo_fallback_reason()
    calls = []
    trainer._ippo_filter = lambda batches, original=trainer._ippo_filter: calls.append(original(batches))
    with caplog.at_level(logging.INFO, logger="ippo.integrations.trl"):
        trainer.train()
    assert calls  # the scoring pass ran
    logged = [r.getMessage() for r in caplog.records if "two-pass path" in r.getMessage()]
    assert len(logged) == 1 and reason in logged[0]


@pytest.mark.parametrize("attribute, value, reason", [
    ("scaler", object(), "fp16 loss scaling"), ("optim", "lomo", "optim=lomo"),
    ("use_liger_kernel", True, "use_liger_kernel=True"), ("use_vllm", True, "use_vllm=True"),
])
def test_fallback_conditions_that_need_a_gpu(tmp_path, attribute, value, reason):
    """Conditions that cannot be set up on this CPU (fp16's GradScaler, LOMO, Liger, vLLM): the reason, read from the
    trainer's state."""
    trainer = make_trainer(IPPOGRPOTrainer, tmp_path, **{**SETTINGS, "ippo_one_backward": True})
    assert trainer._ippo_fallback_reason() is None
    target = {"scaler": trainer.accelerator, "optim": trainer.args, "use_liger_kernel": trainer.args}.get(attribute,
                                                                                                        trainer)
    setattr(target, attribute, value)
    assert reason in trainer._ippo_fallback_reason()


def test_one_backward_is_taken_and_logged(tmp_path, caplog):
    trainer = make_trainer(IPPOGRPOTrainer, tmp_path, **{**SETTINGS, "ippo_one_backward": True})
    trainer._ippo_filter = lambda batches: pytest.fail("the two-pass filter ran on the one-backward path")
    with caplog.at_level(logging.INFO, logger="ippo.integrations.trl"):
        trainer.train()
    assert trainer.ippo_path == "one-backward"
    assert sum("one-backward path" in r.getMessage() for r in caplog.records) == 1


def test_two_process_gloo(tmp_path):
    """2 processes: the one-backward run's LoRA weights after two steps equal on both ranks and equal to the two-pass
    run's (whose DDP behaviour, against 1 process on the union of the rows, test_integrations_trl.py checks)."""
    runs = torchrun_workers(tmp_path, ["one-backward", "two-pass"], "one-backward")
    one, two = runs["one-backward"], runs["two-pass"]
    for rank in (0, 1):
        assert one[rank]["path"] == "one-backward" and two[rank]["path"] == "two-pass"
        assert one[rank]["optimizer_steps"] > 0
    for key in one[0]["final"]:
        assert torch.equal(one[0]["final"][key], one[1]["final"][key]), key
    assert_same_weights(two[0]["final"], one[0]["final"], one[0]["initial"], rtol=1e-10)
