"""``ippo compare --seeds`` (intervals, resume after a kill, missing and corrupt runs), the wall-clock budget,
the final eval size and the greedy eval, on the tiny model."""

import json
import math
import statistics

import pytest
from helpers import cfg_for, records, run, saved_tiny, tiny

from ippo.train import cli, compare, config, learner, policy, stats
from ippo.train import evaluation as E
from ippo.train.model import add_lora

# two-sided 95% Student-t quantiles (tables; scipy is not a dependency): df -> t
T95 = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 5: 2.5706, 10: 2.2281, 30: 2.0423}


def test_t_quantile_matches_the_tables():
    for df, t in T95.items():
        assert stats.t_quantile(0.95, df) == pytest.approx(t, abs=1e-4)
    assert stats.t_quantile(0.99, 2) == pytest.approx(9.9248, abs=1e-4)
    assert stats.t_quantile(0.90, 7) == pytest.approx(1.8946, abs=1e-4)
    assert stats.t_quantile(0.95, 1000) == pytest.approx(1.9623, abs=1e-4)  # -> the normal's 1.96
    for bad in [(0.0, 3), (1.0, 3), (0.95, 0)]:
        with pytest.raises(ValueError):
            stats.t_quantile(*bad)


def test_mean_interval():
    got = stats.mean_interval([0.5, 0.6, 0.7])
    assert got.mean == pytest.approx(0.6) and got.n == 3
    assert got.half_width == pytest.approx(T95[2] * 0.1 / math.sqrt(3), rel=1e-4)  # the table's 4 decimals
    assert got.format() == "0.600 ± 0.248 (n=3)"
    one = stats.mean_interval([0.25])
    assert one.half_width is None and one.format() == "0.250 (n=1, no interval)"
    assert stats.mean_interval([2.0, 2.0]).half_width == 0
    values = [0.1, 0.4, 0.35, 0.8, 0.2]
    assert stats.mean_interval(values).half_width == pytest.approx(
        T95[4] * statistics.stdev(values) / math.sqrt(5), rel=1e-4)
    with pytest.raises(ValueError):
        stats.mean_interval([])


def test_t_test():
    values = [0.1, 0.4, 0.35, 0.8, 0.2]
    t, p = stats.t_test(values)
    assert t == pytest.approx(statistics.fmean(values) / (statistics.stdev(values) / math.sqrt(5)))
    # the tables: sd 1 and mean T95[4] / sqrt(5) give t = T95[4], p = 0.05 two-sided, either sign
    sd1 = [(v - statistics.fmean(values)) / statistics.stdev(values) for v in values]
    at_quantile = [v + T95[4] / math.sqrt(5) for v in sd1]
    assert stats.t_test(at_quantile)[0] == pytest.approx(T95[4])
    assert stats.t_test(at_quantile)[1] == pytest.approx(0.05, abs=1e-5)
    assert stats.t_test([-v for v in at_quantile])[1] == pytest.approx(0.05, abs=1e-5)
    assert stats.t_test([1.0, -1.0]) == (0.0, 1.0)
    for bad in ([], [0.5], [0.2, 0.2]):
        with pytest.raises(ValueError):
            stats.t_test(bad)


@pytest.mark.parametrize("text", ["", "0,0", "a", "-1,2", "1,,2"])
def test_bad_seeds_are_refused(text):
    with pytest.raises(ValueError, match="--seeds"):
        compare.parse_seeds(text)


def test_new_options_are_validated():
    for kw, name in [({"wall_budget": -1.0}, "--wall-budget"), ({"wall_budget": math.inf}, "--wall-budget"),
                     ({"final_eval_size": -1}, "--final-eval-size"), ({"eval_greedy": 1}, "--eval-greedy")]:
        with pytest.raises(ValueError, match=name):
            config.Config(**kw).validate()


def test_greedy_eval_is_one_batched_greedy_pass(tmp_path, monkeypatch):
    calls = []
    real = E.sample
    monkeypatch.setattr(E, "sample", lambda *a: calls.append(a[4:6]) or real(*a))
    base, tok = tiny()
    lm = add_lora(base, r=4, alpha=8)
    for kw, expected in [({}, [(2, 0.6), (1, 0.0)]), ({"eval_greedy": False}, [(2, 0.6)]),
                         ({"eval_temperature": 0.0}, [(2, 0.0)])]:
        cfg = cfg_for(tmp_path, eval_size=3, eval_k=2, **kw)
        calls.clear()
        ev = E.evaluate(lm, tok, config.build_task(cfg), cfg, seed=0, size=5)
        assert calls == expected and ev["n_questions"] == 5
        assert ("greedy_accuracy" in ev) == cfg.eval_greedy
        if cfg.eval_temperature == 0:
            assert ev["greedy_accuracy"] == ev["accuracy"]


