"""``ippo train --sketch-dim`` (the per-iteration sketch files) and ``ippo attribute`` (TracIn over them), on a tiny
random model: file contents, one backward for ippo's scores and sketches, the adapter snapshot, exact resume, the
attribution against an independent computation, and the errors."""

import dataclasses
import json
import shutil

import helpers
import pytest
import torch
from helpers import TOK, lora_params, tiny
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import ippo.kernels
from ippo.kernels import LoRAGrad, lora_weights, sketch_gradients
from ippo.kernels.scorer import lora_linear_layers
from ippo.train import attribution as A
from ippo.train import checkpoint, cli, config, learner, policy, scoring
from ippo.train import ppo_math as pm
from ippo.train import trainer as T
from ippo.train.model import add_lora

K = 16  # a multiple of 2 x lora_r = 8


def cfg_for(tmp_path, **kw) -> config.Config:
    return helpers.cfg_for(tmp_path, **(dict(iterations=2, eval_size=2, eval_every=2, sketch_dim=K) | kw))


def die_saving_iteration_2(monkeypatch):
    """Every run from now on is killed (KeyboardInterrupt) after iteration 2's files, before its checkpoint."""
    real_save = learner.Learner.save

    def dies_saving_2(self, run_dir, iteration, extra):
        if iteration == 2:
            raise KeyboardInterrupt
        return real_save(self, run_dir, iteration, extra)

    monkeypatch.setattr(learner.Learner, "save", dies_saving_2)


def alternating(completions, examples):
    """A reward that varies inside every prompt group (a random tiny model is never right): 0, 1, 0, 1, ..."""
    return [float(i % 2) for i in range(len(completions))]


def run(cfg, run_dir, dtype=torch.float32, **kw):
    return helpers.run(cfg, run_dir, dtype, **({"reward_fn": alternating, "log": lambda _: None} | kw))


def as_lora_grads(lm, grads) -> dict[str, LoRAGrad]:
    """{layer: LoRAGrad} of a flat gradient list in ``lora_params`` order (A, B of each layer, the model's order)."""
    index = {id(p): g for p, g in zip(lora_params(lm), grads)}
    return {name: LoRAGrad(index[id(A)], index[id(B)]) for name, (A, B) in lora_weights(lm).items()}


def files(run_dir):
    return sorted(p.name for p in (run_dir / "sketches").iterdir())


def same_contents(a, b) -> bool:
    """The sketch files of runs ``a`` and ``b`` hold the same tensors, metadata and JSON (safetensors orders its
    metadata differently from one write to the next, so bytes may differ)."""
    for name in files(a):
        if name.endswith(".json"):
            if json.loads((a / "sketches" / name).read_text()) != json.loads((b / "sketches" / name).read_text()):
                return False
            continue
        with safe_open(a / "sketches" / name, "pt") as f, safe_open(b / "sketches" / name, "pt") as g:
            if f.metadata() != g.metadata() or set(f.keys()) != set(g.keys()):
                return False
            if not all(torch.equal(f.get_tensor(n), g.get_tensor(n)) for n in f.keys()):
                return False
    return files(a) == files(b)


def write_val(path, examples):
    path.write_text("".join(json.dumps({"question": e.question, "answer": e.answer}) + "\n" for e in examples))
    return path


@pytest.fixture(scope="module")
def ippo_run(tmp_path_factory):
    """An ippo run with sketches (2 iterations), its model saved where its config says (for the CLI)."""
    tmp = tmp_path_factory.mktemp("attribution")
    model, tok = tiny()
    model.save_pretrained(tmp / "tiny-model", safe_serialization=True)
    tok.save_pretrained(tmp / "tiny-model")
    run(cfg_for(tmp), tmp / "run")
    return tmp / "run"


# =========================================================================== the files


