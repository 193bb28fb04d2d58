"""The trainer end to end on a tiny random model: every algorithm, the I-PPO filter, rewards, resume, bad inputs,
CLI. Corrupt and partial files, bad options and interrupted writes: test_train_robustness.py."""

import json

import pytest
import torch
from helpers import cfg_for, coin, kill_sft_warm_start, lora_state, records, run, saved_tiny, tiny

from ippo.train import checkpoint, cli, config, learner, policy, report, scoring
from ippo.train import ppo_math as pm
from ippo.train import trainer as T
from ippo.train.config import Config
from ippo.train.model import add_lora
from ippo.train.tasks import Arith


@pytest.mark.parametrize("algo", config.ALGOS)
def test_one_iteration_of_each_algorithm(tmp_path, algo, monkeypatch):
    critics = []  # the value head each log-prob pass was given
    real_logprobs = policy.response_logprobs
    monkeypatch.setattr(T, "response_logprobs", lambda *a, **k: critics.append(
        k.get("value_head", a[3] if len(a) > 3 else None)) or real_logprobs(*a, **k))
    run_dir = tmp_path / algo
    ev = run(cfg_for(tmp_path, algo=algo), run_dir)
    recs = records(run_dir)
    assert [r["iteration"] for r in recs] == [0, 1]
    assert set(ev) >= {"accuracy", "majority", "pass_at_k", "unfaithful", "faithful_accuracy"}
    last = recs[-1]
    assert "eval" in last and set(last["time"]) == {"rollout", "logprobs", "val_grad", "scoring", "update",
                                                      "eval"}
    if algo == "sft":
        assert last["sft_loss"] > 0
    else:
        assert {"reward", "kept_fraction", "approx_kl", "clip_frac", "pg_loss", "kl_ref", "top_episodes",
                "bottom_episodes"} <= set(last)
        assert last["top_episodes"][0]["completion"] is not None and last["reward_errors"] == 0
    if algo == "ippo":
        assert sum(last["score_hist"]["counts"]) == 6 and 0 < last["kept_fraction"] <= 1
        assert last["time"]["val_grad"] > 0 and last["time"]["scoring"] > 0 and not last["early_stop"]
    if algo == "grpo":  # no critic: neither values nor a value loss
        assert critics and all(c is None for c in critics) and "vf_loss" not in last
    elif algo != "sft":
        assert any(c is not None for c in critics) and "vf_loss" in last
    # the LoRA weights moved during the iteration (B starts at 0; the SFT warm start makes it non-zero)
    start = checkpoint.trainable_state(add_lora(tiny()[0], r=4, alpha=8))
    assert any(not torch.equal(t, start[k[5:]]) for k, t in lora_state(run_dir).items() if k.startswith("lora/"))


def test_score_episodes_matches_per_episode_gradients(tmp_path):
    """The one-backward scores equal <grad actor_loss_i, grad val_loss> from explicit per-episode autograd."""
    cfg = cfg_for(tmp_path, algo="ippo")
    task = config.build_task(cfg)
    base, tok = tiny()
    lm = add_lora(base, r=4, alpha=8)
    with torch.no_grad():
        for n, p in lm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    torch.manual_seed(0)
    ro = policy.sample(lm, tok, task, task.split("train")[:2], 3, 1.0, 8, 64)
    old_logp, _ = policy.response_logprobs(lm, ro, temperature=cfg.temperature)
    old_logp = old_logp.detach()
    adv = torch.randn_like(old_logp) * ro.mask
    val_examples = task.split("validation")[:3]
    timing = {"val_grad": 0.0, "scoring": 0.0}
    scores = scoring.score_episodes(lm, tok, task, cfg, ro, old_logp, adv, val_examples, timing)
    params = [p for p in lm.parameters() if p.requires_grad]
    g_val = torch.autograd.grad(policy.sft_loss(lm, tok, task, val_examples), params)
    for i in range(len(ro.texts)):
        logp, _ = policy.response_logprobs(lm, ro, temperature=cfg.temperature)
        per_episode, _ = pm.policy_loss(logp, old_logp, adv, ro.mask, cfg.clip)
        g_i = torch.autograd.grad(per_episode[i], params)
        expected = sum((a * b).sum() for a, b in zip(g_i, g_val))
        torch.testing.assert_close(scores[i], expected.float(), rtol=1e-3, atol=1e-7)
    assert all(p.grad is None for p in params)


