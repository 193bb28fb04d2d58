"""ippo.integrations.trl: IPPOGRPOTrainer / IPPORLOOTrainer on a tiny random float64 Qwen2 with peft LoRA, TRL's own
configs, CPU. The checklist of the issue:

(a) scores = <grad l_i, grad L_val> by an explicit loop over rows with TRL's own loss (beta = 0 and > 0, each
    loss_type's normalization, micro-batches of one generation batch): test_scores_match_per_row_loop, RLOO too;
(b) new advantages = old x weights, dropped rows exactly 0: test_advantages_reweighted, RLOO too;
(c) the scoring pass leaves parameters, .grad, RNG and TRL's metrics unchanged: test_scoring_pass_has_no_side_effects;
(d) all scores forced positive and equal = plain GRPOTrainer bit for bit: test_equal_scores_reproduce_plain_trainer;
(e) all scores <= 0: stop, no optimizer step, LoRA unchanged, final checkpoint: test_no_kept_row_stops_without_update;
    the evidence rule (default) stops only after ippo_stop_patience batches with reward signal:
    test_evidence_rule_needs_signal, test_evidence_rule_patience;
(f) steps_per_generation > 1 and num_iterations > 1: test_scored_once_per_generation_batch;
(g) 2 processes (torchrun, gloo): test_two_process_gloo.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _trl_tiny import (
    VALIDATION,
    RecordingGRPO,
    RecordingRLOO,
    check_one_process_union,
    config,
    load_lora_state,
    lora_state,
    make_trainer,
    one_thread,  # noqa: F401 (autouse)
    reference_scores,
    reference_validation_gradients,
    tiny_model,
    tokenizer,
    torchrun_workers,
)
from datasets import Dataset
from trl import GRPOTrainer, RLOOTrainer

from ippo.integrations.trl import IPPOGRPOTrainer, IPPORLOOTrainer

HERE = Path(__file__).resolve().parent
# Keys of TRL's logs that are timings (they differ between two otherwise identical runs).
TIMINGS = {"step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second"}

# (loss_type, beta, gradient_accumulation_steps = steps_per_generation, gradient checkpointing): each loss_type's
# normalization, the KL term, several micro-batches per generation batch, and HF's (non-reentrant) checkpointing.
GRPO_CASES = {
    "dapo-beta0": dict(loss_type="dapo", beta=0.0),
    "grpo-beta0.1-2micro": dict(loss_type="grpo", beta=0.1, gradient_accumulation_steps=2),
    "bnpo-beta0-2micro": dict(loss_type="bnpo", beta=0.0, gradient_accumulation_steps=2),
    "dr_grpo-beta0.1-ckpt": dict(loss_type="dr_grpo", beta=0.1, gradient_checkpointing=True),
}


def recorded_run(cls, tmp_path_factory, **settings):
    """One generation batch through ``cls`` (a recording trainer); returns (trainer, its record, settings)."""
    trainer = make_trainer(cls, tmp_path_factory.mktemp("run"), max_steps=1, perturb=settings.get("beta", 0) > 0,
                           **settings)
    trainer.train()
    assert len(trainer.records) == 1
    return trainer, trainer.records[0]


@pytest.fixture(scope="module", params=list(GRPO_CASES))
def grpo_run(request, tmp_path_factory):
    trainer, record = recorded_run(RecordingGRPO, tmp_path_factory, **GRPO_CASES[request.param])
    return trainer, record, 1.0  # GRPO's loss is already divided by the accumulation steps


@pytest.fixture(scope="module")
def rloo_run(tmp_path_factory):
    trainer, record = recorded_run(RecordingRLOO, tmp_path_factory, gradient_accumulation_steps=2)
    assert trainer.beta > 0
    return trainer, record, 0.5  # RLOO's loss is divided by the 2 accumulation steps by the Trainer


def check_scores(trainer, record, scale):
    model = trainer.accelerator.unwrap_model(trainer.model)
    load_lora_state(model, record["lora"])  # the sampling policy
    # The validation gradient: the mean NLL per gold token by a plain forward. TRL's per-token log-probs (which the
    # trainer uses) come from its fused LM head in float32, hence the float32-level tolerance.
    layers = list(record["val_grads"])
    expected = reference_validation_gradients(model, tokenizer(), VALIDATION, layers)
    for layer in layers:
        for got, want in zip(record["val_grads"][layer], expected[layer]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * want.abs().max().item())
    assert len(record["before"]) == trainer.args.steps_per_generation
    for batch, scores in zip(record["before"], record["scores"]):
        want = reference_scores(trainer, batch, record["val_grads"], scale)
        assert scores.dtype == torch.float64 and scores.shape == want.shape
        assert want.abs().max() > 0
        torch.testing.assert_close(scores, want, rtol=1e-9, atol=1e-12 * want.abs().max().item())


def check_weights(record, tol=0.0):
    """The evidence rule's (default) reweighting: kept = score > tol with a non-zero advantage."""
    scores = torch.cat(record["scores"])
    before = torch.cat([b["advantages"] for b in record["before"]])
    signal = before.reshape(len(before), -1).ne(0).any(1)
    keep = (scores > tol) & signal
    mean = scores[keep].mean()
    after = torch.cat(record["after"])
    assert after.dtype == before.dtype and after.shape == before.shape
    assert torch.all(after[~keep] == 0)
    torch.testing.assert_close(after[keep], (before[keep].double() * scores[keep] / mean).to(after.dtype))
    metrics = record["metrics_after"]
    assert metrics["ippo/kept_fraction"][-1] == pytest.approx(keep.double().mean().item())
    assert metrics["ippo/score_pos_frac"][-1] == pytest.approx((scores > 0).double().mean().item())
    assert metrics["ippo/score_mean"][-1] == pytest.approx(scores.mean().item())
    assert metrics["ippo/signal_fraction"][-1] == pytest.approx(signal.double().mean().item())
    assert metrics["ippo/scoring_seconds"][-1] > 0