@pytest.mark.parametrize("algo", ["ppo", "grpo", "ippo"])
def test_files_per_iteration_and_training_unchanged(tmp_path, monkeypatch, algo):
    """Three files per iteration with the documented tensors; the adapter snapshot is the LoRA at the iteration's
    start (before its update); the run trains exactly as without --sketch-dim."""
    starts = {}
    real = T.rl_iteration

    def recording(L, it, timing):
        starts[it] = {n: t.clone() for n, t in checkpoint.trainable_state(L.lm).items()}  # (a view of the parameters)
        return real(L, it, timing)

    monkeypatch.setattr(T, "rl_iteration", recording)
    run(cfg_for(tmp_path, algo=algo), tmp_path / "with")
    monkeypatch.setattr(T, "rl_iteration", real)
    run(cfg_for(tmp_path, algo=algo, sketch_dim=0), tmp_path / "without")

    run_dir, task = tmp_path / "with", config.build_task(cfg_for(tmp_path))
    assert files(run_dir) == [f"iter-00000{i}.{ext}" for i in (1, 2)
                                      for ext in ("adapter.safetensors", "json", "safetensors")]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for it in (1, 2):
        sketch_path, adapter_path, texts_path = A.iteration_paths(run_dir, it)
        with safe_open(sketch_path, "pt") as f:
            meta = f.metadata()
        assert meta["algo"] == algo and int(meta["k"]) == K and int(meta["seed"]) == 0 and float(meta["lr"]) == 1e-4
        assert json.loads(meta["layers"]) == list(lora_linear_layers(add_lora(tiny()[0], r=4, alpha=8)))
        assert json.loads(meta["config"]) == dataclasses.asdict(cfg_for(tmp_path, algo=algo))
        t = load_file(sketch_path)
        names = {"sketches", "rewards", "keep", "weights", "index"} | ({"scores"} if algo == "ippo" else set())
        assert set(t) == names and t["sketches"].shape == (6, K) and t["sketches"].dtype == torch.float32
        assert t["keep"].dtype == torch.bool and t["index"].dtype == torch.int64
        assert all(t[n].shape == (6,) and t[n].dtype == torch.float32 for n in names - {"sketches", "keep", "index"})
        assert t["sketches"].abs().sum() > 0
        texts = json.loads(texts_path.read_text())
        assert texts["questions"] == [task.split("train")[i].question for i in t["index"]]
        assert len(texts["completions"]) == 6
        assert float(t["keep"].float().mean()) == pytest.approx(records[it]["kept_fraction"])
        assert float(t["rewards"].mean()) == pytest.approx(records[it]["reward"])
        if algo != "ippo":
            assert t["keep"].all() and torch.equal(t["weights"], torch.ones(6))
        assert records[it]["time"]["sketch"] > 0
        adapter = load_file(adapter_path)
        assert adapter.keys() == starts[it].keys()
        assert all(a.dtype == torch.bfloat16 and torch.equal(a, starts[it][n].bfloat16()) for n, a in adapter.items())
    assert any(not torch.equal(starts[1][n], starts[2][n]) for n in starts[1])  # the update moved the adapter
    a, b = (load_file(next(d.glob("ckpt-*.safetensors"))) for d in (tmp_path / "with", tmp_path / "without"))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert not (tmp_path / "without" / "sketches").exists()


def test_ippo_scores_and_sketches_from_one_backward_equal_the_per_episode_loop(tmp_path, monkeypatch):
    """float64 model: the stored sketches equal sketch_gradients of each episode's actor-loss gradient, computed one
    episode at a time, and the stored scores the exact <g_i, g_val>; one scorer (one backward) per micro-batch gave
    both."""
    seen, scorers = {}, []
    real_score, real_scorer = scoring.score_episodes, ippo.kernels.InfluenceScorer

    def spy(lm, tok, task, cfg, ro, old_logp, advantages, val_examples, timing, **kw):
        seen.update(state={n: t.clone() for n, t in checkpoint.trainable_state(lm).items()}, ro=ro, old_logp=old_logp,
                    advantages=advantages, val=val_examples)
        return real_score(lm, tok, task, cfg, ro, old_logp, advantages, val_examples, timing, **kw)

    class Counting(real_scorer):
        def __init__(self, model, val_grads, *args, **kw):
            scorers.append((val_grads is not None, kw.get("sketch_dim")))
            super().__init__(model, val_grads, *args, **kw)

    monkeypatch.setattr(scoring, "score_episodes", spy)
    monkeypatch.setattr(ippo.kernels, "InfluenceScorer", Counting)
    cfg = cfg_for(tmp_path, iterations=1)
    run(cfg, tmp_path / "run", dtype=torch.float64)
    assert scorers == [(True, K), (True, K)]  # 6 episodes in micro-batches of 4: two scored backwards

    lm = add_lora(tiny(torch.float64)[0], r=4, alpha=8)
    checkpoint.load_trainable_state(lm, seen["state"])
    ro, params, task = seen["ro"], lora_params(lm), config.build_task(cfg)
    g_val = torch.autograd.grad(policy.sft_loss(lm, TOK, task, seen["val"]), params)
    stored = load_file(A.iteration_paths(tmp_path / "run", 1)[0])
    for i in range(6):
        logp, _ = policy.response_logprobs(lm, ro, temperature=cfg.temperature)
        per_episode, _ = pm.policy_loss(logp, seen["old_logp"], seen["advantages"], ro.mask, cfg.clip)
        g_i = torch.autograd.grad(per_episode[i], params)
        expected = sketch_gradients(as_lora_grads(lm, g_i), K, 0, model=lm)
        assert expected.dtype == torch.float64
        torch.testing.assert_close(stored["sketches"][i], expected.float(), rtol=1e-5, atol=1e-6 * expected.abs().max())
        exact = sum((a * b).sum() for a, b in zip(g_i, g_val))
        torch.testing.assert_close(stored["scores"][i], exact.float(), rtol=1e-5, atol=1e-9)