def test_final_eval_size_and_wall_budget(tmp_path):
    run_dir = tmp_path / "run"
    run(cfg_for(tmp_path, algo="ppo", iterations=2, eval_size=2, final_eval_size=4), run_dir)
    recs = records(run_dir)
    assert [r["eval"]["n_questions"] for r in recs] == [2, 2, 4]  # iteration 0, between, final
    assert all("greedy_accuracy" in r["eval"] for r in recs) and "stopped_by" not in recs[-1]
    # raising --iterations with a budget already spent: the resumed run stops at once
    run(cfg_for(tmp_path, algo="ppo", iterations=5, eval_size=2, final_eval_size=4, wall_budget=1e-6), run_dir,
        resume=True)
    assert len(records(run_dir)) == 3

    budget = tmp_path / "budget"
    kw = dict(algo="grpo", iterations=5, eval_every=4, eval_size=2, final_eval_size=4, wall_budget=1e-6)
    run(cfg_for(tmp_path, **kw), budget)
    recs = records(budget)
    assert [r["iteration"] for r in recs] == [0, 1]
    assert recs[-1]["stopped_by"] == "wall_budget" and recs[-1]["eval"]["n_questions"] == 4
    assert recs[-1]["wall"] >= 1e-6
    run(cfg_for(tmp_path, **kw), budget, resume=True)
    assert len(records(budget)) == 2
    # a bigger budget continues the run
    run(cfg_for(tmp_path, **(kw | {"wall_budget": 1e9, "iterations": 2})), budget, resume=True)
    assert [r["iteration"] for r in records(budget)] == [0, 1, 2]


def test_compare_seeds_resume_after_kill_and_missing_runs(tmp_path, capsys, monkeypatch):
    model_dir = saved_tiny(tmp_path)
    out = tmp_path / "cmp"
    args = ["compare", "--algos", "ppo,ippo", "--seeds", "0,1", "--out", str(out), "--model", str(model_dir),
            "--arith-steps", "1", "--arith-sizes", "40,8,8", "--lora-r", "4", "--lora-alpha", "8", "--sft-steps", "1",
            "--sft-batch", "2", "--iterations", "2", "--prompts-per-iter", "1", "--samples-per-prompt", "3",
            "--max-new-tokens", "6", "--val-size", "2", "--eval-size", "2", "--final-eval-size", "3", "--eval-k", "2",
            "--cache-dir", str(tmp_path / "cache"), "--threads", "1", "--no-progress"]

    rollouts = []
    real_sample = policy.sample

    def killed_in_the_third_run(lm, tok, task, examples, k, *rest):
        if k == 3:  # a rollout (evals use k=2 and k=1)
            rollouts.append(1)
            if len(rollouts) == 6:  # ppo-seed1, iteration 2
                raise KeyboardInterrupt
        return real_sample(lm, tok, task, examples, k, *rest)

    monkeypatch.setattr(learner, "sample", killed_in_the_third_run)
    assert cli.main(args) == 130
    assert json.loads((out / "ppo-seed1" / "latest.json").read_text())["iteration"] == 1
    assert not (out / "ippo-seed1").exists()
    capsys.readouterr()
    assert cli.main(args) == 2  # runs exist: refused without --resume, before any work
    assert "--resume" in capsys.readouterr().err

    monkeypatch.setattr(learner, "sample", real_sample)
    assert cli.main([*args, "--resume"]) == 0
    text = capsys.readouterr().out
    assert "[1/4] ppo-seed0: finished, skipped (3 left)" in text and "[2/4] ippo-seed0: finished, skipped" in text
    assert "[3/4] ppo-seed1: resuming (1 left after it)" in text and "[4/4] ippo-seed1: running" in text
    assert [r["iteration"] for r in records(out / "ppo-seed1")] == [0, 1, 2]
    md = (out / "report.md").read_text()
    assert "| accuracy (sampled, mean over k) |" in md and "(n=2)" in md and "| ippo - ppo |" in md
    assert "ippo compare --algos ppo,ippo --seeds 0,1" in md and "--final-eval-size 3" in md
    assert (out / "accuracy_vs_wall.png").stat().st_size > 0
    acc = [records(out / f"ppo-seed{s}")[-1]["eval"]["accuracy"] for s in (0, 1)]
    assert stats.mean_interval(acc).format() in md

    # a missing metrics file and a corrupt checkpoint pointer: named, left out, the rest reported
    (out / "ippo-seed1" / "metrics.jsonl").unlink()
    (out / "ppo-seed0" / "latest.json").write_text("{not json")
    assert cli.main([*args, "--resume"]) == 1
    text = capsys.readouterr().out
    assert "left out ppo-seed0:" in text and "latest.json" in text and "left out ippo-seed1:" in text
    md = (out / "report.md").read_text()
    assert "**ppo-seed0**" in md and "**ippo-seed1**" in md and "n=1, no interval" in md
    assert "| ppo-seed1 |" in md and "| ippo-seed0 |" in md and "| ppo-seed0 |" not in md