def test_scores_match_per_row_loop(grpo_run):  # (a)
    check_scores(*grpo_run)


def test_advantages_reweighted(grpo_run):  # (b)
    trainer, record, _ = grpo_run
    scores = torch.cat(record["scores"])
    assert (scores > 0).any() and (scores <= 0).any(), "the case should have both kept and dropped rows"
    check_weights(record)
    # the micro-batches TRL trained on are the rewritten ones
    assert all(any(t is a for a in record["after_tensors"]) for t in trainer.trained_advantages)


def test_scoring_pass_has_no_side_effects(grpo_run):  # (c)
    _, record, _ = grpo_run
    for name, value in record["lora"].items():
        assert torch.equal(record["lora_after"][name], value), name
    assert record["grads"] and all(torch.equal(record["grads_after"][n], g) for n, g in record["grads"].items())
    assert torch.equal(record["rng"], record["rng_after"])
    before, after = record["metrics"], record["metrics_after"]
    assert {k: v for k, v in after.items() if not k.startswith("ippo/")} == before
    assert {k: len(v) for k, v in after.items() if k.startswith("ippo/")} == {
        "ippo/kept_fraction": 1, "ippo/score_mean": 1, "ippo/score_pos_frac": 1, "ippo/signal_fraction": 1,
        "ippo/nonfinite_scores": 1, "ippo/scoring_seconds": 1}


def test_ippo_metrics_in_trl_logs(grpo_run):
    trainer, record, _ = grpo_run
    logged = [h for h in trainer.state.log_history if "ippo/kept_fraction" in h]
    assert len(logged) == 1
    assert logged[0]["ippo/kept_fraction"] == pytest.approx(record["metrics_after"]["ippo/kept_fraction"][-1])
    assert {"ippo/score_mean", "ippo/score_pos_frac", "ippo/signal_fraction", "ippo/scoring_seconds", "reward",
            "entropy"} <= set(logged[0])


def test_rloo_scores_and_weights(rloo_run):  # (a), (b) and (c) for RLOO
    check_scores(*rloo_run)
    check_weights(rloo_run[1])
    test_scoring_pass_has_no_side_effects(rloo_run)


