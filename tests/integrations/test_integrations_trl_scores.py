"""ippo.integrations.trl: ``ippo_score`` (issue 19, item 2), the in-house trainer's --score variants in TRL. Each
trainer-computed score against an explicit per-row float64 reference (one TRL loss per row, the other rows
detached): answer (V of the final answers' tokens), adam (V preconditioned by the trainer's AdamW state, P = 1
before its first step), deflated (raw minus the generation batch's top sketch directions); centred is refused; every
bad keyword is a one-line ValueError naming it. raw is the default: tests/integrations/test_integrations_trl.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from _trl_tiny import (
    VALIDATION,
    RecordingGRPO,
    check_one_process_union,
    config,
    final_answer_positions,
    load_lora_state,
    make_trainer,
    one_thread,  # noqa: F401 (autouse)
    reference_scores,
    reference_validation_gradients,
    row_gradients,
    tokenizer,
    torchrun_workers,
)

from ippo.integrations.trl import IPPOGRPOTrainer, IPPORLOOTrainer
from ippo.kernels import lora_weights, sketch_gradients

# Gold solutions whose final answer follows the last '####' (surrounding whitespace, a newline, a second mark, a
# two-token answer); the tiny tokenizer is one token per character.
ANSWERS = [{"prompt": "4+4=", "completion": "4+4 #### 8"}, {"prompt": "9-3=", "completion": "9-3\n####6 "},
           {"prompt": "2*4=", "completion": "#### 7 ####  8"}, {"prompt": "7+3=", "completion": "7+3=#### 10"}]


def check_direction(record, expected):
    """The recorded V (what the scores were taken against) equals ``expected`` {layer: (A, B)} to float32 level (TRL's
    per-token log-probs come from its float32 LM head)."""
    for layer, pair in expected.items():
        for got, want in zip(record["val_grads"][layer], pair):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * want.abs().max().item())


def check_scores_against_rows(trainer, record, scale=1.0):
    """Every micro-batch's scores = scale * <g_i, recorded V> by the per-row loop, float64."""
    for batch, scores in zip(record["before"], record["scores"]):
        want = reference_scores(trainer, batch, record["val_grads"], scale)
        assert scores.dtype == torch.float64 and want.abs().max() > 0
        torch.testing.assert_close(scores, want, rtol=1e-9, atol=1e-12 * want.abs().max().item())


def sampling_policy(trainer, record):
    model = trainer.accelerator.unwrap_model(trainer.model)
    load_lora_state(model, record["lora"])
    return model


# ---- answer ------------------------------------------------------------------------------------------------------