def test_compare_seeds_cli_refuses_bad_seeds(tmp_path, capsys):
    assert cli.main(["compare", "--seeds", "1,1", "--out", str(tmp_path / "c")]) == 2
    assert "--seeds must be" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def sweep_args(tmp_path, out, *extra):
    """``ippo compare`` options of a fast sweep on the tiny model saved under tmp_path."""
    return [*extra, "--out", str(out), "--model", str(tmp_path / "tiny-model"), "--arith-steps", "1",
            "--arith-sizes", "40,8,8", "--lora-r", "4", "--lora-alpha", "8", "--sft-steps", "1", "--sft-batch", "2",
            "--iterations", "1", "--prompts-per-iter", "1", "--samples-per-prompt", "3", "--max-new-tokens", "6",
            "--val-size", "2", "--eval-size", "2", "--eval-k", "2", "--cache-dir", str(tmp_path / "cache"),
            "--threads", "1", "--no-progress"]


def test_compare_resume_leaves_out_runs_whose_config_differs(tmp_path, capsys):
    """Issue 18: a finished run trained with another --lr, and another algorithm's finished run copied into a sweep's
    folder, are neither counted nor trained over: each is named in the report with the differing options, exit 1.
    Raising --iterations or changing --threads is no difference: those runs are resumed and counted."""
    import shutil

    saved_tiny(tmp_path)
    out = tmp_path / "cmp"
    assert cli.main(["compare", *sweep_args(tmp_path, out, "--algos", "ppo", "--seeds", "0,1")]) == 0
    shutil.rmtree(out / "ppo-seed1")  # ppo-seed1: trained with another learning rate
    assert cli.main(["train", *sweep_args(tmp_path, out / "ppo-seed1", "--algo", "ppo", "--seed", "1",
                                          "--lr", "0.001")]) == 0
    shutil.copytree(out / "ppo-seed0", out / "grpo-seed0")  # another algorithm's run under grpo-seed0
    before = {p: (out / p / "metrics.jsonl").read_text() for p in ("ppo-seed1", "grpo-seed0")}
    capsys.readouterr()

    def check_report():
        text = capsys.readouterr().out
        assert "left out ppo-seed1:" in text and "left out grpo-seed0:" in text
        assert {p: (out / p / "metrics.jsonl").read_text() for p in before} == before  # neither trained over
        md = (out / "report.md").read_text()
        ppo1 = next(line for line in md.splitlines() if line.startswith("- **ppo-seed1**"))
        grpo0 = next(line for line in md.splitlines() if line.startswith("- **grpo-seed0**"))
        assert "lr 0.001 (the sweep's 0.0001)" in ppo1 and "algo" not in ppo1
        assert "algo 'ppo' (the sweep's 'grpo')" in grpo0 and "lr" not in grpo0 and "threads" not in grpo0
        assert "| ppo-seed0 |" in md and "| grpo-seed1 |" in md and "| ppo-seed1 |" not in md
        assert "| grpo-seed0 |" not in md and "n=1, no interval" in md

    args = sweep_args(tmp_path, out, "--algos", "ppo,grpo", "--seeds", "0,1", "--resume")
    assert cli.main(["compare", *args]) == 1
    check_report()
    args[args.index("--iterations") + 1], args[args.index("--threads") + 1] = "2", "2"
    assert cli.main(["compare", *args]) == 1
    check_report()
    assert [r["iteration"] for r in records(out / "ppo-seed0")] == [0, 1, 2]  # --iterations raised: resumed
    assert [r["iteration"] for r in records(out / "grpo-seed1")] == [0, 1, 2]