def comparable(history):
    return [{k: v for k, v in h.items() if k not in TIMINGS and not k.startswith("ippo/")} for h in history]


@pytest.mark.parametrize("plain, ippo, settings", [
    (GRPOTrainer, RecordingGRPO, dict(loss_type="grpo", beta=0.1, gradient_accumulation_steps=2)),
    (GRPOTrainer, RecordingGRPO, dict(loss_type="dapo", beta=0.0, steps_per_generation=2, num_iterations=2)),
    (RLOOTrainer, RecordingRLOO, dict(gradient_accumulation_steps=2)),
], ids=["grpo", "dapo-buffered", "rloo"])
def test_equal_scores_reproduce_plain_trainer(tmp_path, plain, ippo, settings):  # (d)
    runs = {}
    for cls in (plain, ippo):
        extra = {"force_scores": lambda s, t: torch.ones_like(s)} if cls is ippo else {}
        trainer = make_trainer(cls, tmp_path / cls.__name__, max_steps=3, ippo=cls is ippo, perturb=True,
                               **settings, **extra)
        initial = lora_state(trainer.model)
        trainer.train()
        runs[cls] = (trainer, initial)
    (base, base_initial), (filtered, initial) = runs[plain], runs[ippo]
    assert filtered.records and all(torch.equal(a, b["advantages"]) for r in filtered.records
                                    for a, b in zip(r["after"], r["before"]))
    assert all(torch.equal(initial[n], v) for n, v in base_initial.items())
    final, base_final = lora_state(filtered.model), lora_state(base.model)
    assert any(not torch.equal(final[n], initial[n]) for n in final), "training should move the LoRA"
    assert all(torch.equal(final[n], v) for n, v in base_final.items())
    assert comparable(filtered.state.log_history) == comparable(base.state.log_history)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_no_kept_row_stops_without_update(tmp_path, accumulation):  # (e)
    trainer = make_trainer(RecordingGRPO, tmp_path, max_steps=3, gradient_accumulation_steps=accumulation, beta=0.1,
                           perturb=True, save_strategy="steps", save_steps=100, ippo_stop_rule="paper",
                           force_scores=lambda s, t: torch.where(s > 0, -s, s))  # every score <= 0
    initial = lora_state(trainer.model)
    trainer.train()
    assert trainer.ippo_stopped and len(trainer.records) == 1
    assert trainer.state.global_step == 1  # the skipped window, then the stop
    assert not trainer.trained_advantages  # no forward/backward of the dropped batch
    assert len(trainer.optimizer.state) == 0  # AdamW never stepped
    assert trainer.lr_scheduler.last_epoch == 0 and trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2)
    assert all(getattr(x.step, "__name__", "") != "_skipped_step" for x in (trainer.optimizer, trainer.lr_scheduler))
    final = lora_state(trainer.model)
    assert all(torch.equal(final[n], v) for n, v in initial.items())
    assert trainer.state.log_history[0]["ippo/kept_fraction"] == 0
    # the final checkpoint, as the Trainer saves it at max_steps
    from safetensors.torch import load_file
    saved = load_file(tmp_path / "checkpoint-1" / "adapter_model.safetensors")
    assert len(saved) == len([n for n in initial if ".default." in n])
    assert all(torch.equal(v, initial[k.replace(".weight", ".default.weight")]) for k, v in saved.items())
    # train() again starts afresh (the stop is per run)
    trainer.args.max_steps = 2
    trainer.force_scores = None
    trainer.train()
    assert len(trainer.records) >= 2 and trainer.state.global_step >= 1


def test_stop_when_empty_false_continues(tmp_path):
    trainer = make_trainer(RecordingGRPO, tmp_path, max_steps=2, ippo_stop_when_empty=False,
                           force_scores=lambda s, t: -torch.ones_like(s))
    trainer.train()
    assert not trainer.ippo_stopped and trainer.state.global_step == 2 and len(trainer.records) == 2
    assert all(torch.all(a == 0) for r in trainer.records for a in r["after"])


