"""The evidence stop rule, reward noise, the probe metrics (AUCs) and ``ippo probe``, on the tiny model."""

import dataclasses
import itertools
import json
import math

import pytest
import torch
from helpers import cfg_for, lora_state, records, run, saved_tiny, tiny

from ippo.train import cli, config, learner, policy, probe, report, scoring, stats
from ippo.train import ppo_math as pm


def alternating(completions, examples):
    """Rewards 1, 0, 1, 0, ... in buffer order: every prompt group of >= 2 episodes carries reward signal."""
    return [float(i % 2 == 0) for i in range(len(completions))]


def constant(completions, examples):
    """Reward 1 for every episode: no group carries reward signal."""
    return [1.0] * len(completions)


# --------------------------------------------------------------------------- the math


def test_signal_episodes_marks_groups_with_two_rewards():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.5])
    groups = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3])
    assert pm.signal_episodes(rewards, groups).tolist() == [False] * 3 + [True] * 2 + [False] * 3
    assert pm.signal_episodes(torch.tensor([0.0, 0.3]), torch.tensor([5, 5])).tolist() == [True, True]
    with pytest.raises(ValueError, match="group_ids"):
        pm.signal_episodes(rewards, groups[:3])


def test_evidence_stop_needs_patience_consecutive_empty_iterations_with_signal():
    def replay(events, patience):
        streak, stops = 0, []
        for has_signal, kept_any in events:
            streak, stop = pm.evidence_stop(streak, has_signal, kept_any, patience)
            stops.append((streak, stop))
        return stops

    empty, kept, silent = (True, False), (True, True), (False, False)
    assert replay([empty, empty], 2) == [(1, False), (2, True)]
    assert replay([empty, kept, empty, empty], 2) == [(1, False), (0, False), (1, False), (2, True)]
    # an iteration without reward signal is no evidence: it neither counts nor resets
    assert replay([empty, silent, silent, empty], 2) == [(1, False), (1, False), (1, False), (2, True)]
    assert replay([silent] * 5, 1) == [(0, False)] * 5
    assert replay([empty], 1) == [(1, True)]
    with pytest.raises(ValueError, match="patience"):
        pm.evidence_stop(0, True, False, 0)


def test_filter_never_keeps_episodes_without_signal():
    scores = torch.tensor([5.0, 4.0, -1.0, 2.0, -3.0])
    signal = torch.tensor([False, False, True, True, True])
    keep, weights, empty = pm.ippo_filter(scores, 0.0, signal)
    assert keep.tolist() == [False, False, False, True, False] and not empty
    torch.testing.assert_close(weights, torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0]))
    keep, weights, empty = pm.ippo_filter(scores, 0.0, torch.tensor([True, True, False, False, False]))
    torch.testing.assert_close(weights, torch.tensor([5 / 4.5, 4 / 4.5, 0.0, 0.0, 0.0]))
    assert pm.ippo_filter(scores, 0.0, torch.tensor([False, False, True, False, True])).stop  # empty
    assert not pm.ippo_filter(scores, 0.0).stop  # the paper's rule: every episode decides


def test_random_keep_draws_as_many_among_the_candidates():
    candidates = torch.tensor([False, True, True, True, False, True])
    keep = torch.tensor([False, True, False, True, False, False])
    draws = set()
    for seed in range(40):
        chosen, weights, stop = pm.random_keep(keep, candidates, seed)
        assert int(chosen.sum()) == 2 and not (chosen & ~candidates).any() and not stop
        torch.testing.assert_close(weights, chosen.float())
        assert torch.equal(chosen, pm.random_keep(keep, candidates, seed).keep)  # seeded
        draws.add(tuple(chosen.tolist()))
    assert len(draws) == 6  # all C(4, 2) subsets of the candidates occur
    assert not pm.random_keep(torch.zeros(6, dtype=torch.bool), candidates, 0).keep.any()
    with pytest.raises(ValueError, match="within candidates"):
        pm.random_keep(torch.tensor([True] + [False] * 5), candidates, 0)
    with pytest.raises(ValueError, match="alike"):
        pm.random_keep(keep[:3], candidates, 0)