def test_answer_scores_use_the_final_answers_validation_loss(tmp_path):
    trainer = make_trainer(RecordingGRPO, tmp_path, ippo_score="answer", validation_dataset=ANSWERS,
                           max_completion_length=16, gradient_accumulation_steps=2)
    tok = trainer.processing_class
    for index, row in enumerate(ANSWERS):  # the loss mask: the final answer's tokens, not eos
        prompt_ids, completion_ids, mask = trainer._ippo_val_row(index)
        assert completion_ids == tok(text=row["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert [i for i, m in enumerate(mask) if m] == final_answer_positions(row["completion"])
    trainer.train()
    record = trainer.records[0]
    model = sampling_policy(trainer, record)
    layers = list(record["val_grads"])
    expected = reference_validation_gradients(model, tokenizer(), ANSWERS, layers, answer_only=True)
    check_direction(record, expected)
    whole = reference_validation_gradients(model, tokenizer(), ANSWERS, layers)
    assert not all(torch.allclose(a, b) for layer in layers for a, b in zip(expected[layer], whole[layer]))
    check_scores_against_rows(trainer, record)


def test_answer_mask_of_chat_completions(tmp_path):
    chat = [{"role": "user", "content": "1+1?"}]
    rows = [{"prompt": chat, "completion": [{"role": "assistant", "content": "1+1 ####  2 "}]},
            {"prompt": chat, "completion": [{"role": "assistant", "content": "1+1 #### 2"},
                                            {"role": "user", "content": "and 3+9?"},
                                            {"role": "assistant", "content": "#### 12\n"}]},
            {"prompt": chat, "completion": "so #### 2"}]
    trainer = make_trainer(IPPOGRPOTrainer, tmp_path, ippo_score="answer", validation_dataset=rows,
                           max_completion_length=64)
    tok = trainer.processing_class
    for index, answer in enumerate(["2", "12", "2"]):
        prompt_ids, completion_ids, mask = trainer._ippo_val_row(index)
        kept = [token for token, m in zip(completion_ids, mask) if m]
        assert kept == tok(text=answer, add_special_tokens=False)["input_ids"], index


@pytest.mark.parametrize("row, match", [
    ({"prompt": "1+1=", "completion": "2"}, r"validation_dataset row 3: the completion has no '####'"),
    ({"prompt": "1+1=", "completion": "2 ####  "}, r"validation_dataset row 3: nothing follows the last '####'"),
    ({"prompt": "1+1=", "completion": "1+1 is 2 #### 2"}, r"validation_dataset row 3: no token of the final answer.*"
                                                          r"max_completion_length=8"),
    ({"prompt": [{"role": "user", "content": "1+1?"}], "completion": [{"role": "assistant", "content": "2"}]},
     r"validation_dataset row 3: the completion has no '####'"),
], ids=["no-mark", "empty-answer", "answer-cut-off", "chat-no-mark"])
def test_answer_needs_a_final_answer_in_every_row(tmp_path, row, match):
    rows = [{"prompt": "4+4=", "completion": "####8"}, {"prompt": "9-3=", "completion": "#### 6"},
            {"prompt": "2*4=", "completion": "8 #### 8"}, row]
    with pytest.raises(ValueError, match=match) as error:
        make_trainer(IPPOGRPOTrainer, tmp_path, ippo_score="answer", validation_dataset=rows, max_completion_length=8)
    assert "\n" not in str(error.value)
    make_trainer(IPPOGRPOTrainer, tmp_path, validation_dataset=rows, max_completion_length=8)  # raw takes the row


# ---- adam --------------------------------------------------------------------------------------------------------

class RecordingAdam(RecordingGRPO):
    """Also records the AdamW state (the torch optimizer under accelerate's wrapper) at each filter call."""

    def _ippo_filter(self, batches):
        state = self.optimizer.optimizer.state
        model = self.accelerator.unwrap_model(self.model)
        self.adam_states = getattr(self, "adam_states", [])
        self.adam_states.append({n: (state[p]["exp_avg_sq"].clone(), float(state[p]["step"]))
                                 for n, p in model.named_parameters() if p in state})
        super()._ippo_filter(batches)


def test_adam_preconditions_v_by_the_trainers_optimizer_state(tmp_path):
    beta2, eps = 0.9, 1e-4
    # every score forced positive after it is recorded: both batches train, so AdamW has a state at the second
    trainer = make_trainer(RecordingAdam, tmp_path, ippo_score="adam", max_steps=2, adam_beta2=beta2,
                           adam_epsilon=eps, loss_type="grpo", beta=0.1, perturb=True,
                           force_scores=lambda s, t: torch.ones_like(s))
    trainer.train()
    assert len(trainer.records) == 2 and not trainer.adam_states[0] and trainer.adam_states[1]
    for record, state in zip(trainer.records, trainer.adam_states):
        model = sampling_policy(trainer, record)
        names = {id(p): n for n, p in model.named_parameters()}
        layers = list(record["val_grads"])
        raw = reference_validation_gradients(model, tokenizer(), VALIDATION, layers)
        expected = {}
        for layer, weights in lora_weights(model).items():
            parts = []
            for weight, v in zip(weights, raw[layer]):
                if names[id(weight)] in state:  # P = 1 / (sqrt(exp_avg_sq / (1 - beta2^step)) + eps)
                    exp_avg_sq, step = state[names[id(weight)]]
                    v = v / ((exp_avg_sq / (1 - beta2 ** step)).sqrt() + eps)
                parts.append(v)
            expected[layer] = tuple(parts)
        check_direction(record, expected)
        check_scores_against_rows(trainer, record)
    # at the second batch P is not 1: the preconditioned V is not the raw one
    assert not torch.allclose(trainer.records[1]["val_grads"][layers[0]][0], raw[layers[0]][0], rtol=1e-2)


def test_adam_refuses_an_optimizer_without_adam_state(tmp_path):
    trainer = make_trainer(IPPOGRPOTrainer, tmp_path, ippo_score="adam", optim="sgd")
    with pytest.raises(ValueError, match=r"ippo_score='adam' needs an Adam/AdamW optimizer") as error:
        trainer.train()
    assert "\n" not in str(error.value)
    trainer = make_trainer(IPPOGRPOTrainer, tmp_path, ippo_score="adam")
    weights = lora_weights(trainer.accelerator.unwrap_model(trainer.model))
    trainer.is_deepspeed_enabled = True  # its optimizer's state is not per LoRA weight: refused at construction
    with pytest.raises(ValueError, match=r"ippo_score='adam' is not supported with DeepSpeed"):
        trainer._ippo_check_score(weights)


# ---- deflated ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls, settings, scale", [
    (RecordingGRPO, dict(loss_type="grpo", beta=0.1, perturb=True), 1.0),
    (None, dict(), 0.5),  # RLOO: the Trainer divides its loss by the 2 accumulation steps
], ids=["grpo-beta0.1", "rloo"])
def test_deflated_removes_the_generation_batchs_top_directions(tmp_path, cls, settings, scale):
    from _trl_tiny import RecordingRLOO

    k, top = 8, 2
    trainer = make_trainer(cls or RecordingRLOO, tmp_path, ippo_score="deflated", ippo_deflate_dim=k,
                           ippo_deflate_top=top, gradient_accumulation_steps=2, **settings)
    trainer.train()
    record = trainer.records[0]
    model = sampling_policy(trainer, record)
    val = record["val_grads"]
    check_direction(record, reference_validation_gradients(model, tokenizer(), VALIDATION, list(val)))
    # every row of the generation batch (both micro-batches): its gradient, raw score and sketch, one row at a time
    grads = [g for batch in record["before"] for g in row_gradients(trainer, batch, list(val))]
    raw = torch.stack([scale * sum((a * b).sum() for layer, pair in g.items() for a, b in zip(pair, val[layer]))
                       for g in grads])
    sketches = torch.stack([scale * sketch_gradients(g, k, 0) for g in grads])
    _, _, vh = torch.linalg.svd(sketches, full_matrices=False)
    expected = raw - (sketches @ vh[:top].T) @ (vh[:top] @ sketch_gradients(val, k, 0))
    got = torch.cat(record["scores"])
    assert got.dtype == torch.float64 and len(got) == 8 and (expected != 0).all()
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12 * expected.abs().max().item())
    assert not torch.allclose(expected, raw, rtol=1e-3)