def test_evidence_rule_needs_signal(tmp_path):
    # every reward equal: no row has an advantage, so no batch is evidence and training goes on (paper's rule: stop)
    settings = dict(max_steps=3, reward_funcs=lambda completions, **kw: [1.0] * len(completions),
                    force_scores=lambda s, t: -torch.ones_like(s))
    trainer = make_trainer(RecordingGRPO, tmp_path / "evidence", **settings)
    trainer.train()
    assert not trainer.ippo_stopped and trainer.state.global_step == 3 and len(trainer.records) == 3
    assert all(torch.all(torch.cat([b["advantages"] for b in r["before"]]) == 0) for r in trainer.records)
    assert [r["metrics_after"]["ippo/signal_fraction"][-1] for r in trainer.records] == [0.0, 0.0, 0.0]
    paper = make_trainer(RecordingGRPO, tmp_path / "paper", ippo_stop_rule="paper", **settings)
    paper.train()
    assert paper.ippo_stopped and paper.state.global_step == 1


@pytest.mark.parametrize("patience", [1, 2, 3])
def test_evidence_rule_patience(tmp_path, patience):
    # rewards with signal, nothing kept: the stop comes at the patience-th generation batch
    trainer = make_trainer(RecordingGRPO, tmp_path, max_steps=4, ippo_stop_patience=patience,
                           force_scores=lambda s, t: -s.abs())
    trainer.train()
    assert all(r["metrics_after"]["ippo/signal_fraction"][-1] > 0 for r in trainer.records)
    assert trainer.ippo_stopped and trainer.state.global_step == patience and len(trainer.records) == patience
    for record in trainer.records:
        assert all(torch.all(a == 0) for a in record["after"])


def test_evidence_rule_drops_rows_without_signal(tmp_path):
    # positive scores everywhere: only the rows with a non-zero advantage are kept, the weights use their scores alone
    def reward(completions, prompts, **kwargs):  # the same reward for every completion of a prompt with a "+"
        return [1.0 if "+" in p else float(sum(map(ord, c)) % 5) for p, c in zip(prompts, completions)]

    trainer = make_trainer(RecordingGRPO, tmp_path, max_steps=4, reward_funcs=reward, per_device_train_batch_size=8,
                           force_scores=lambda s, t: s.abs() + 1)
    trainer.train()
    fractions = []
    for record in trainer.records:
        before = torch.cat([b["advantages"] for b in record["before"]])
        fractions.append(before.ne(0).double().mean().item())
        check_weights(record | {"scores": [s.abs() + 1 for s in record["scores"]]})
    assert any(0 < f < 1 for f in fractions), f"the test needs rows with and without signal: {fractions}"


def test_stop_arguments_are_checked(tmp_path):  # by the config (every field: test_integrations_trl_args.py)
    with pytest.raises(ValueError, match="IPPOConfig: ippo_stop_rule"):
        config(tmp_path, ippo_stop_rule="never")
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="IPPOConfig: ippo_stop_patience"):
            config(tmp_path, ippo_stop_patience=bad)


def test_scored_once_per_generation_batch(tmp_path):  # (f)
    # 4 rows per generation batch, 2 micro-batches of 2, each used for 2 iterations: generation every 4 micro-steps.
    trainer = make_trainer(RecordingGRPO, tmp_path, max_steps=8, per_device_train_batch_size=2,
                           steps_per_generation=2, num_iterations=2)
    trainer.train()
    assert [r["step"] for r in trainer.records] == [0, 4]
    for record in trainer.records:
        assert [len(b["advantages"]) for b in record["before"]] == [2, 2]
        assert sum(len(s) for s in record["scores"]) == trainer.args.generation_batch_size
        check_weights(record)
    # every micro-batch TRL trained on is one of the rewritten ones, each used num_iterations times
    rewritten = [t for r in trainer.records for t in r["after_tensors"]]
    assert len(trainer.trained_advantages) == 8
    assert [sum(t is a for t in trainer.trained_advantages) for a in rewritten] == [2, 2, 2, 2]