def test_a_non_finite_score_drops_its_episode_only(tmp_path, monkeypatch):
    """One episode whose score is NaN (its loss overflowed) is dropped; the others are kept and weighted as if it
    were absent, and metrics.jsonl stays valid JSON (no NaN)."""
    monkeypatch.setattr(scoring, "score_episodes", lambda *a, **k: torch.tensor([3.0, float("nan"), 1.0, 2.0, -1, 2.0]))
    updates = []
    real_update = T.ppo_update
    monkeypatch.setattr(T, "ppo_update", lambda L, buf, keep, weights: updates.append((keep, weights))
                        or real_update(L, buf, keep, weights))
    run_dir = tmp_path / "run"
    run(cfg_for(tmp_path, algo="ippo", stop_rule="paper", reward_noise=0.3), run_dir)
    (keep, weights), = updates
    assert keep.tolist() == [True, False, True, True, False, True]
    torch.testing.assert_close(weights, torch.tensor([1.5, 0, 0.5, 1.0, 0, 1.0]))
    def refuse(constant):
        raise ValueError(f"{constant} in metrics.jsonl")
    rec = [json.loads(line, parse_constant=refuse) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rec[-1]["nonfinite_scores"] == 1 and rec[-1]["score_mean"] == pytest.approx(7 / 5)


def test_ippo_all_scores_negative_stops_and_logs(tmp_path, monkeypatch):
    monkeypatch.setattr(scoring, "score_episodes", lambda *a, **k: -torch.ones(6))
    run_dir = tmp_path / "run"
    run(cfg_for(tmp_path, algo="ippo", iterations=3, stop_rule="paper"), run_dir)
    recs = records(run_dir)
    assert [r["iteration"] for r in recs] == [0, 1]  # stopped at iteration 1 of 3
    assert recs[-1]["early_stop"] is True and recs[-1]["kept_fraction"] == 0 and "eval" in recs[-1]
    assert "pg_loss" not in recs[-1]  # no update
    assert json.loads((run_dir / "ckpt-00001.json").read_text())["stopped"] is True
    # resuming a stopped run does nothing more
    run(cfg_for(tmp_path, algo="ippo", iterations=3, stop_rule="paper"), run_dir, resume=True)
    assert [r["iteration"] for r in records(run_dir)] == [0, 1]


def test_ippo_on_the_grpo_base_keeping_everything_is_grpo(tmp_path, monkeypatch):
    """--ippo-base grpo: the filter's advantages are grpo's (group-normalized, no critic values) and the update is
    grpo's (k3 KL term, no value loss): with the filter made to keep every episode at weight 1, the LoRA weights after
    an iteration equal a grpo run's of the same seed (kl_coef large enough that a missing KL term shows)."""
    seen = []
    real_score = scoring.score_episodes

    def score(lm, tok, task, cfg, ro, old_logp, advantages, *args, **kwargs):
        seen.append((advantages.clone(), ro))
        return real_score(lm, tok, task, cfg, ro, old_logp, advantages, *args, **kwargs)

    monkeypatch.setattr(scoring, "score_episodes", score)
    monkeypatch.setattr(scoring, "filter_episodes", lambda L, buf, scores, record: pm.FilterResult(
        torch.ones(len(scores), dtype=torch.bool), torch.ones(len(scores)), False))
    settings = dict(sft_steps=0, kl_coef=0.5, lr=1e-2, epochs=1, minibatch=3)
    run(cfg_for(tmp_path, algo="grpo", **settings), tmp_path / "grpo")
    run(cfg_for(tmp_path, algo="ippo", ippo_base="grpo", **settings), tmp_path / "ippo")
    (advantages, ro), = seen
    assert advantages.abs().sum() > 0 and records(tmp_path / "grpo")[-1]["grad_norm"] > 0
    torch.testing.assert_close(advantages, pm.grpo_advantages(
        torch.tensor(coin(ro.texts, [None] * len(ro.texts))), ro.group)[:, None] * ro.mask, rtol=0, atol=1e-6)
    grpo, ippo = lora_state(tmp_path / "grpo"), lora_state(tmp_path / "ippo")
    for key in grpo:
        torch.testing.assert_close(ippo[key], grpo[key], rtol=0, atol=1e-7, msg=key)
    cfg = cfg_for(tmp_path, algo="ippo", ippo_base="grpo", **settings)
    L, _, _ = learner.setup_learner(cfg, tmp_path / "learner", False, tiny(), coin, lambda _: None, False)
    assert L.critic is None and cfg.group_advantages and not config.Config().group_advantages
    with pytest.raises(ValueError, match=r"--ippo-base must be one of \('ppo', 'grpo'\), got 'sac'"):
        config.Config(algo="ippo", ippo_base="sac").validate()
    with pytest.raises(ValueError, match="--samples-per-prompt must be >= 2 for grpo and --ippo-base grpo"):
        config.Config(algo="ippo", ippo_base="grpo", samples_per_prompt=1, stop_rule="paper").validate()


def test_ippo_keep_and_normalized_weights_reach_the_update(tmp_path, monkeypatch):
    """Scores -> the filter's keep (score > tol) and weights (score / mean kept score) are what ppo_update gets, and
    its one minibatch holds exactly the kept episodes."""
    monkeypatch.setattr(scoring, "score_episodes", lambda *a, **k: torch.tensor([3.0, -1.0, 1.0, 0.0, -2.0, 2.0]))
    updates, rows = [], []
    real_update, real_logprobs = T.ppo_update, policy.response_logprobs
    monkeypatch.setattr(T, "ppo_update", lambda L, buf, keep, weights: updates.append((keep, weights))
                        or real_update(L, buf, keep, weights))
    monkeypatch.setattr(T, "response_logprobs", lambda lm, ro, idx=None, *a, **k: rows.append(idx)
                        or real_logprobs(lm, ro, idx, *a, **k))
    run_dir = tmp_path / "run"
    run(cfg_for(tmp_path, algo="ippo", tol=0.5, epochs=1, minibatch=8, stop_rule="paper"), run_dir)
    rec = records(run_dir)[-1]
    assert rec["kept_fraction"] == pytest.approx(0.5) and rec["early_stop"] is False
    (keep, weights), = updates
    assert keep.tolist() == [True, False, True, False, False, True]
    torch.testing.assert_close(weights, torch.tensor([1.5, 0, 0.5, 0, 0, 1.0]))  # 3, 1, 2 over their mean 2
    assert sorted(rows[-1].tolist()) == [0, 2, 5]  # the one update minibatch: the kept episodes only


def test_ppo_update_gradient_is_the_weighted_mean_of_kept_episode_gradients(tmp_path, monkeypatch):
    """The update's gradient equals (1 / |kept|) sum_{i kept} w_i dl_i/dtheta, each dl_i/dtheta from an explicit
    autograd call on episode i alone: weights that do not reach the loss, dropped episodes that do, or a value loss
    that reaches the LoRA weights (its head reads detached hidden states) fail this."""
    cfg = cfg_for(tmp_path, algo="ippo", epochs=1, minibatch=8, vf_coef=0.5, max_grad_norm=1e9, sft_steps=0)
    L, _, _ = learner.setup_learner(cfg, tmp_path / "run", False, tiny(), coin, lambda _: None, False)
    with torch.no_grad():  # LoRA B starts at 0 (then dl/dA = 0): move it so every LoRA weight gets a gradient
        for p in L.lora_params:
            p.add_(torch.randn_like(p) * 0.05)
        L.value_head.weight.normal_()  # a zero head would pass no value-loss gradient down, detached or not
    buf = learner.rollout(L, 1)
    learner.compute_advantages(cfg, buf)
    keep = torch.tensor([True, False, True, False, False, True])
    weights = torch.tensor([1.5, 0.0, 0.5, 0.0, 0.0, 1.0])
    expected = [torch.zeros_like(p) for p in L.lora_params]
    for i in [0, 2, 5]:
        row = torch.tensor([i])
        logp, _ = policy.response_logprobs(L.lm, buf.ro, row, None, cfg.temperature)
        loss_i, _ = pm.policy_loss(logp, buf.old_logp[row], buf.advantages[row], buf.mask[row], cfg.clip)
        for acc, g in zip(expected, torch.autograd.grad(loss_i.sum(), L.lora_params)):
            acc += float(weights[i]) / 3 * g
    assert sum(float(g.abs().sum()) for g in expected) > 0
    seen = []
    real_clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, *a, **k: seen.append(
        [p.grad.clone() for p in L.lora_params]) or real_clip(params, *a, **k))
    T.ppo_update(L, buf, keep, weights)
    assert len(seen) == 1
    for got, want in zip(seen[0], expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


def test_rollout_mask_is_checked_once_per_iteration(tmp_path, monkeypatch):
    """The mask's values are read once per iteration (rollout), not in every minibatch's loss terms."""
    value_checks = []
    real_check = pm._check_mask

    def counting(mask, like, name="mask", mask_checked=False):
        value_checks.append(not mask_checked)
        return real_check(mask, like, name, mask_checked)

    monkeypatch.setattr(pm, "_check_mask", counting)
    run(cfg_for(tmp_path, algo="ppo", iterations=2, epochs=2, minibatch=2), tmp_path / "run")
    assert sum(value_checks) == 2 and len(value_checks) > 20  # 2 iterations x 3 minibatches x 2 epochs x 4 terms


def test_mask_checked_skips_only_the_value_checks():
    good, bad = torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([[0.0, 1.0, 1.0]])  # bad: left-padded
    x = torch.zeros(1, 3)
    with pytest.raises(ValueError, match="right-padded"):
        pm.check_mask(bad)
    with pytest.raises(ValueError, match="right-padded"):
        pm.policy_loss(x, x, x, bad)
    pm.check_mask(good, x)
    pm.policy_loss(x, x, x, bad, mask_checked=True)  # the caller vouches for it
    with pytest.raises(ValueError, match="shape"):  # shapes are always checked
        pm.policy_loss(x, x, x, good[:, :2], mask_checked=True)


def test_resume_after_kill_equals_uninterrupted_run(tmp_path, monkeypatch):
    cfg = dict(algo="ippo", iterations=3, eval_every=2, samples_per_prompt=3, eval_k=2)
    straight = tmp_path / "straight"
    run(cfg_for(tmp_path, **cfg), straight)

    calls = {"rollouts": 0}
    real_sample = policy.sample

    def dies_in_iteration_3(lm, tok, task, examples, k, *args):
        if k == 3:  # a rollout (eval uses k=2)
            calls["rollouts"] += 1
            if calls["rollouts"] == 3:
                raise KeyboardInterrupt("killed")
        return real_sample(lm, tok, task, examples, k, *args)

    monkeypatch.setattr(learner, "sample", dies_in_iteration_3)
    killed = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        run(cfg_for(tmp_path, **cfg), killed)
    assert json.loads((killed / "latest.json").read_text())["iteration"] == 2
    with (killed / "metrics.jsonl").open("a") as f:  # a line written after the last checkpoint is dropped
        f.write(json.dumps({"iteration": 3, "bogus": True}) + "\n")
    monkeypatch.setattr(learner, "sample", real_sample)
    run(cfg_for(tmp_path, **cfg), killed, resume=True)

    a, b = lora_state(straight), lora_state(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def strip(recs):
        return [{k: v for k, v in r.items() if k not in ("time", "wall", "wall_total", "sft")} for r in recs]

    assert strip(records(straight)) == strip(records(killed))
    with pytest.raises(ValueError, match="differ"):
        run(cfg_for(tmp_path, **(cfg | {"lr": 1.0})), killed, resume=True)
    with pytest.raises(FileExistsError, match="--resume"):
        run(cfg_for(tmp_path, **cfg), killed)


def test_sft_warm_start_is_cached(tmp_path):
    logs = []
    run(cfg_for(tmp_path, algo="ppo"), tmp_path / "a", log=logs.append)
    run(cfg_for(tmp_path, algo="ippo"), tmp_path / "b", log=logs.append)
    assert sum("reusing" in line for line in logs) == 1
    assert records(tmp_path / "a")[0]["eval"] == records(tmp_path / "b")[0]["eval"]  # same start, same eval seed
    base = [records(tmp_path / run_dir)[0]["eval_base_model"] for run_dir in "ab"]  # before any training: the same
    assert base[0] == base[1] and 0 <= base[0]["accuracy"] <= 1
    run(cfg_for(tmp_path, algo="ppo", sft_steps=3), tmp_path / "c", log=logs.append)
    assert sum("reusing" in line for line in logs) == 1  # another SFT config: trained again
    run(cfg_for(tmp_path, algo="ppo", eval_base=False), tmp_path / "d", log=logs.append)
    assert records(tmp_path / "d")[0]["eval_base_model"] is None and sum("reusing" in line for line in logs) == 2


def test_killed_sft_warm_start_resumes_with_nothing_lost(tmp_path, monkeypatch):
    """Killed after step 7 of 12 (checkpoint at step 5), the warm start goes on from step 5 and ends with the
    adapter of an uninterrupted warm start."""
    from safetensors.torch import load_file

    killed = kill_sft_warm_start(tmp_path, monkeypatch, steps=12, dies_at=8)
    logs = []
    run(killed, tmp_path / "c", log=logs.append)
    assert any("resuming at step 5" in line for line in logs)
    whole = load_file(next((tmp_path / "whole").rglob("adapter.safetensors")))
    resumed = load_file(next((tmp_path / "killed").rglob("adapter.safetensors")))
    assert not list((tmp_path / "killed").rglob("partial"))
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name


def test_config_json_is_written_once(tmp_path, monkeypatch):
    written = []
    real_write = T.write_json
    monkeypatch.setattr(T, "write_json", lambda path, obj: written.append(path.name) or real_write(path, obj))
    run(cfg_for(tmp_path, iterations=0), tmp_path / "run")
    run(cfg_for(tmp_path, iterations=1), tmp_path / "run", resume=True)  # resume records the raised --iterations
    assert written == ["config.json", "config.json"]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["iterations"] == 1


# ------------------------------------------------------------------------------------------- rewards


def test_reward_fn_gives_the_rewards(tmp_path):
    """reward_fn(completions, examples) gets every episode of the rollout, and its floats are the rewards."""
    calls = []

    def reward_fn(completions, examples):
        calls.append((list(completions), list(examples)))
        return [0.25 * (i % 3) for i in range(len(completions))]

    run(cfg_for(tmp_path, algo="ppo", iterations=2), tmp_path / "run", reward_fn=reward_fn)
    assert len(calls) == 2 and all(len(c) == len(e) == 6 for c, e in calls)
    assert all(isinstance(c, str) for c in calls[0][0]) and calls[0][1][0] == calls[0][1][2]  # 3 samples per prompt
    recs = records(tmp_path / "run")
    assert [r["reward"] for r in recs[1:]] == [pytest.approx(0.25), pytest.approx(0.25)]
    assert recs[-1]["reward_errors"] == 0


def test_raising_reward_fn_counts_the_episodes_and_goes_on(tmp_path):
    """An episode whose reward raises gets reward 0 and is counted; the others keep theirs; the run goes on."""
    def reward_fn(completions, examples):
        if len(completions) > 1:  # the whole batch fails: the trainer asks one episode at a time
            raise RuntimeError("batch")
        if sum(map(ord, completions[0])) % 3 == 0:
            raise RuntimeError("this one")
        return [1.0]

    logs = []
    run(cfg_for(tmp_path, algo="grpo", iterations=2), tmp_path / "run", reward_fn=reward_fn, log=logs.append)
    recs = records(tmp_path / "run")
    assert [r["iteration"] for r in recs] == [0, 1, 2]
    for rec in recs[1:]:
        texts = [e["completion"] for e in rec["top_episodes"] + rec["bottom_episodes"]]
        raised = [sum(map(ord, t)) % 3 == 0 for t in texts]
        assert all(e["reward"] == (0.0 if r else 1.0) for e, r in zip(rec["top_episodes"] + rec["bottom_episodes"],
                                                                       raised))
        assert rec["reward"] == pytest.approx(1 - rec["reward_errors"] / 6)
    assert sum(r["reward_errors"] for r in recs[1:]) > 0
    assert any("raised" in line and "RuntimeError('batch')" in line for line in logs)


def test_raising_checker_is_counted_not_fatal(tmp_path, monkeypatch):
    def broken(self, completion, example):
        raise RuntimeError("checker bug")

    monkeypatch.setattr(Arith, "check_answer", broken)
    run_dir = tmp_path / "run"
    run(cfg_for(tmp_path, algo="ppo"), run_dir, reward_fn=None)  # the default reward: task.check_answer
    rec = records(run_dir)[-1]
    assert rec["reward_errors"] == 6 and rec["reward"] == 0
    assert rec["eval"]["checker_errors"] == 9 and rec["eval"]["accuracy"] == 0  # 3 problems x (2 samples + greedy)
    assert rec["eval"]["greedy_accuracy"] == 0


@pytest.mark.parametrize("bad, message", [(lambda c, e: [1.0] * (len(c) - 1), "returned 5 rewards for 6"),
                                          (lambda c, e: [float("nan")] * len(c), "must be finite"),
                                          (lambda c, e: ["1"] * len(c), "must be numbers"),
                                          (lambda c, e: 1.0, "must return a list")])
def test_reward_fn_output_is_checked(tmp_path, bad, message):
    with pytest.raises(ValueError, match=f"reward_fn.*{message}"):
        run(cfg_for(tmp_path, algo="ppo"), tmp_path / "run", reward_fn=bad)


# ------------------------------------------------------------------------------------------- bad inputs


def test_missing_model_dir(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        T.train(cfg_for(tmp_path), tmp_path / "run", progress=False)
    assert cli.main(["train", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "run2")]) == 2
    assert "does not exist" in capsys.readouterr().err


def gsm8k_file(path, n, extra=()):
    lines = [json.dumps({"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"})
             for i in range(n)]
    path.write_text("\n".join([*lines[:2], *extra, *lines[2:]]) + "\n")
    return path


def test_malformed_jsonl_line_is_a_counted_skip(tmp_path):
    data = gsm8k_file(tmp_path / "train.jsonl", 8, extra=["{not json"])
    cfg = cfg_for(tmp_path, algo="ppo", task="gsm8k", data=str(data), eval_data=str(data), gsm8k_val_size=3)
    with pytest.warns(UserWarning, match="skipped 1 malformed line"):
        run(cfg, tmp_path / "run")
    assert [r["iteration"] for r in records(tmp_path / "run")] == [0, 1]


def test_empty_dataset_is_a_clear_error(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cfg = cfg_for(tmp_path, task="gsm8k", data=str(empty), eval_data=str(empty))
    with pytest.raises(ValueError, match="no valid GSM8K example"):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # failed before any work
    assert cli.main(["train", "--task", "gsm8k", "--data", str(empty), "--out", str(tmp_path / "r")]) == 2
    assert "no valid GSM8K example" in capsys.readouterr().err


def test_bad_config_values():
    for kw, name in [({"algo": "dpo"}, "--algo"), ({"samples_per_prompt": 0}, "--samples-per-prompt"),
                     ({"lr": 0}, "--lr"), ({"tol": -1}, "--tol"), ({"gamma": 2}, "--gamma"), ({"lam": -0.5}, "--lam"),
                     ({"iterations": 2.5}, "--iterations"), ({"whiten": 1}, "--whiten"), ({"lr": "1e-4"}, "--lr")]:
        with pytest.raises(ValueError, match=name):
            config.Config(**kw).validate()


# ------------------------------------------------------------------------------------------- CLI and report


def test_every_config_field_has_help():
    import dataclasses

    for f in dataclasses.fields(Config):
        assert len(f.metadata.get("help", "").strip()) > 3, f"Config.{f.name} has no help text"


def test_cli_help_explains_every_option(capsys):
    import dataclasses

    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(Config):
        assert "--" + f.name.replace("_", "-") in out
        assert "".join(f.metadata["help"].split()) in "".join(out.split())  # wrapped, maybe at a hyphen
    assert "--resume" in out
    for command in ("sft", "eval", "compare", "report"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])


def test_cli_compare_eval_and_report(tmp_path, capsys):
    model_dir = saved_tiny(tmp_path)
    args = ["--model", str(model_dir), "--arith-steps", "1", "--arith-sizes", "40,8,8", "--lora-r", "4",
            "--lora-alpha", "8", "--sft-steps", "1", "--sft-batch", "2", "--iterations", "1", "--prompts-per-iter",
            "1", "--samples-per-prompt", "2", "--max-new-tokens", "6", "--val-size", "2", "--eval-size", "2",
            "--eval-k", "2", "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    assert cli.main(["compare", "--algos", "sft,ppo,ippo", "--out", str(tmp_path / "cmp"), *args]) == 0
    out = capsys.readouterr().out
    assert "| sft |" in out and "| ppo |" in out and "| ippo |" in out
    for name in ("report.md", "accuracy.png", "faithfulness.png", "kept_fraction.png"):
        assert (tmp_path / "cmp" / name).stat().st_size > 0
    assert cli.main(["eval", str(tmp_path / "cmp" / "ppo"), "--eval-size", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["n_questions"] == 1
    assert report.summarize(tmp_path / "cmp" / "ippo")["iterations"] == 1
    for flag, value in [("--eval-k", "0"), ("--eval-size", "-1")]:  # not "the run's value" in disguise
        assert cli.main(["eval", str(tmp_path / "cmp" / "ppo"), flag, value]) == 2
        assert f"ippo eval: error: {flag} must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("whiten", [True, False])  # scored in a pass of its own / in the rollout's forward
def test_ippo_keeping_everything_with_weight_1_is_ppo_bit_for_bit(tmp_path, monkeypatch, whiten):
    """The scoring pass changes nothing the update sees: with a filter that keeps every episode with weight 1,
    an I-PPO iteration ends with exactly PPO's LoRA weights, value head and update statistics."""
    def keep_all(scores, tol, signal=None):
        return pm.FilterResult(torch.ones_like(scores, dtype=torch.bool), torch.ones_like(scores), False)

    monkeypatch.setattr(pm, "ippo_filter", keep_all)
    kw = dict(iterations=1, eval_every=10, eval_size=1, eval_k=1, samples_per_prompt=4, minibatch=3, whiten=whiten)
    run(cfg_for(tmp_path, algo="ppo", **kw), tmp_path / "ppo")
    run(cfg_for(tmp_path, algo="ippo", **kw), tmp_path / "ippo")
    a, b = lora_state(tmp_path / "ppo"), lora_state(tmp_path / "ippo")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ppo, ippo = records(tmp_path / "ppo")[-1], records(tmp_path / "ippo")[-1]
    for key in ("pg_loss", "vf_loss", "grad_norm", "approx_kl", "clip_frac", "reward", "kl_ref"):
        assert ppo[key] == ippo[key], key
    assert ippo["kept_fraction"] == 1 and ippo["time"]["scoring"] > 0
