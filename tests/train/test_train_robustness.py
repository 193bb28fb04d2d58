"""Bad options, partial and corrupt files, interrupted writes: each is refused with an error naming the option or
the file, or repaired with a log line saying what was done."""

import dataclasses
import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from helpers import cfg_for, kill_sft_warm_start, records, run, saved_tiny
from safetensors.torch import load_file, save_file

from ippo.train import cli, report
from ippo.train.config import Config, flag, preset_config


def checkpoint_files(run_dir):
    name = json.loads((run_dir / "latest.json").read_text())["checkpoint"]
    return run_dir / f"{name}.safetensors", run_dir / f"{name}.json"


@pytest.fixture
def finished_run(tmp_path):
    """``(cfg, copy)``: the config of a finished 1-iteration ppo run, and ``copy(name)`` -> a fresh copy of it."""
    cfg = cfg_for(tmp_path, algo="ppo")
    run(cfg, tmp_path / "run")

    def copy(name):
        shutil.copytree(tmp_path / "run", tmp_path / name)
        return tmp_path / name

    return cfg, copy


def resume(cfg, run_dir, **kw):
    return run(dataclasses.replace(cfg, iterations=2), run_dir, resume=True, **kw)


# ------------------------------------------------------------------------------------------- F1 partial files


def test_unusable_sft_cache_entry_is_reported_and_rebuilt(tmp_path):
    cfg = cfg_for(tmp_path, iterations=0)
    run(cfg, tmp_path / "first")
    [adapter] = (tmp_path / "cache").rglob("adapter.safetensors")
    info = adapter.parent / "info.json"
    good = load_file(adapter)
    names = sorted(good)
    damages = {
        "half of the tensors": lambda: save_file({k: good[k] for k in names[:len(names) // 2]}, adapter),
        "none of them": lambda: save_file({"something": torch.zeros(1)}, adapter),
        "an unknown one": lambda: save_file(good | {"extra.weight": torch.zeros(1)}, adapter),
        "a NaN": lambda: save_file(good | {names[0]: torch.full_like(good[names[0]], float("nan"))}, adapter),
        "a wrong shape": lambda: save_file(good | {names[0]: torch.zeros(3)}, adapter),
        "garbage": lambda: adapter.write_bytes(b"not a safetensors file"),
        "torn info.json": lambda: info.write_text('{"steps": 2, "fin'),
    }
    for case, damage in damages.items():
        damage()
        logs = []
        run(cfg, tmp_path / case, log=logs.append)
        named = str(info) if "info" in case else str(adapter)
        assert any("unusable, rebuilding" in line and named in line for line in logs), (case, logs)
        assert not any("reusing" in line for line in logs), case
        rebuilt = load_file(adapter)
        assert rebuilt.keys() == good.keys() and all(torch.equal(rebuilt[k], good[k]) for k in good), case
        assert records(tmp_path / case)[0]["eval"] == records(tmp_path / "first")[0]["eval"], case


def test_unusable_sft_checkpoint_starts_the_warm_start_over(tmp_path, monkeypatch):
    """A killed warm start whose checkpoint is then damaged starts over, and ends as an uninterrupted one."""
    killed = kill_sft_warm_start(tmp_path, monkeypatch, steps=7, dies_at=6)
    [partial] = (tmp_path / "killed").rglob("partial")
    tensors_path, _ = checkpoint_files(partial)
    save_file({k: v for k, v in load_file(tensors_path).items() if not k.startswith("lora/")}, tensors_path)
    logs = []
    run(killed, tmp_path / "c", log=logs.append)
    assert any("starting over" in line and str(tensors_path) in line for line in logs)
    whole = load_file(next((tmp_path / "whole").rglob("adapter.safetensors")))
    again = load_file(next((tmp_path / "killed").rglob("adapter.safetensors")))
    assert all(torch.equal(whole[k], again[k]) for k in whole)


@pytest.mark.parametrize("damage, why", [
    (lambda t: {k: v for k, v in t.items() if not k.startswith("lora/")}, "missing .* LoRA tensors"),
    (lambda t: {k: v for i, (k, v) in enumerate(t.items()) if not (k.startswith("lora/") and i % 2)},
     "missing .* LoRA tensors"),
    (lambda t: t | {"lora/extra.weight": torch.zeros(1)}, "unknown LoRA tensors"),
    (lambda t: {k: (torch.full_like(v, float("inf")) if k.startswith("lora/") else v) for k, v in t.items()},
     "NaN or infinite"),
    (lambda t: {k: (v[:1] if k.startswith("lora/") else v) for k, v in t.items()}, "has shape"),
    (lambda t: {k: v for k, v in t.items() if not k.startswith("value_head/")}, "missing .* value-head tensors"),
    (lambda t: {k: v for k, v in t.items() if not k.endswith("/exp_avg")}, "missing optimizer tensor"),
    (lambda t: {k: v for k, v in t.items() if k != "rng/torch"}, "missing the RNG state"),
])
def test_incomplete_checkpoint_is_refused_naming_it(finished_run, damage, why):
    cfg, copy = finished_run
    run_dir = copy("damaged")
    tensors_path, _ = checkpoint_files(run_dir)
    save_file(damage(load_file(tensors_path)), tensors_path)
    with pytest.raises(ValueError, match=re.escape(str(tensors_path)) + ".*" + why):
        resume(cfg, run_dir)


# ------------------------------------------------------------------------------------------- F2 bad options


def test_every_float_option_must_be_finite():
    floats = [f.name for f in dataclasses.fields(Config) if f.type == "float"]
    assert {"tol", "temperature", "kl_coef", "vf_coef", "lr"} <= set(floats)
    for name in floats:
        for value in (float("nan"), float("inf"), float("-inf")):
            with pytest.raises(ValueError, match=f"{flag(name)} must be a finite number"):
                Config(**{name: value}).validate()


@pytest.mark.parametrize("args, named", [
    (["--tol", "nan"], "--tol"), (["--temperature", "nan"], "--temperature"),
    (["--temperature", "inf"], "--temperature"), (["--kl-coef", "nan"], "--kl-coef"),
    (["--vf-coef", "nan"], "--vf-coef"), (["--lr", "inf"], "--lr"), (["--threads", "100000"], "--threads"),
    (["--arith-sizes", "5000,500"], "--arith-sizes"), (["--arith-sizes", "a,b,c"], "--arith-sizes"),
    (["--arith-sizes", "10,0,5"], "--arith-sizes"),
])
def test_cli_refuses_bad_options_before_any_work(tmp_path, capsys, args, named):
    assert cli.main(["train", "--out", str(tmp_path / "run"), *args]) == 2
    assert f"ippo train: error: {named} must" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def _parsed_config(monkeypatch, argv):
    """The Config that ``ippo argv`` would run (train, probe) or sweep (compare --seeds), caught before any work."""
    from ippo.train import compare, probe, trainer

    seen = []

    def catch(cfg, *args, **kwargs):
        seen.append(cfg)
        raise KeyboardInterrupt

    for module, name in ((trainer, "train"), (probe, "probe"), (compare, "run_all")):
        monkeypatch.setattr(module, name, catch)
    assert cli.main(argv) == 130
    return seen[0]


@pytest.mark.parametrize("command", [["train"], ["probe"], ["compare", "--seeds", "0"]])
def test_preset_sets_the_defaults_and_explicit_options_win(tmp_path, monkeypatch, command):
    from ippo.train.config import PRESETS

    preset = PRESETS["testbed"]
    cfg = _parsed_config(monkeypatch, [*command, "--preset", "testbed", "--out", str(tmp_path / "a")])
    assert {name: getattr(cfg, name) for name in preset} == preset
    assert {name: getattr(Config(), name) for name in preset} != preset  # the preset changes something
    cfg = _parsed_config(monkeypatch, [*command, "--lr", "3e-4", "--preset=testbed", "--temperature", "0.7",
                                       "--out", str(tmp_path / "b")])
    assert (cfg.lr, cfg.temperature, cfg.sft_steps) == (3e-4, 0.7, preset["sft_steps"])


def test_unknown_preset_is_refused_naming_the_option(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--preset", "nope"])
    assert exit_.value.code == 2 and "--preset" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--preset must be one of"):
        preset_config("nope")


# ------------------------------------------------------------------------------------------- F3 interrupted writes


@pytest.mark.parametrize("torn", ['{"iteration": 2, "reward": 0.5, "top_epis', '{"iteration": 2, "rew\n',
                                  '{"iteration": 2}'])
def test_torn_last_metrics_line_is_dropped_on_resume(finished_run, torn):
    cfg, copy = finished_run
    run_dir = copy("torn")
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write(torn)  # a kill mid-append: no newline, or not valid JSON
    logs = []
    resume(cfg, run_dir, log=logs.append)
    assert any("torn" in line and str(run_dir / "metrics.jsonl") in line for line in logs)
    assert [r["iteration"] for r in records(run_dir)] == [0, 1, 2]


def test_invalid_metrics_line_before_the_last_is_refused(finished_run, capsys):
    cfg, copy = finished_run
    run_dir = copy("bad-line")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text("\n".join([lines[0], '{"iteration": 1, "oops', lines[1]]) + "\n")
    where = re.escape(f"{run_dir / 'metrics.jsonl'}, line 2")
    with pytest.raises(ValueError, match=where):
        resume(cfg, run_dir)
    with pytest.raises(ValueError, match=where):
        report.read_metrics(run_dir)
    assert cli.main(["report", str(run_dir), "--out", str(run_dir / "report")]) == 2
    assert "metrics.jsonl, line 2" in capsys.readouterr().err


def test_resume_from_the_iteration_0_checkpoint_writes_each_iteration_once(tmp_path):
    cfg = cfg_for(tmp_path, algo="ippo", iterations=2)
    run(cfg, tmp_path / "straight")
    run(dataclasses.replace(cfg, iterations=0), tmp_path / "resumed")
    run(cfg, tmp_path / "resumed", resume=True)

    def strip(recs):
        return [{k: v for k, v in r.items() if k not in ("time", "wall", "wall_total", "sft")} for r in recs]

    assert [r["iteration"] for r in records(tmp_path / "resumed")] == [0, 1, 2]
    assert strip(records(tmp_path / "resumed")) == strip(records(tmp_path / "straight"))


def test_stale_temp_files_are_removed_on_start_and_resume(finished_run, tmp_path):
    cfg, copy = finished_run
    run_dir = copy("stale")
    stale = [run_dir / ".ckpt-00001.safetensors.abcd1234", run_dir / ".metrics.jsonl.zz_9xy12"]
    kept = [run_dir / ".notes.txt", run_dir / "ckpt-notes.txt.abcd1234"]  # not names atomic_write makes
    [entry] = {p.parent for p in (tmp_path / "cache").rglob("adapter.safetensors")}
    old, fresh = entry / ".adapter.safetensors.k2j3h4g5", entry / ".info.json.a1b2c3d4"  # fresh: a concurrent write
    for path in [*stale, *kept, old, fresh]:
        path.write_bytes(b"partial")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    logs = []
    resume(cfg, run_dir, log=logs.append)
    assert not any(p.exists() for p in [*stale, old]) and all(p.exists() for p in [*kept, fresh])
    assert any("removed 2 temporary files" in line for line in logs)
    start = tmp_path / "new-run"  # a run killed before its first checkpoint leaves them too
    start.mkdir()
    (start / ".config.json.abcd1234").write_text("{")
    run(cfg, start)
    assert not (start / ".config.json.abcd1234").exists()


@pytest.mark.parametrize("pointer", ["../run/ckpt-00001", "ckpt-1", "/tmp/ckpt-00001", 7])
def test_latest_json_must_name_a_checkpoint_of_this_run(finished_run, capsys, pointer):
    cfg, copy = finished_run
    run_dir = copy("pointer")
    (run_dir / "latest.json").write_text(json.dumps({"checkpoint": pointer, "iteration": 1}))
    with pytest.raises(ValueError, match=re.escape(str(run_dir / "latest.json"))):
        resume(cfg, run_dir)
    assert cli.main(["eval", str(run_dir)]) == 2
    assert "latest.json: 'checkpoint' must name a checkpoint of this directory" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- F4 corrupt files


@pytest.mark.parametrize("target, content, why", [
    ("latest.json", "{not json", "not valid JSON"),
    ("latest.json", '{"iteration": 1}', "missing 'checkpoint'"),
    ("config.json", '{"algo": "ppo", ', "not valid JSON"),
    ("ckpt.json", "", "not valid JSON"),
    ("ckpt.json", '{"iteration": 1}', "missing 'param_groups'"),
    ("ckpt.safetensors", "garbage", "not a readable safetensors file"),
])
def test_corrupt_run_file_is_an_error_naming_it(finished_run, capsys, target, content, why):
    cfg, copy = finished_run
    run_dir = copy("corrupt")
    tensors_path, meta_path = checkpoint_files(run_dir)
    path = {"ckpt.json": meta_path, "ckpt.safetensors": tensors_path}.get(target, run_dir / target)
    path.write_text(content)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + why):
        resume(cfg, run_dir)
    if target != "ckpt.json":  # ippo eval reads the others
        assert cli.main(["eval", str(run_dir)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("ippo eval: error: ") and str(path) in err and why in err
    assert cli.main(["train", "--resume", "--out", str(run_dir)]) == 2  # fails before comparing options or loading
    assert str(path) in capsys.readouterr().err or target == "ckpt.safetensors"


# ------------------------------------------------------------------------------------------- issue 18: --out and paths

TINY = ["--arith-steps", "1", "--arith-sizes", "40,8,8", "--lora-r", "4", "--lora-alpha", "8", "--sft-steps", "1",
        "--sft-batch", "2", "--prompts-per-iter", "1", "--samples-per-prompt", "3", "--max-new-tokens", "6",
        "--val-size", "2", "--eval-size", "2", "--eval-k", "2", "--threads", "1", "--no-progress"]  # (no --iterations:
# ippo sft has none, and one iteration is quick enough)


def contents(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_out_that_holds_something_else_is_refused(tmp_path, capsys):
    """Issue 18: --out at an HF model folder (no latest.json) had its config.json overwritten. A non-empty folder
    that holds no ippo run is refused before any work, naming it; an absent or empty folder, or one left by a run
    killed before its first checkpoint (config.json, metrics.jsonl, temporary files), is trained into."""
    model_dir = saved_tiny(tmp_path)
    before = contents(model_dir)
    common = ["--model", str(model_dir), "--cache-dir", str(tmp_path / "cache"), *TINY]
    capsys.readouterr()
    for command in (["train", "--algo", "ppo", "--iterations", "1"], ["sft"]):
        assert cli.main([*command, "--out", str(model_dir), *common]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"ippo {command[0]}: error: --out {str(model_dir)!r} is not empty and holds no ippo run")
        assert err.count("\n") == 1
    assert contents(model_dir) == before
    cfg = cfg_for(tmp_path, algo="ppo")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="todo.txt"):
        run(cfg, notes)
    assert contents(notes) == {Path("todo.txt"): b"mine"}

    (tmp_path / "empty").mkdir()
    run(cfg, tmp_path / "empty")
    killed = tmp_path / "killed"  # killed before its first checkpoint: started again
    killed.mkdir()
    (killed / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    (killed / "metrics.jsonl").write_text('{"iteration": 0}\n')
    (killed / ".ckpt-00000.json.abcd1234").write_text("{")
    run(cfg, killed)
    assert [r["iteration"] for r in records(killed)] == [0, 1]


@pytest.mark.parametrize("case", ["out under a file", "out is a file", "cache-dir is a file"])
def test_out_and_cache_dir_paths_are_checked_before_any_work(tmp_path, capsys, case):
    afile = tmp_path / "afile"
    afile.write_text("x")
    out, cache, named = {"out under a file": (afile / "run", tmp_path / "cache", "--out"),
                         "out is a file": (afile, tmp_path / "cache", "--out"),
                         "cache-dir is a file": (tmp_path / "run", afile, "--cache-dir")}[case]
    no_model = ["--model", str(tmp_path / "no-model")]  # any work would fail on the model instead
    for command in (["train"], ["sft"], ["compare", "--algos", "ppo"], ["compare", "--algos", "ppo", "--seeds", "0"],
                    ["probe"]):
        assert cli.main([*command, "--out", str(out), "--cache-dir", str(cache), *no_model, *TINY]) == 2, command
        err = capsys.readouterr().err
        assert named in err and str(afile) in err and err.count("\n") == 1, (command, err)
    assert afile.read_text() == "x" and not (tmp_path / "run").exists()


def test_os_errors_are_one_line_naming_the_path(tmp_path, capsys, monkeypatch):
    """OSErrors other than FileNotFound / FileExists (a directory given for a file, a permission error) are one
    line naming the path, exit 2, not a traceback."""
    folder = tmp_path / "data"
    folder.mkdir()
    args = ["train", "--task", "gsm8k", "--data", str(folder), "--out", str(tmp_path / "run"),
            "--model", str(tmp_path / "no-model")]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("ippo train: error: ") and str(folder) in err and err.count("\n") == 1

    from ippo.train import trainer

    def denied(*args, **kw):
        raise PermissionError(13, "Permission denied", "/somewhere/run/config.json")

    monkeypatch.setattr(trainer, "train", denied)
    assert cli.main(["train", "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == "ippo train: error: /somewhere/run/config.json: Permission denied\n"


@pytest.mark.parametrize("args, named", [
    (["--device", "meta"], "--device"), (["--device", "cuda:x"], "--device"), (["--device", "cpu:0"], "--device"),
    (["--sketch-dim", "1099511627776"], "--sketch-dim"), (["--sketch-dim", str(2**24 + 32)], "--sketch-dim"),
    (["--seed", "99999999999999999999"], "--seed"), (["--seed", str(2**63)], "--seed"), (["--seed", "-1"], "--seed"),
])
def test_cli_refuses_out_of_range_options(tmp_path, capsys, args, named):
    """Issue 18: --device meta, a sketch dimension the kernels cannot take and seeds beyond torch's range passed
    validation (and failed late, or not at all); each is refused naming the option, before any work."""
    no_model = ["--model", str(tmp_path / "no-model")]  # any work would fail on the model instead
    assert cli.main(["train", "--out", str(tmp_path / "run"), *no_model, *args]) == 2
    assert f"ippo train: error: {named} must" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_edge_of_the_ranges_is_accepted():
    for kw in [dict(device="cuda:1"), dict(device="auto"), dict(seed=2**63 - 1), dict(sketch_dim=2**24)]:
        Config(**kw).validate()