def test_two_process_gloo(tmp_path):  # (g)
    runs = torchrun_workers(tmp_path, ("real", "mixed", "empty"))
    for name, (r0, r1) in runs.items():  # both ranks: same weights, same decisions, no hang
        assert r0["stopped"] == r1["stopped"] and r0["global_step"] == r1["global_step"], name
        assert all(torch.equal(r0["final"][n], v) for n, v in r1["final"].items()), name
        assert len(r0["records"]) == len(r1["records"]), name
        for a, b in zip(r0["records"], r1["records"]):
            for key in ("ippo/kept_fraction", "ippo/score_mean", "ippo/score_pos_frac"):
                assert a["metrics_after"][key][-1] == b["metrics_after"][key][-1], (name, key)
            for layer, (va, vb) in a["val_grads"].items():  # the all-reduced validation gradient
                assert torch.equal(va, b["val_grads"][layer][0]) and torch.equal(vb, b["val_grads"][layer][1])
    real, mixed, empty = runs["real"], runs["mixed"], runs["empty"]
    assert not real[0]["stopped"] and real[0]["global_step"] == 2
    assert any(not torch.equal(real[0]["final"][n], v) for n, v in real[0]["initial"].items())
    # rank 0 keeps nothing, rank 1 everything: no stop, rank 0's advantages 0, rank 1's unchanged (weights 1)
    assert not mixed[0]["stopped"] and mixed[0]["global_step"] == 2
    for a, b in zip(mixed[0]["records"], mixed[1]["records"]):
        assert a["metrics_after"]["ippo/kept_fraction"][-1] == 0.5
        assert all(torch.all(x == 0) for x in a["after"])
        assert all(torch.equal(x, y["advantages"]) for x, y in zip(b["after"], b["before"]))
    assert all(r["stopped"] and r["global_step"] == 1 and r["optimizer_steps"] == 0 for r in empty)
    assert all(torch.equal(r["final"][n], v) for r in empty for n, v in r["initial"].items())

    # The 1-process run on the union of both ranks' rows of the first generation batch gives the same scores,
    # validation gradient and weights.
    sys.path.insert(0, str(HERE))
    from _trl_ddp_worker import SETTINGS
    check_one_process_union(tmp_path / "union", [r["records"][0] for r in real], **SETTINGS)


# ---- set-ups that are refused, and errors ------------------------------------------------------------------------

@pytest.mark.parametrize("what, build, match", [
    ("no peft", lambda tok: tiny_model(tok).get_base_model(), "peft LoRA model"),
    ("DoRA", lambda tok: tiny_model(tok, use_dora=True), "DoRA"),
    ("Embedding LoRA", lambda tok: tiny_model(tok, targets=["q_proj", "embed_tokens"]), "only Linear LoRA"),
    ("modules_to_save", lambda tok: tiny_model(tok, modules_to_save=["lm_head"]), "outside the LoRA"),
])
def test_refuses_unsupported_models(tmp_path, what, build, match):
    tok = tokenizer()
    with pytest.raises(ValueError, match=match):
        make_trainer(IPPOGRPOTrainer, tmp_path, model=build(tok), tok=tok)


def test_refuses_sharded_and_bad_arguments(tmp_path):
    trainer = make_trainer(IPPOGRPOTrainer, tmp_path)
    trainer.is_fsdp_enabled = True
    with pytest.raises(ValueError, match="FSDP"):
        trainer._ippo_lora_weights()
    trainer.is_fsdp_enabled, trainer.is_deepspeed_enabled = False, True
    accelerator = trainer.accelerator
    plugin = type("Plugin", (), {"zero_stage": 3})
    trainer.accelerator = type("Accelerator", (), {"state": type("State", (), {"deepspeed_plugin": plugin})})
    with pytest.raises(ValueError, match="ZeRO-3"):
        trainer._ippo_lora_weights()
    trainer.accelerator, trainer.is_deepspeed_enabled = accelerator, False
    for kwargs, match in [({"validation_dataset": None}, "validation_dataset is required"),
                          ({"validation_dataset": Dataset.from_list([{"prompt": "1+1="}])}, "'completion'")]:
        with pytest.raises(ValueError, match=match):
            make_trainer(IPPOGRPOTrainer, tmp_path, **kwargs)
    for kwargs, match in [({"ippo_tol": -0.1}, "IPPOConfig: ippo_tol"), ({"ippo_val_size": 0}, "ippo_val_size")]:
        with pytest.raises(ValueError, match=match):
            config(tmp_path, **kwargs)