def test_keep_by_random_keeps_as_many_signal_episodes_with_weight_1(tmp_path, monkeypatch):
    scores = torch.tensor([3.0, -1.0, 2.0, 1.0, -2.0, 4.0])  # 4 positive: the filter keeps the signal ones of them
    monkeypatch.setattr(scoring, "score_episodes", lambda *a, **k: scores.clone())
    kept = {}
    real = pm.random_keep

    def spy(keep, candidates, seed):
        out = real(keep, candidates, seed)
        kept.setdefault("calls", []).append((keep.clone(), candidates.clone(), out))
        return out

    monkeypatch.setattr(pm, "random_keep", spy)
    run(cfg_for(tmp_path, algo="ippo", iterations=2, eval_every=10, keep_by="random"), tmp_path / "run",
        reward_fn=alternating)
    recs = records(tmp_path / "run")[1:]
    assert len(kept["calls"]) == 2
    for (keep, candidates, out), rec in zip(kept["calls"], recs):
        assert candidates.all() and int(keep.sum()) == 4  # every group has signal under `alternating`
        assert int(out.keep.sum()) == 4 and torch.equal(out.weights, out.keep.float())
        assert rec["kept_fraction"] == rec["score_kept_fraction"] == pytest.approx(4 / 6)
    with pytest.raises(ValueError, match="--keep-by"):
        config.Config(keep_by="best").validate()


@pytest.mark.parametrize("n", [1, 7, 16, 33])
def test_reward_flips_are_seeded_and_exactly_p_times_e_rounded(n):
    rewards = (torch.arange(n) % 3 == 0).float()
    for p in (0.0, 0.1, 0.3, 0.5, 0.99):
        flipped_rewards, flipped = pm.flip_rewards(rewards, p, seed=11)
        assert int(flipped.sum()) == round(p * n)
        torch.testing.assert_close(flipped_rewards, torch.where(flipped, 1 - rewards, rewards))
        again, flipped_again = pm.flip_rewards(rewards, p, seed=11)
        assert torch.equal(again, flipped_rewards) and torch.equal(flipped_again, flipped)
    draws = {tuple(pm.flip_rewards(torch.zeros(16), 0.3, seed=s)[1].tolist()) for s in range(10)}
    assert len(draws) > 1  # another seed, other episodes
    with pytest.raises(ValueError, match="binary"):
        pm.flip_rewards(torch.tensor([0.0, 0.5]), 0.3, seed=0)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        pm.flip_rewards(rewards, 1.0, seed=0)


def brute_force_low_auc(values, positive):
    pairs = [(v, w) for (v, p), (w, q) in itertools.product(zip(values, positive), repeat=2) if p and not q]
    return sum(1.0 if v < w else 0.5 if v == w else 0.0 for v, w in pairs) / len(pairs)


def test_low_auc_matches_the_pairwise_count_with_ties():
    generator = torch.Generator().manual_seed(0)
    for n in (2, 5, 16, 40):
        for _ in range(20):
            values = torch.randint(0, 4, (n,), generator=generator).float()  # many ties
            positive = torch.rand(n, generator=generator) < 0.4
            if positive.all() or not positive.any():
                continue
            assert stats.low_auc(values, positive) == pytest.approx(brute_force_low_auc(values.tolist(),
                                                                                      positive.tolist()))
    assert stats.low_auc(torch.tensor([0.0, 1.0]), torch.tensor([True, False])) == 1.0
    assert stats.low_auc(torch.tensor([1.0, 1.0]), torch.tensor([True, False])) == 0.5
    assert stats.low_auc(torch.tensor([1.0, 2.0]), torch.tensor([True, True])) is None  # one class: no AUC
    assert stats.low_auc(torch.tensor([1.0, 2.0]), torch.tensor([False, False])) is None