def test_compare_refuses_duplicate_algos_and_huge_seeds(tmp_path, capsys):
    nope = ["--out", str(tmp_path / "c"), "--model", str(tmp_path / "no-model")]  # work would fail on the model
    assert cli.main(["compare", "--algos", "ppo,ppo", "--seeds", "0", *nope]) == 2
    assert "--algos" in capsys.readouterr().err
    assert cli.main(["compare", "--algos", "ppo,ippo,ppo", *nope]) == 2
    assert "--algos" in capsys.readouterr().err
    assert cli.main(["compare", "--seeds", "0,99999999999999999999", *nope]) == 2
    assert "--seeds" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_differences_follow_the_resume_rule(tmp_path):
    """What ``ippo train --resume`` may change is no difference; a run that went past the sweep's --iterations or
    --wall-budget is one (its numbers are not the sweep's)."""
    import dataclasses

    cfg = cfg_for(tmp_path, algo="ppo", iterations=2)
    run(cfg, tmp_path / "run")
    same = dataclasses.replace(cfg, iterations=5, threads=2, device="cpu", wall_budget=1e9)
    assert compare.differences(tmp_path / "run", same) == []
    assert compare.differences(tmp_path / "run", dataclasses.replace(cfg, iterations=1)) == [
        "trained to iteration 2, past the sweep's --iterations 1"]
    assert compare.differences(tmp_path / "run", dataclasses.replace(cfg, wall_budget=1e-9)) == [
        "trained past the sweep's --wall-budget 1e-09s"]
    assert compare.differences(tmp_path / "run", dataclasses.replace(cfg, lr=1e-3, clip=0.3)) == [
        "clip 0.2 (the sweep's 0.3)", "lr 0.0001 (the sweep's 0.001)"]


def test_compare_without_seeds_checks_every_folder_before_any_work(tmp_path, capsys):
    """ippo compare (one seed): a folder of a later algorithm that cannot be trained into (it holds something else;
    without --resume, a run) is refused before the first algorithm trains."""
    saved_tiny(tmp_path)
    out = tmp_path / "cmp"
    (out / "grpo").mkdir(parents=True)
    (out / "grpo" / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert cli.main(["compare", *sweep_args(tmp_path, out, "--algos", "ppo,grpo")]) == 2
    assert "holds no ippo run" in capsys.readouterr().err and not (out / "ppo").exists()


def test_arm_config_parses_an_algorithm_with_options_of_its_own():
    base = config.Config(lr=1e-3)
    arm = compare.arm_config(base, "ippo:score=centred:keep-by=random:tol=0.5:stop_patience=3:eval_greedy=false")
    assert (arm.algo, arm.score, arm.keep_by, arm.tol, arm.stop_patience, arm.eval_greedy) == (
        "ippo", "centred", "random", 0.5, 3, False)
    assert arm.lr == 1e-3 and compare.arm_config(base, "grpo") == config.Config(algo="grpo", lr=1e-3)
    assert compare.run_name("ippo:score=centred", 2) == "ippo+score=centred-seed2"
    assert compare.run_name("ppo", 0) == "ppo-seed0"
    for bad, why in [("nope:score=raw", "the algorithm must be one of"), ("ippo:colour=red", "OPTION=VALUE"),
                     ("ippo:seed=1", "OPTION=VALUE"), ("ippo:algo=ppo", "OPTION=VALUE"), ("ippo:tol", "OPTION=VALUE"),
                     ("ippo:tol=1:tol=2", "OPTION=VALUE"), ("ippo:tol=high", "tol must be of type float"),
                     ("ippo:stop_patience=1.5", "stop_patience must be of type int"),
                     ("ippo:eval_greedy=yes", "eval_greedy must be of type bool")]:
        with pytest.raises(ValueError, match=f"--algos: arm {bad!r}: .*{why}"):
            compare.parse_algos(f"grpo,{bad}")
    with pytest.raises(ValueError, match="distinct arms"):
        compare.parse_algos("ippo:score=raw,ippo:score=raw")


def test_compare_runs_arms_with_their_own_options(tmp_path):
    """--algos grpo,ippo:keep_by=random: each arm trains with its options into its own folder, and the report pairs
    it with the first arm."""
    saved_tiny(tmp_path)
    out = tmp_path / "cmp"
    arms = "grpo,ippo:keep_by=random:ippo_base=grpo"
    assert cli.main(["compare", *sweep_args(tmp_path, out, "--algos", arms, "--seeds", "0")]) == 0
    saved = json.loads((out / "ippo+keep_by=random+ippo_base=grpo-seed0" / "config.json").read_text())
    assert (saved["algo"], saved["keep_by"], saved["ippo_base"]) == ("ippo", "random", "grpo")
    assert json.loads((out / "grpo-seed0" / "config.json").read_text())["keep_by"] == "score"
    md = (out / "report.md").read_text()
    assert "ippo:keep_by=random:ippo_base=grpo - grpo" in md and f"--algos {arms}" in md
    assert cli.main(["compare", *sweep_args(tmp_path, out, "--algos", arms, "--seeds", "0", "--resume")]) == 0
    one = tmp_path / "one-seed"  # without --seeds: <out>/<arm>
    assert cli.main(["compare", *sweep_args(tmp_path, one, "--algos", "grpo,ippo:keep_by=random")]) == 0
    assert json.loads((one / "ippo+keep_by=random" / "config.json").read_text())["keep_by"] == "random"