def test_resume_after_a_kill_rewrites_exactly_the_uninterrupted_files(tmp_path, monkeypatch):
    """Killed after iteration 2's files were written but before its checkpoint, with a partial write and a bogus
    later file lying around: the resumed run ends with one set of files per iteration, those of an
    uninterrupted run (the same tensors, metadata and texts), and names what it removed."""
    cfg = cfg_for(tmp_path, iterations=3)
    run(cfg, tmp_path / "straight")
    with monkeypatch.context() as patch:
        die_saving_iteration_2(patch)
        killed = tmp_path / "killed"
        with pytest.raises(KeyboardInterrupt):
            run(cfg, killed)
    assert "iter-000002.safetensors" in files(killed)
    (killed / "sketches" / ".iter-000003.adapter.safetensors.abcd1234").write_bytes(b"partial")
    (killed / "sketches" / "iter-000003.safetensors").write_bytes(b"not safetensors")
    logs = []
    run(cfg, killed, resume=True, log=logs.append)
    assert files(killed) == files(tmp_path / "straight") and same_contents(killed, tmp_path / "straight")
    removed = next(line for line in logs if "sketch files" in line)
    assert "iter-000002.safetensors" in removed and ".iter-000003.adapter.safetensors.abcd1234" in removed


# =========================================================================== attribution


def test_attribute_equals_an_independent_tracin(ippo_run, tmp_path):
    """attribution = lr x w x <stored sketch, sketch_gradients(grad of VAL's SFT loss at the stored adapter)>, with
    the gradient taken here by plain autograd on one batch; the outputs and the CLI."""
    cfg = A.run_config(ippo_run)
    task = config.build_task(cfg)
    examples = task.split("eval")[:5]
    val_path = write_val(tmp_path / "val.jsonl", examples + task.split("eval")[5:7])
    result = A.attribute(ippo_run, str(val_path), out=tmp_path / "out", val_size=5, val_batch=2, progress=False,
                         model_and_tokenizer=tiny())
    assert result["val_examples"] == 5 and len(result["episodes"]) == 12
    lm = add_lora(tiny()[0], r=4, alpha=8)
    for it in (1, 2):
        sketch_path, adapter_path, _ = A.iteration_paths(ippo_run, it)
        checkpoint.load_trainable_state(lm, load_file(adapter_path))
        grads = torch.autograd.grad(policy.sft_loss(lm, TOK, task, examples), lora_params(lm))
        val = sketch_gradients(as_lora_grads(lm, grads), K, 0)
        t = load_file(sketch_path)
        expected = 1e-4 * t["weights"] * (t["sketches"] @ val)
        got = torch.tensor([e["attribution"] for e in result["episodes"] if e["iteration"] == it], dtype=torch.float64)
        torch.testing.assert_close(got, expected.double(), rtol=1e-4, atol=1e-6 * float(expected.abs().max()))
        assert all(e["attribution"] == 0 for e in result["episodes"] if e["iteration"] == it and not e["kept"])
        total = next(r["total"] for r in result["iterations"] if r["iteration"] == it)
        assert total == pytest.approx(float(got.sum()))
    saved = json.loads((tmp_path / "out" / "attribution.json").read_text())
    assert saved["episodes"] == result["episodes"] and saved["k"] == K
    best = max((e for e in result["episodes"] if e["kept"]), key=lambda e: e["attribution"])
    md = (tmp_path / "out" / "attribution.md").read_text()
    assert best["question"] in md and best["text"] in md and (tmp_path / "out" / "attribution.png").stat().st_size

    assert cli.main(["attribute", str(ippo_run), "--data", "validation", "--val-size", "3", "--no-progress"]) == 0
    assert json.loads((ippo_run / "attribution" / "attribution.json").read_text())["val_examples"] == 3