def test_spearman_with_ties_and_constants():
    x = torch.tensor([1.0, 2.0, 2.0, 5.0])
    assert stats.spearman(x, x * 3 - 1) == pytest.approx(1.0)
    assert stats.spearman(x, -x) == pytest.approx(-1.0)
    assert stats.spearman(x, torch.ones(4)) is None
    assert stats.average_ranks(torch.tensor([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]


# --------------------------------------------------------------------------- the trainer


def test_groups_without_signal_decide_nothing(tmp_path, monkeypatch):
    """All rewards equal and every score negative: the paper's rule stops at once; the evidence rule keeps going,
    updates nothing (no signal: nothing kept) and counts no evidence."""
    monkeypatch.setattr(scoring, "score_episodes", lambda *a, **k: -torch.ones(6))
    run(cfg_for(tmp_path, algo="ippo", iterations=3, stop_rule="paper"), tmp_path / "paper", reward_fn=constant)
    assert [r["iteration"] for r in records(tmp_path / "paper")] == [0, 1]
    run(cfg_for(tmp_path, algo="ippo", iterations=3), tmp_path / "evidence", reward_fn=constant)
    recs = records(tmp_path / "evidence")[1:]
    assert [r["iteration"] for r in recs] == [1, 2, 3]
    for r in recs:
        assert r["signal_fraction"] == 0 and r["empty_streak"] == 0 and r["kept_fraction"] == 0
        assert not r["early_stop"] and "pg_loss" not in r
    # positive scores do not make episodes without signal count either
    monkeypatch.setattr(scoring, "score_episodes", lambda *a, **k: torch.ones(6))
    run(cfg_for(tmp_path, algo="ippo", iterations=1), tmp_path / "positive", reward_fn=constant)
    assert records(tmp_path / "positive")[-1]["kept_fraction"] == 0


def test_evidence_stop_after_patience_and_across_resume(tmp_path, monkeypatch):
    monkeypatch.setattr(scoring, "score_episodes", lambda *a, **k: -torch.ones(6))
    cfg = dict(algo="ippo", iterations=4, stop_patience=2, eval_every=10)
    run(cfg_for(tmp_path, **cfg), tmp_path / "straight", reward_fn=alternating)
    recs = records(tmp_path / "straight")
    assert [(r["iteration"], r["empty_streak"], r["early_stop"]) for r in recs[1:]] == [(1, 1, False), (2, 2, True)]
    assert recs[1]["signal_fraction"] == 1 and "eval" in recs[-1]
    # killed after iteration 1: the streak comes back from the checkpoint
    run(cfg_for(tmp_path, **(cfg | {"iterations": 1})), tmp_path / "resumed", reward_fn=alternating)
    run(cfg_for(tmp_path, **cfg), tmp_path / "resumed", reward_fn=alternating, resume=True)
    assert [(r["iteration"], r["empty_streak"]) for r in records(tmp_path / "resumed")[1:]] == [(1, 1), (2, 2)]


@pytest.mark.parametrize("algo", ["ppo", "ippo"])
def test_reward_noise_is_logged_and_exact_across_resume(tmp_path, algo):
    cfg = dict(algo=algo, iterations=3, reward_noise=0.5, eval_every=10, samples_per_prompt=4, stop_rule="paper")
    run(cfg_for(tmp_path, **cfg), tmp_path / "straight", reward_fn=alternating)
    calls = {"n": 0}

    def dies_in_iteration_3(completions, examples):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return alternating(completions, examples)

    with pytest.raises(KeyboardInterrupt):
        run(cfg_for(tmp_path, **cfg), tmp_path / "killed", reward_fn=dies_in_iteration_3)
    run(cfg_for(tmp_path, **cfg), tmp_path / "killed", reward_fn=alternating, resume=True)
    straight, killed = records(tmp_path / "straight")[1:], records(tmp_path / "killed")[1:]
    keys = ["reward", "flipped", "flip_auc_advantage", "flip_auc_random", "flip_auc_score", "flip_recall",
            "flip_recall_random"]
    assert [[r.get(k) for k in keys] for r in straight] == [[r.get(k) for k in keys] for r in killed]
    a, b = lora_state(tmp_path / "straight"), lora_state(tmp_path / "killed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    for r in straight:
        assert r["flipped"] == 4  # round(0.5 * 8)
        assert 0 <= r["flip_auc_advantage"] <= 1 and 0 <= r["flip_auc_random"] <= 1
        assert ("flip_auc_score" in r) == (algo == "ippo")
        assert "unfaithful_auc_score" not in r  # a random tiny model is never right: one class, not logged
    assert "flipped" not in records(tmp_path / "straight")[0]
    md = report.write_report([tmp_path / "straight"], tmp_path / "report", title="noisy run")
    assert md.read_text().startswith("# noisy run\n")  # the AUC plots' titles once took the report's
    assert (tmp_path / "report" / "reward_noise.png").stat().st_size > 0
    assert not (tmp_path / "report" / "unfaithful_auc.png").exists()  # never both classes: nothing to plot


def test_reward_noise_needs_binary_rewards(tmp_path):
    with pytest.raises(ValueError, match="--reward-noise.*binary"):
        run(cfg_for(tmp_path, algo="ppo", reward_noise=0.3), tmp_path / "run",
            reward_fn=lambda c, e: [0.5] * len(c))


@pytest.mark.parametrize("option, value, message", [
    ("reward_noise", 1.0, r"--reward-noise must be in \[0, 1\)"),
    ("reward_noise", -0.1, r"--reward-noise must be in \[0, 1\)"),
    ("stop_rule", "never", "--stop-rule must be one of"),
    ("stop_patience", 0, "--stop-patience must be >= 1"),
    ("samples_per_prompt", 1, "--stop-rule evidence"),
])
def test_new_options_are_validated(tmp_path, option, value, message):
    with pytest.raises(ValueError, match=message):
        cfg_for(tmp_path, algo="ippo", **{option: value}).validate()
    cfg_for(tmp_path, algo="ippo", samples_per_prompt=1, stop_rule="paper").validate()


def test_faithfulness_auc_among_correct_episodes():
    """probe_metrics' faithfulness part on a hand-made buffer: two correct episodes, one with a wrong step."""
    from ippo.train.tasks import Arith, Example

    task = Arith(n_steps=2, digits=1, seed=0, sizes=(4, 4, 4))
    ex = Example("2 + 3 then * 2", "2 + 3 = 5\n5 * 2 = 10\n#### 10")
    texts = ["2 + 3 = 5\n5 * 2 = 10\n#### 10", "2 + 3 = 6\n6 * 2 = 10\n#### 10", "#### 7"]
    correct, unfaithful = probe.faithfulness(task, texts, [ex] * 3)
    assert correct.tolist() == [True, True, False] and unfaithful.tolist() == [False, True, False]
    assert probe.faithfulness(task, ["#### 10\n2 + 3 = 6"], [ex])[1].tolist() == [True]  # right, a wrong step
    assert probe.faithfulness(task, ["#### 11\n2 + 3 = 6"], [ex])[1].tolist() == [False]  # wrong: not unfaithful
    mask = torch.ones(3, 2)
    ro = policy.Rollout(torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2), mask, 0, texts, [ex] * 3,
                   torch.zeros(3, dtype=torch.long))
    buf = learner.Buffer(ro, torch.tensor([1.0, 1.0, 0.0]), 0, None, torch.zeros(3, 2), None,
                   advantages=torch.tensor([[1.0, 1.0], [2.0, 2.0], [-1.0, -1.0]]))
    out = probe.probe_metrics(task, buf, torch.tensor([0.5, -0.5, 9.0]), torch.ones(3, dtype=torch.bool), "0:1")
    assert out == {"unfaithful": 1, "unfaithful_auc_score": 1.0, "unfaithful_auc_advantage": 0.0}
    given = (torch.ones(3, dtype=torch.bool), torch.zeros(3, dtype=torch.bool))  # the caller's faithfulness is used
    assert probe.probe_metrics(task, buf, torch.tensor([0.5, -0.5, 9.0]), torch.ones(3, dtype=torch.bool), "0:1",
                               faith=given) == {"unfaithful": 0}


# --------------------------------------------------------------------------- ippo probe


def test_probe_command_end_to_end(tmp_path, capsys):
    model_dir = saved_tiny(tmp_path)
    args = ["--model", str(model_dir), "--arith-steps", "1", "--arith-sizes", "40,12,8", "--lora-r", "4",
            "--lora-alpha", "8", "--sft-steps", "1", "--sft-batch", "2", "--prompts-per-iter", "2",
            "--samples-per-prompt", "3", "--max-new-tokens", "6", "--val-size", "2", "--minibatch", "4",
            "--cache-dir", str(tmp_path / "cache"), "--threads", "1", "--no-progress"]
    out = tmp_path / "probe"
    assert cli.main(["probe", "--draws", "3", "--big-val-size", "4", "--reward-noise", "0.5", "--sketch-dim", "8",
                     "--out", str(out), *args]) == 0
    result = json.loads((out / "probe.json").read_text())
    assert (out / "probe.png").stat().st_size > 0 and "probe.json" in capsys.readouterr().out
    assert len(result["draws"]) == 3 and result["config"]["reward_noise"] == 0.5
    for row in result["draws"]:
        assert row["flipped"] == 3 and row["episodes"] == 6
        assert {"paper_stop", "evidence_empty", "all_equal", "spearman_length", "spearman_cosine", "flip_auc_cosine",
                "sign_agreement"} <= set(row)
        assert all(0 <= row[k] <= 1 for k in row if "auc" in k) and 0 < row["top_direction_share"] <= 1
        assert len(row["per_episode"]["score"]) == 6 and sum(row["per_episode"]["flipped"]) == 3
    summary = result["summary"]
    assert summary["flip_auc_random"]["n"] == 3
    assert summary["all_equal"]["draws"] + summary["mixed"]["draws"] == 3
    assert cli.main(["probe", "--draws", "0", "--out", str(out), *args]) == 2
    assert "--draws must be >= 1" in capsys.readouterr().err


def test_probe_json_is_valid_json_when_a_metric_is_undefined(tmp_path):
    """Issue 18: all rewards equal and no KL penalty make every advantage, score and sketch 0, so the sketches'
    top_direction_share is 0 / 0: probe.json held NaN (not JSON). Undefined metrics are left out of the draw (as an
    AUC with an empty class is), the summary skips them, and the file parses as strict JSON."""
    from ippo.train import probe

    def strict(text):
        raise ValueError(f"not JSON: {text}")

    cfg = cfg_for(tmp_path, algo="ippo", kl_coef=0.0, sketch_dim=8)
    result = probe.probe(cfg, tmp_path / "probe", 2, 4, model_and_tokenizer=tiny(), reward_fn=constant,
                         log=lambda _: None)
    saved = json.loads((tmp_path / "probe" / "probe.json").read_text(), parse_constant=strict)
    assert saved["summary"] == result["summary"] and len(saved["draws"]) == 2
    assert all(row["all_equal"] and "top_direction_share" not in row for row in saved["draws"])
    assert "top_direction_share" not in saved["summary"] and saved["summary"]["all_equal"]["draws"] == 2
    assert "spearman_cosine" not in saved["summary"]  # the scores are constant: no rank correlation



def test_flip_aucs_within_each_reward_level_and_group():
    """Within reward 0, flipped right answers vs truly wrong ones; within reward 1, flipped wrong ones vs truly right
    ones: a value that orders both levels perfectly gets 1 in each, whatever it does across levels. Within a reward
    level and a prompt group (_rg), a value constant in each such cell (grpo's advantage) gets exactly 0.5."""
    from types import SimpleNamespace

    rewards = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    flipped = torch.tensor([True, False, False, True, False, False])
    values = torch.tensor([5.0, 6.0, 7.0, -3.0, -2.0, -1.0])  # the lowest of each level is its flipped one
    group = torch.tensor([0, 0, 1, 0, 0, 1])
    out = probe.flip_aucs("x", values, SimpleNamespace(rewards=rewards, flipped=flipped, ro=SimpleNamespace(
        group=group)))
    assert out["flip_auc_x_r0"] == 1.0 and out["flip_auc_x_r1"] == 1.0 and out["flip_auc_x_rg"] == 1.0
    assert out["flip_auc_x"] == pytest.approx(stats.low_auc(values, flipped)) and out["flip_auc_x"] < 1
    by_cell = torch.tensor([1.0, 1.0, -9.0, 2.0, 2.0, 9.0])  # constant within (group, reward): finds flips elsewhere
    out = probe.flip_aucs("a", by_cell, SimpleNamespace(rewards=rewards, flipped=flipped, ro=SimpleNamespace(
        group=group)))
    assert out["flip_auc_a_rg"] == 0.5 and out["flip_auc_a_r0"] != 0.5
    out = probe.flip_aucs("x", values, SimpleNamespace(rewards=torch.zeros(6), flipped=flipped, ro=SimpleNamespace(
        group=group)))
    assert out["flip_auc_x_r1"] is None  # no episode at reward 1


def test_stratified_low_auc_pools_the_pairs_of_each_stratum():
    generator = torch.Generator().manual_seed(1)
    for _ in range(30):
        values = torch.randint(0, 4, (12,), generator=generator).float()
        values[0] = math.nan if _ % 5 == 0 else values[0]  # a non-finite value is left out, as low_auc does
        positive = torch.rand(12, generator=generator) < 0.4
        strata = torch.randint(0, 3, (12,), generator=generator)
        pairs = [(v, w) for i, j in itertools.product(range(12), repeat=2)
                 for v, w in [(float(values[i]), float(values[j]))]
                 if positive[i] and not positive[j] and strata[i] == strata[j] and math.isfinite(v + w)]
        expected = sum(1.0 if v < w else 0.5 if v == w else 0.0 for v, w in pairs) / len(pairs) if pairs else None
        assert stats.stratified_low_auc(values, positive, strata) == pytest.approx(expected)
    assert stats.stratified_low_auc(torch.tensor([1.0, 2.0]), torch.tensor([True, False]), torch.tensor([0, 1])) \
        is None  # no stratum holds both classes


def test_probe_variants_and_exact_resume(tmp_path, monkeypatch):
    """--variants score other --score values on the same draws (stratified AUCs and seconds each); a probe cut
    after 2 draws and resumed ends with the draws of an uninterrupted probe of 3."""
    cfg = cfg_for(tmp_path, algo="ippo", reward_noise=0.5, deflate_dim=8)
    kw = dict(model_and_tokenizer=tiny(), log=lambda _: None, variants=("centred", "deflated"), stability=False)

    def every_other_right_and_half_of_those_unfaithful(task, texts, examples):  # the tiny model is never right
        n = len(texts)
        return torch.arange(n) % 2 == 0, torch.arange(n) % 4 == 0

    monkeypatch.setattr(probe, "faithfulness", every_other_right_and_half_of_those_unfaithful)
    whole = probe.probe(cfg, tmp_path / "whole", 3, 4, **kw)
    for row in whole["draws"]:
        assert {"flip_auc_centred", "flip_auc_deflated", "seconds_centred", "seconds_deflated",
                "seconds_score"} <= set(row) and 0 < row["seconds_score"] < row["seconds"]
        episodes = row["per_episode"]
        assert len(episodes["score_centred"]) == row["episodes"]
        right = torch.tensor(episodes["correct"]).bool()
        for name in ("score", "centred", "deflated"):  # among the right answers, low scores find the unfaithful
            values = torch.tensor(episodes["score" if name == "score" else f"score_{name}"])
            expected = stats.low_auc(values[right], torch.tensor(episodes["unfaithful"]).bool()[right])
            assert row[f"unfaithful_auc_{name}"] == pytest.approx(expected)
    assert whole["summary"]["unfaithful_auc_deflated"]["n"] == 3
    assert whole["summary"]["flip_auc_centred"]["n"] == 3 and "inverted" in whole["summary"]["flip_auc_centred"]
    probe.probe(cfg, tmp_path / "cut", 2, 4, **kw)
    with pytest.raises(FileExistsError, match="--resume"):
        probe.probe(cfg, tmp_path / "cut", 3, 4, **kw)
    with pytest.raises(ValueError, match="other options"):
        probe.probe(dataclasses.replace(cfg, lr=1.0), tmp_path / "cut", 3, 4, resume=True, **kw)
    resumed = probe.probe(cfg, tmp_path / "cut", 3, 4, resume=True, **kw)

    def strip(rows):
        return [{k: v for k, v in r.items() if not k.startswith("seconds")} for r in rows]

    assert strip(resumed["draws"]) == strip(whole["draws"])
    with pytest.raises(ValueError, match="--variants must name distinct scores"):
        probe.probe(cfg, tmp_path / "bad", 1, 4, variants=("raw",), **{k: v for k, v in kw.items() if k != "variants"})


def test_probe_on_the_grpo_base_scores_grpo_advantages(tmp_path):
    """--ippo-base grpo: the probed episodes carry grpo's advantages (each prompt group's rewards, normalized: they
    sum to 0 over the group, one value per episode), as the filter on that base sees them."""
    cfg = cfg_for(tmp_path, algo="ippo", ippo_base="grpo", reward_noise=0.5)
    out = probe.probe(cfg, tmp_path / "probe", 1, 4, model_and_tokenizer=tiny(), log=lambda _: None, stability=False)
    episodes = out["draws"][0]["per_episode"]
    advantages, rewards = torch.tensor(episodes["mean_advantage"]), torch.tensor(episodes["reward"])
    groups = torch.arange(len(rewards)) // cfg.samples_per_prompt
    torch.testing.assert_close(advantages, pm.grpo_advantages(rewards, groups).to(advantages.dtype), rtol=0,
                               atol=1e-6)
    assert advantages.abs().sum() > 0


def test_episode_advantage_ties_an_advantage_constant_over_episodes_of_any_length():
    """grpo's advantage is one value per episode; its token mean over 24 tokens differs from that over 20 in the
    last float32 bit, which made the advantage's within-(reward, group) flip AUC a length ranking instead of 0.5."""
    from types import SimpleNamespace

    lengths = [14, 20, 24, 31, 7, 3]
    mask = (torch.arange(32) < torch.tensor(lengths)[:, None]).float()
    buf = SimpleNamespace(advantages=torch.full((6, 32), -0.54006052), mask=mask)
    assert len(set(pm.masked_mean(buf.advantages, mask, dim=1).tolist())) > 1  # the float rounding it removes
    assert len(set(probe.episode_advantage(buf).tolist())) == 1
    buf.rewards, buf.flipped = torch.zeros(6), torch.tensor([True, False, True, False, False, True])
    buf.ro = SimpleNamespace(group=torch.zeros(6, dtype=torch.long))
    assert probe.flip_aucs("advantage", probe.episode_advantage(buf), buf)["flip_auc_advantage_rg"] == 0.5


def test_probe_summary_quartiles_stay_within_the_draws():
    """Two draws of AUC 0.2 and 0.4: quartiles by linear interpolation between them, never outside [min, max]."""
    rows = [{"flip_auc_score": v, "all_equal": False, "paper_stop": False, "evidence_empty": False} for v in (0.2, 0.4)]
    summary = probe.summarize(rows)["flip_auc_score"]
    assert (summary["q1"], summary["median"], summary["q3"]) == pytest.approx((0.25, 0.3, 0.35))
    assert summary["inverted"] == 2 and summary["n"] == 2
