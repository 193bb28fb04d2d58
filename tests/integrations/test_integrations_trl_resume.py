"""ippo.integrations.trl: the I-PPO state (intrinsic stop, the evidence rule's streak, the validation draw position)
is saved with every TRL checkpoint and restored by ``train(resume_from_checkpoint=...)`` (issue 18)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from _trl_tiny import RecordingGRPO, lora_state, make_trainer, one_thread  # noqa: F401 (one_thread: autouse)

# Every generation batch has reward signal and keeps nothing: the evidence rule stops at the 2nd, step 2. 2 of the 6
# validation pairs per batch, so the draw position matters.
SETTINGS = dict(max_steps=4, save_strategy="steps", save_steps=1, ippo_val_size=2, ippo_stop_patience=2,
                force_scores=lambda s, t: -s.abs())


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """The uninterrupted run: checkpoints 1 (streak 1) and 2 (stopped)."""
    out = tmp_path_factory.mktemp("stopped")
    trainer = make_trainer(RecordingGRPO, out, **SETTINGS)
    trainer.train()
    assert trainer.ippo_stopped and trainer.state.global_step == 2 and len(trainer.records) == 2
    return out, trainer


@pytest.mark.parametrize("restore_callbacks", [False, True])
def test_resume_from_the_stop_checkpoint_does_not_train(tmp_path, stopped_run, restore_callbacks, caplog):
    out, _ = stopped_run
    checkpoint = out / "checkpoint-2"
    trainer = make_trainer(RecordingGRPO, tmp_path, restore_callback_states_from_checkpoint=restore_callbacks,
                           **SETTINGS)
    with caplog.at_level(logging.WARNING, logger="ippo.integrations.trl"):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.ippo_stopped and trainer.state.global_step == 2
    assert not trainer.records and not trainer.trained_advantages  # no generation batch scored, none trained on
    assert not list(tmp_path.glob("checkpoint-*"))  # nothing new saved
    assert any("had stopped" in r.getMessage() for r in caplog.records), caplog.text
    from safetensors.torch import load_file
    saved = load_file(checkpoint / "adapter_model.safetensors")
    final = lora_state(trainer.model)
    assert all(torch.equal(v, final[k.replace(".weight", ".default.weight")]) for k, v in saved.items())


def test_resume_from_the_stop_checkpoint_with_stop_when_empty_false_trains_on(tmp_path, stopped_run):
    out, _ = stopped_run
    trainer = make_trainer(RecordingGRPO, tmp_path, **{**SETTINGS, "ippo_stop_when_empty": False})
    trainer.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    assert not trainer.ippo_stopped and trainer.state.global_step == 4 and len(trainer.records) == 2


@pytest.mark.parametrize("restore_callbacks", [False, True])
def test_resume_restores_streak_and_validation_draws(tmp_path, stopped_run, restore_callbacks):
    out, uninterrupted = stopped_run
    state = json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())
    assert any("ippo" in name.lower() for name in state["stateful_callbacks"]), state["stateful_callbacks"]
    trainer = make_trainer(RecordingGRPO, tmp_path, restore_callback_states_from_checkpoint=restore_callbacks,
                           **SETTINGS)
    trainer.train(resume_from_checkpoint=str(out / "checkpoint-1"))
    # streak 1 restored: the next batch without a kept row is the 2nd in a row, and stops, as without the resume
    assert trainer.ippo_stopped and trainer.state.global_step == 2 and len(trainer.records) == 1
    assert trainer.records[0]["val_indices"] == uninterrupted.records[1]["val_indices"]
    # and a resumed run's checkpoint holds the state again: resuming from it does not train
    again = make_trainer(RecordingGRPO, tmp_path / "again", **SETTINGS)
    again.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert again.ippo_stopped and not again.records


def test_resume_from_a_checkpoint_without_ippo_state(tmp_path, stopped_run):
    # a checkpoint saved without the I-PPO state (e.g. by an older version): the run resumes with a fresh state
    out, _ = stopped_run
    checkpoint = tmp_path / "old" / "checkpoint-1"
    checkpoint.parent.mkdir()
    import shutil
    shutil.copytree(out / "checkpoint-1", checkpoint)
    path = checkpoint / "trainer_state.json"
    state = json.loads(path.read_text())
    state["stateful_callbacks"] = {k: v for k, v in state["stateful_callbacks"].items() if "ippo" not in k.lower()}
    path.write_text(json.dumps(state))
    trainer = make_trainer(RecordingGRPO, tmp_path / "run", **SETTINGS)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.ippo_stopped and trainer.state.global_step == 3 and len(trainer.records) == 2  # streak from 0