def test_attribute_errors_name_the_problem(ippo_run, tmp_path, capsys):
    def copy(name):
        shutil.copytree(ippo_run, tmp_path / name)
        return tmp_path / name

    def fails(run_dir, match, error=ValueError, data="validation"):
        with pytest.raises(error, match=match):
            A.attribute(run_dir, data, progress=False, model_and_tokenizer=tiny())

    no_sketches = copy("no-sketches")
    shutil.rmtree(no_sketches / "sketches")
    fails(no_sketches, "holds no sketches.*--sketch-dim")
    assert cli.main(["attribute", str(no_sketches), "--data", "validation"]) == 2
    assert "--sketch-dim" in capsys.readouterr().err

    junk = tmp_path / "junk.jsonl"
    junk.write_text('{"question": "q", "answer": "no final number"}\nnot json\n')
    with pytest.warns(UserWarning, match="skipped 2"):
        fails(ippo_run, "junk.jsonl.*no valid GSM8K example", data=str(junk))
    with pytest.raises(ValueError, match="--val-size must be >= 1"):
        A.attribute(ippo_run, "validation", val_size=0, progress=False, model_and_tokenizer=tiny())

    other_k = copy("other-k")
    path = A.iteration_paths(other_k, 2)[0]
    with safe_open(path, "pt") as f:
        meta, tensors = f.metadata(), {n: f.get_tensor(n) for n in f.keys()}
    save_file(tensors | {"sketches": torch.zeros(6, 2 * K)}, path, metadata=meta | {"k": str(2 * K)})
    fails(other_k, r"iter-000002\.safetensors: sketch k 32 differs from .*iter-000001\.safetensors's 16")

    no_adapter = copy("no-adapter")
    A.iteration_paths(no_adapter, 2)[1].unlink()
    fails(no_adapter, r"iter-000002\.adapter\.safetensors: missing adapter snapshot", FileNotFoundError)

    afile = tmp_path / "afile"
    afile.write_text("x")
    assert cli.main(["attribute", str(ippo_run), "--data", "validation", "--out", str(afile / "out")]) == 2
    assert f"--out {str(afile / 'out')!r} is under the file {str(afile)!r}" in capsys.readouterr().err
    assert cli.main(["attribute", str(ippo_run), "--data", str(tmp_path)]) == 2  # a directory: one line naming it
    err = capsys.readouterr().err
    assert err.startswith("ippo attribute: error: ") and str(tmp_path) in err and err.count("\n") == 1

    for index, what in ((0, r"iter-000001\.safetensors: not a readable"),
                        (1, r"iter-000001\.adapter\.safetensors: not a readable"),
                        (2, r"iter-000001\.json: not valid JSON")):
        corrupt = copy(f"corrupt-{index}")
        victim = A.iteration_paths(corrupt, 1)[index]
        victim.write_bytes(victim.read_bytes()[:40])
        fails(corrupt, what)


@pytest.mark.parametrize("bad", [dict(sketch_dim=-8), dict(sketch_dim=12), dict(sketch_seed=-1)])
def test_bad_sketch_options_are_refused(tmp_path, bad):
    with pytest.raises(ValueError, match="--sketch-(dim|seed)"):
        cfg_for(tmp_path, **bad).validate()  # lora_r = 4: K must be a multiple of 8


# =========================================================================== issue 18: sketches that are not the run's


def set_metadata(path, **changes):
    """Rewrite the safetensors file ``path`` with its metadata updated by ``changes`` (None: the key removed)."""
    with safe_open(path, "pt") as f:
        meta, tensors = f.metadata(), {n: f.get_tensor(n) for n in f.keys()}
    meta = {k: v for k, v in (meta | changes).items() if v is not None}
    save_file(tensors, path, metadata=meta)