# ---- 2 processes -------------------------------------------------------------------------------------------------

def test_two_process_scores(tmp_path):
    """torchrun, gloo: deflated gathers every process's scores and sketches (the 1-process deflation of the union of
    both ranks' rows gives the same scores); adam's V is the same on both ranks (DDP keeps their AdamW states equal)."""
    runs = torchrun_workers(tmp_path, ("deflated", "adam"), "scores")
    for name, (r0, r1) in runs.items():
        assert not r0["stopped"] and r0["global_step"] == r1["global_step"] == len(r0["records"]), name
        assert all(torch.equal(r0["final"][n], v) for n, v in r1["final"].items()), name
        for a, b in zip(r0["records"], r1["records"]):
            for key in ("ippo/kept_fraction", "ippo/score_mean", "ippo/score_pos_frac"):
                assert a["metrics_after"][key][-1] == b["metrics_after"][key][-1], (name, key)
            for layer, (va, vb) in a["val_grads"].items():
                assert torch.equal(va, b["val_grads"][layer][0]) and torch.equal(vb, b["val_grads"][layer][1])
    assert runs["adam"][0]["optimizer_steps"] > 0 and len(runs["adam"][0]["records"]) == 2
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _trl_ddp_worker import SCORE_RUNS, SETTINGS
    check_one_process_union(tmp_path / "union", [r["records"][0] for r in runs["deflated"]], **SETTINGS,
                            **SCORE_RUNS["deflated"][0])


# ---- keywords ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(ippo_score="cosine"), r"ippo_score must be one of \('raw', 'answer', 'adam', 'deflated'\)"),
    (dict(ippo_score=None), r"ippo_score must be one of"),
    (dict(ippo_score=["raw"]), r"ippo_score must be one of"),
    (dict(ippo_score="centred"), r"ippo_score='centred' is not supported in TRL: .*shuffles.*in-house trainer"),
    (dict(ippo_deflate_top=0), r"ippo_deflate_top must be an int >= 1"),
    (dict(ippo_deflate_top=1.0), r"ippo_deflate_top must be an int >= 1"),
    (dict(ippo_deflate_top=True), r"ippo_deflate_top must be an int >= 1"),
    (dict(ippo_deflate_top="2"), r"ippo_deflate_top must be an int >= 1"),
    (dict(ippo_deflate_dim=0), r"ippo_deflate_dim must be an int in \[1, 2\*\*24\]"),
    (dict(ippo_deflate_dim=8.0), r"ippo_deflate_dim must be an int"),
    (dict(ippo_deflate_dim="8"), r"ippo_deflate_dim must be an int"),
    (dict(ippo_deflate_dim=2**25), r"ippo_deflate_dim must be an int in \[1, 2\*\*24\]"),
], ids=["unknown", "none", "list", "centred", "top-0", "top-float", "top-bool", "top-str", "dim-0", "dim-float",
        "dim-str", "dim-too-wide"])
def test_score_keywords_are_checked(tmp_path, kwargs, match):  # by the config (test_integrations_trl_args.py: all)
    with pytest.raises(ValueError, match=r"^IPPOConfig: " + match) as error:
        config(tmp_path, **kwargs)
    assert "\n" not in str(error.value)


def test_deflate_dim_must_fit_the_lora_ranks(tmp_path):  # by the trainer, which knows the ranks
    with pytest.raises(ValueError, match=r"ippo_deflate_dim must be a multiple of 2r .*\[4\].*got 6") as error:
        make_trainer(IPPOGRPOTrainer, tmp_path, ippo_score="deflated", ippo_deflate_dim=6)
    assert "\n" not in str(error.value)


def test_deflate_dim_only_needs_the_ranks_when_deflated(tmp_path):
    trainer = make_trainer(IPPORLOOTrainer, tmp_path, ippo_deflate_dim=6)  # raw: the width is not used
    assert trainer.ippo_score == "raw" and trainer.ippo_deflate_dim == 6 and trainer.ippo_deflate_top == 1