def test_zero_validation_gradient_is_an_error(tmp_path):
    tok = tokenizer()
    model = tiny_model(tok)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.zero_()  # A = B = 0: every LoRA gradient is 0
    trainer = make_trainer(IPPOGRPOTrainer, tmp_path, model=model, tok=tok)
    with pytest.raises(ValueError, match="validation gradient is zero"):
        trainer.train()


def test_conversational_validation_rows(tmp_path):
    tok = tokenizer()
    rows = [{"prompt": [{"role": "user", "content": "1+1?"}], "completion": [{"role": "assistant", "content": "2"}]},
            {"prompt": [{"role": "user", "content": "2+2?"}], "completion": "4"}]
    trainer = make_trainer(IPPOGRPOTrainer, tmp_path, tok=tok, validation_dataset=rows)  # a list works too
    for index, answer in ((0, "2"), (1, "4")):
        prompt = tok.apply_chat_template(rows[index]["prompt"], add_generation_prompt=True)["input_ids"]
        got_prompt, got_completion = trainer._ippo_val_pair(index)
        assert got_prompt == list(prompt)
        assert got_completion == tok(text=answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    trainer.args.max_steps = 1
    trainer.train()  # chat-template prompts end to end
    assert math.isfinite(trainer.state.log_history[0]["ippo/score_mean"])


def test_kernels_do_not_import_trl():
    code = "import sys, ippo, ippo.kernels, ippo.integrations; assert 'trl' not in sys.modules, 'trl imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_rloo_stops(tmp_path):
    trainer = make_trainer(IPPORLOOTrainer, tmp_path, max_steps=3, ippo_stop_rule="paper")
    initial = lora_state(trainer.model)
    trainer._ippo_scores = lambda batches, val_grads: [torch.zeros(len(b["advantages"]), dtype=torch.float64)
                                                        for b in batches]
    trainer.train()
    assert trainer.ippo_stopped and trainer.state.global_step == 1
    assert all(torch.equal(v, initial[n]) for n, v in lora_state(trainer.model).items())


def test_uses_the_shared_functions(tmp_path, monkeypatch):
    # the filter's math is ippo.train.ppo_math's, the LoRA lookup and the checks ippo.kernels' (no copies in trl.py)
    import ippo.integrations.trl as module
    import ippo.integrations.trl_config as config_module
    from ippo import kernels
    from ippo.train import config, ppo_math

    assert config_module.STOP_RULES is config.STOP_RULES and config_module.SCORES is config.SCORES
    calls = {}

    def spy(name, function):
        def wrapped(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return function(*args, **kwargs)
        monkeypatch.setattr(module, name, wrapped)

    for name, function in [("ippo_filter", ppo_math.ippo_filter), ("evidence_stop", ppo_math.evidence_stop),
                           ("lora_weights", kernels.lora_weights),
                           ("check_validation_gradient", kernels.check_validation_gradient),
                           ("segment_ids_from_mask", kernels.segment_ids_from_mask)]:
        spy(name, function)
    trainer = make_trainer(RecordingGRPO, tmp_path, max_steps=1, gradient_accumulation_steps=2)
    trainer.train()
    assert set(calls) == {"ippo_filter", "evidence_stop", "lora_weights", "check_validation_gradient",
                          "segment_ids_from_mask"}
    assert calls["ippo_filter"] == calls["evidence_stop"] == 1 and calls["segment_ids_from_mask"] == 2
    check_weights(trainer.records[0])