def test_attribute_refuses_an_iteration_after_the_latest_checkpoint(tmp_path, monkeypatch):
    """Killed after iteration 2's sketches were written but before its checkpoint: latest.json says 1, so iteration
    2's files are not the run's (a resume writes them again) and attribute refuses them, naming the file."""
    die_saving_iteration_2(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run(cfg_for(tmp_path), tmp_path / "killed")
    assert "iter-000002.safetensors" in files(tmp_path / "killed")
    with pytest.raises(ValueError, match=r"iter-000002\.safetensors: iteration 2 is after the run's latest "
                                         r"checkpoint \(iteration 1"):
        A.attribute(tmp_path / "killed", "validation", progress=False, model_and_tokenizer=tiny())


@pytest.fixture(scope="module")
def other_runs(tmp_path_factory):
    """Runs like ``ippo_run`` but for one option each, whose sketches do not belong in it: {what differs: run}."""
    tmp = tmp_path_factory.mktemp("others")
    kinds = {"model": dict(model=str(tmp / "another-model")), "sketch_seed": dict(sketch_seed=1),
             "sketch_dim": dict(sketch_dim=2 * K), "lr": dict(lr=1e-3)}
    for what, kw in kinds.items():
        run(cfg_for(tmp, **kw), tmp / what)
    return {what: tmp / what for what in kinds}


@pytest.mark.parametrize("what", ["model", "sketch_seed", "sketch_dim", "lr"])
def test_attribute_refuses_sketches_of_another_run(ippo_run, other_runs, tmp_path, what):
    """Every sketch file of another run (another base model, sketch seed or dimension, learning rate) copied into a
    run: consistent among themselves, they were accepted; the stored config differs from the run's."""
    victim = tmp_path / "victim"
    shutil.copytree(ippo_run, victim)
    shutil.rmtree(victim / "sketches")
    shutil.copytree(other_runs[what] / "sketches", victim / "sketches")
    with pytest.raises(ValueError, match=rf"iter-000001\.safetensors: .*{what}"):
        A.attribute(victim, "validation", progress=False, model_and_tokenizer=tiny())


def remove_iteration_1(run_dir):
    for path in A.iteration_paths(run_dir, 1):
        path.unlink()


def swap_snapshot(run_dir):
    shutil.copy(A.iteration_paths(run_dir, 1)[1], A.iteration_paths(run_dir, 2)[1])


def old_format(run_dir):
    for it in (1, 2):
        set_metadata(A.iteration_paths(run_dir, it)[0], format="ippo-sketches/1", config=None)


@pytest.mark.parametrize("damage, match, error", [
    # iteration 1's files gone: iteration 2 alone was attributed, exit 0
    (remove_iteration_1, r"iter-000001\.safetensors: missing sketch file of iteration 1", FileNotFoundError),
    # iteration 1's adapter snapshot in iteration 2's place: the validation gradient at the wrong adapter
    (swap_snapshot, r"iter-000002\.adapter\.safetensors: .*iteration 1, expected 2", ValueError),
    # a NaN, infinite, negative or zero lr scales every attribution: NaN JSON, a plot error, every sign flipped
    *[(lambda run_dir, v=value: set_metadata(A.iteration_paths(run_dir, 2)[0], lr=v),
       rf"iter-000002\.safetensors: lr must be a finite number > 0, got {value}", ValueError)
      for value in ("nan", "inf", "-1.0", "0.0")],
    # written before sketch files recorded their run's config: nothing says which base model they were taken on
    (old_format, r"iter-000001\.safetensors: .*ippo-sketches/1.*do not record their run.s config", ValueError),
], ids=["gap", "snapshot-of-iteration-1", "lr-nan", "lr-inf", "lr-negative", "lr-zero", "old-format"])
def test_attribute_refuses_stored_files_that_are_not_the_run(ippo_run, tmp_path, damage, match, error):
    run_dir = tmp_path / "damaged"
    shutil.copytree(ippo_run, run_dir)
    damage(run_dir)
    with pytest.raises(error, match=match):
        A.attribute(run_dir, "validation", progress=False, model_and_tokenizer=tiny())
