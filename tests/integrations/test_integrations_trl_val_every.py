"""``ippo_val_every`` (issue 20): the validation gradient V is computed at every k-th generation batch and reused in
between (the one-backward path with it: test_integrations_trl_one_backward.py); ``ippo_score="adam"``
preconditions the reused V afresh; a run resumed between two draws computes V again from the latest draw's rows and
then draws as the uninterrupted run."""

import json
import shutil

import torch
from _trl_tiny import RecordingGRPO, make_trainer, one_thread  # noqa: F401

import ippo.integrations.trl as trl

# 2 of the 6 validation pairs per draw (so that draws differ); runs go on whatever is kept
SETTINGS = dict(ippo_val_size=2, ippo_stop_when_empty=False)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(all(torch.equal(x, y) for x, y in zip(a[k], b[k])) for k in a)


def test_v_is_reused_between_draws(tmp_path):
    every = make_trainer(RecordingGRPO, tmp_path / "every", max_steps=3, ippo_val_every=2, **SETTINGS)
    every.train()
    fresh = make_trainer(RecordingGRPO, tmp_path / "fresh", max_steps=3, **SETTINGS)
    fresh.train()
    records = every.records
    assert ["val_indices" in r for r in records] == [True, False, True]  # drawn at batches 0 and 2 only
    # the draws are those of a run that computes V at every batch: draw 0, then draw 1
    assert records[0]["val_indices"] == fresh.records[0]["val_indices"]
    assert records[2]["val_indices"] == fresh.records[1]["val_indices"] != records[0]["val_indices"]
    assert same(records[0]["val_grads"], fresh.records[0]["val_grads"])
    assert same(records[1]["val_grads"], records[0]["val_grads"])  # batch 1 scored against batch 0's V ...
    assert not same(records[1]["val_grads"], fresh.records[1]["val_grads"])  # ... not a fresh one
    assert not same(records[2]["val_grads"], records[0]["val_grads"])
    assert (every._ippo_draws, every._ippo_batches) == (2, 3)


def test_adam_preconditions_the_reused_v_afresh(tmp_path, monkeypatch):
    calls = []
    precondition = trl.adam_preconditioned

    def recorded(val, optimizer, model):
        calls.append((val, precondition(val, optimizer, model)))
        return calls[-1][1]

    monkeypatch.setattr(trl, "adam_preconditioned", recorded)
    trainer = make_trainer(RecordingGRPO, tmp_path, max_steps=2, ippo_val_every=2, ippo_score="adam", **SETTINGS)
    trainer.train()
    assert len(calls) == 2 and calls[1][0] is calls[0][0]  # the one raw V, preconditioned at each batch
    records = trainer.records
    assert same(records[1]["val_grads"], calls[1][1])
    assert same(records[0]["val_grads"], calls[0][0])  # before the first step P = 1 ...
    assert not same(records[1]["val_grads"], records[0]["val_grads"])  # ... after it, the optimizer's P


def test_resume_between_draws(tmp_path):
    settings = dict(max_steps=3, ippo_val_every=2, save_strategy="steps", save_steps=1, **SETTINGS)
    uninterrupted = make_trainer(RecordingGRPO, tmp_path / "run", **settings)
    uninterrupted.train()
    draws = [r.get("val_indices") for r in uninterrupted.records]
    assert draws[0] != draws[2] and draws[1] is None
    # an older checkpoint without the batch count resumes the same way (the count = the draws, as before val_every)
    old = tmp_path / "old" / "checkpoint-1"
    shutil.copytree(tmp_path / "run" / "checkpoint-1", old)
    state = json.loads((old / "trainer_state.json").read_text())
    (saved,) = [v for k, v in state["stateful_callbacks"].items() if "ippo" in k.lower()]
    assert saved["attributes"].pop("_ippo_batches") == 1
    (old / "trainer_state.json").write_text(json.dumps(state))
    for checkpoint in (tmp_path / "run" / "checkpoint-1", old):
        resumed = make_trainer(RecordingGRPO, tmp_path / "resumed" / checkpoint.parent.name, **settings)
        resumed.train(resume_from_checkpoint=str(checkpoint))
        # batch 1: V again (a checkpoint holds none) from draw 0's rows; batch 2: draw 1, as uninterrupted
        assert [r["val_indices"] for r in resumed.records] == [draws[0], draws[2]]
        assert (resumed._ippo_draws, resumed._ippo_batches) == (2, 3)
