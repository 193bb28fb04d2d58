"""Run-directory files: atomic writes, reads that name the file on any error, and exact-resume checkpoints.

A checkpoint is ``ckpt-<iteration>.safetensors`` (LoRA, value head, optimizer tensors, torch RNG) plus
``ckpt-<iteration>.json`` (the rest), then ``latest.json`` pointing at them; every file is written through a
temporary file and ``os.replace``, the pointer last, so a kill -9 at any moment leaves the previous checkpoint
whole. Loading checks everything before changing anything: every trainable tensor present with its shape and
finite, no unknown tensor, the optimizer and RNG states complete; a bad file is a ValueError naming it.

A run directory (:func:`check_run_dir`) is started only where no run is (an absent or empty folder, or one left by a
run killed before its first checkpoint) and resumed only with the options it was run with, but for
``RESUME_MAY_CHANGE`` (:func:`changed_options`, the one rule of what a resume may change).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from ippo.train.config import Config

CHECKPOINT_NAME = re.compile(r"ckpt-\d{5}")
CHECKPOINT_FILE = re.compile(r"ckpt-\d{5}\.(?:json|safetensors)")
# What ``atomic_write`` leaves behind when killed mid-write: "." + a file it writes + "." + mkstemp's 8 characters.
TEMP_FILE = re.compile(r"\.(?:metrics\.jsonl|config\.json|latest\.json|info\.json|adapter\.safetensors|"
                       r"ckpt-\d{5}\.(?:json|safetensors))\.[a-z0-9_]{8}")


# =========================================================================== files


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write through ``write(tmp_path)`` then ``os.replace``: a reader never sees a partial file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def remove_stale_temp_files(directory: Path, min_age_s: float = 0.0) -> list[Path]:
    """Delete the temporary files of killed :func:`atomic_write` calls in ``directory`` (not below it).

    Only names :func:`atomic_write` makes are touched, and only those not modified for ``min_age_s`` seconds
    (a directory shared by concurrent runs, like the SFT cache, must not lose a write in progress).
    """
    removed = []
    if not directory.is_dir():
        return removed
    now = time.time()
    for path in directory.iterdir():
        with contextlib.suppress(FileNotFoundError):
            if TEMP_FILE.fullmatch(path.name) and path.is_file() and now - path.stat().st_mtime >= min_age_s:
                path.unlink()
                removed.append(path)
    return removed


def check_dir_path(path: str | Path, flag: str) -> None:
    """``path`` is, or can be made, a directory this process writes in: not a file, no file among its parents, and
    the directory (or its nearest existing parent) writable; ValueError naming ``flag`` and the path otherwise."""
    path = Path(path).expanduser()
    existing = next(p for p in (path, *path.parents) if p.exists() or p == p.parent)
    if not existing.is_dir():
        where = "is a file" if existing == path else f"is under the file {str(existing)!r}"
        raise ValueError(f"{flag} {str(path)!r} {where}, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {str(path)!r}: no permission to write in {str(existing)!r}")


def write_json(path: Path, obj) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1), encoding="utf-8"))


def read_json(path: Path, required: tuple[str, ...] = ()) -> Any:
    """The JSON value in ``path``; with ``required``, an object holding those keys. ValueError naming the file."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if required:
        if not isinstance(value, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
        missing = [key for key in required if key not in value]
        if missing:
            raise ValueError(f"{path}: missing {', '.join(map(repr, missing))}")
    return value


def load_tensors(path: Path) -> dict[str, Tensor]:
    """The tensors of a safetensors file; a missing file is FileNotFoundError, a corrupt one ValueError, each
    naming the file."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return load_file(path)
    except Exception as err:  # SafetensorError (not a ValueError), OSError, ...
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from err


def read_metrics(path: Path) -> tuple[list[tuple[str, dict]], str | None]:
    """The ``(line, record)`` pairs of a metrics.jsonl, and its torn last line (None if there is none).

    A run appends one line per iteration, so a kill mid-append leaves the last line without its newline or
    not valid JSON: that line is returned apart. Invalid JSON anywhere else is a ValueError naming the line.
    """
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err})") from err
    complete, torn = lines[:-1], lines[-1] if lines[-1].strip() else None
    entries = []
    for number, line in enumerate(complete, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(complete) and torn is None:
                torn = line
                continue
            raise ValueError(f"{path}, line {number}: not valid JSON ({err})") from err
        if not isinstance(record, dict) or type(record.get("iteration")) is not int:
            raise ValueError(f"{path}, line {number}: not a metrics record (no integer 'iteration')")
        entries.append((line, record))
    return entries, torn


# =========================================================================== trainable tensors


def trainable_state(lm: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in lm.named_parameters() if p.requires_grad}


def _check_tensors(expected: dict[str, Tensor], tensors: dict[str, Tensor], prefix: str, source,
                   what: str) -> dict[str, Tensor]:
    """``tensors[prefix + name]`` for every ``name`` of ``expected``, each of its shape and finite; ValueError
    naming ``source`` if one is missing, misshapen or not finite, or if a tensor under ``prefix`` is unknown."""
    found = {key[len(prefix):]: t for key, t in tensors.items() if key.startswith(prefix)}
    missing = [name for name in expected if name not in found]
    if missing:
        raise ValueError(f"{source}: missing {len(missing)} of the {len(expected)} {what} tensors "
                         f"(e.g. {prefix + missing[0]!r})")
    unknown = sorted(set(found) - set(expected))
    if unknown:
        raise ValueError(f"{source}: {len(unknown)} unknown {what} tensors (e.g. {prefix + unknown[0]!r})")
    for name, ref in expected.items():
        t = found[name]
        if t.shape != ref.shape:
            raise ValueError(f"{source}: {prefix + name!r} has shape {tuple(t.shape)}, the model's is "
                             f"{tuple(ref.shape)}")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"{source}: {prefix + name!r} holds NaN or infinite values")
    return found


def load_trainable_state(lm: nn.Module, tensors: dict[str, Tensor], prefix: str = "",
                         source: str | Path = "tensors") -> None:
    """Fill every trainable parameter of ``lm`` from ``tensors[prefix + name]`` (as ``trainable_state`` wrote
    them). Checked first, nothing copied otherwise: every parameter present, of its shape, finite, and no other
    tensor under ``prefix`` (ValueError naming ``source``)."""
    params = {n: p for n, p in lm.named_parameters() if p.requires_grad}
    found = _check_tensors(params, tensors, prefix, source, "trainable")
    with torch.no_grad():
        for name, t in found.items():
            params[name].copy_(t)


# =========================================================================== checkpoints


def save_checkpoint(run_dir: Path, iteration: int, lm: nn.Module, value_head: nn.Module,
                    opt: torch.optim.Optimizer, rng: random.Random, extra: dict) -> None:
    """``ckpt-<iteration>.safetensors`` (LoRA, value head, optimizer tensors, torch RNG) + ``.json`` (the rest),
    then ``latest.json`` pointing at them; every file is written atomically and the pointer last."""
    from safetensors.torch import save_file

    tensors = {f"lora/{n}": t for n, t in trainable_state(lm).items()}
    tensors.update({f"value_head/{n}": t.detach().cpu().clone() for n, t in value_head.state_dict().items()})
    opt_state = opt.state_dict()
    for idx, state in opt_state["state"].items():
        for key, value in state.items():
            tensors[f"opt/{idx}/{key}"] = torch.as_tensor(value).cpu().clone().contiguous()
    tensors["rng/torch"] = torch.random.get_rng_state()
    if torch.cuda.is_available():  # sampling on a GPU draws from its generator
        tensors["rng/cuda"] = torch.cuda.get_rng_state()
    name = f"ckpt-{iteration:05d}"
    atomic_write(run_dir / f"{name}.safetensors", lambda tmp: save_file(tensors, tmp))
    meta = {"iteration": iteration, "param_groups": opt_state["param_groups"],
            "opt_keys": {str(i): sorted(s) for i, s in opt_state["state"].items()},
            "python_rng": _rng_to_json(rng.getstate()), **extra}
    write_json(run_dir / f"{name}.json", meta)
    write_json(run_dir / "latest.json", {"checkpoint": name, "iteration": iteration})
    for old in run_dir.glob("ckpt-*"):  # keep only the newest checkpoint (and files that are not checkpoints)
        if CHECKPOINT_FILE.fullmatch(old.name) and not old.name.startswith(name):
            old.unlink(missing_ok=True)


def latest_checkpoint(run_dir: Path) -> tuple[str, int]:
    """``(name, iteration)`` of the checkpoint ``run_dir/latest.json`` points at: a ``ckpt-NNNNN`` of this
    directory (ValueError naming latest.json otherwise)."""
    path = run_dir / "latest.json"
    latest = read_json(path, required=("checkpoint", "iteration"))
    name, iteration = latest["checkpoint"], latest["iteration"]
    if not isinstance(name, str) or not CHECKPOINT_NAME.fullmatch(name):
        raise ValueError(f"{path}: 'checkpoint' must name a checkpoint of this directory (ckpt-NNNNN), got {name!r}")
    if type(iteration) is not int or iteration < 0:
        raise ValueError(f"{path}: 'iteration' must be an integer >= 0, got {iteration!r}")
    return name, iteration


class CheckpointFiles(NamedTuple):
    """What :func:`read_checkpoint` read: the JSON metadata and the tensors, and the files they came from."""

    meta: dict
    tensors: dict[str, Tensor]
    meta_path: Path
    tensors_path: Path


def read_checkpoint(run_dir: Path, required: tuple[str, ...] = ()) -> CheckpointFiles:
    """Read the newest checkpoint of ``run_dir`` (its JSON must hold ``required``); ValueError naming a file that
    is not what ``save_checkpoint`` writes. Needs no model: a run can check it before any work."""
    name, iteration = latest_checkpoint(run_dir)
    meta_path, tensors_path = run_dir / f"{name}.json", run_dir / f"{name}.safetensors"
    meta = read_json(meta_path, required=("iteration", "param_groups", "opt_keys", "python_rng", *required))
    if meta["iteration"] != iteration:
        raise ValueError(f"{meta_path}: iteration {meta['iteration']!r}, but latest.json says {iteration}")
    return CheckpointFiles(meta, load_tensors(tensors_path), meta_path, tensors_path)


def load_checkpoint(run_dir: Path, lm: nn.Module, value_head: nn.Module, opt: torch.optim.Optimizer,
                    rng: random.Random, required: tuple[str, ...] = (), files: CheckpointFiles | None = None) -> dict:
    """Restore everything ``save_checkpoint`` wrote (``files``, if already read); returns its JSON metadata.

    Every file is checked before anything is restored; a bad one is a ValueError naming it, and then ``lm``,
    ``value_head``, ``opt``, ``rng`` and the torch RNG are left as they were.
    """
    meta, tensors, meta_path, tensors_path = files or read_checkpoint(run_dir, required)

    lora = _check_tensors({n: p for n, p in lm.named_parameters() if p.requires_grad}, tensors, "lora/",
                          tensors_path, "LoRA")
    head = _check_tensors(value_head.state_dict(), tensors, "value_head/", tensors_path, "value-head")
    opt_state = _check_optimizer(opt, meta, tensors, meta_path, tensors_path)
    rng_keys = {"rng/torch", "rng/cuda"}
    unknown = sorted(k for k in tensors if not k.startswith(("lora/", "value_head/", "opt/")) and k not in rng_keys)
    if unknown:
        raise ValueError(f"{tensors_path}: unknown tensors {unknown[:3]}")
    _check_rng_state(tensors.get("rng/torch"), torch.random.get_rng_state(), "rng/torch", tensors_path)
    restore_cuda = "rng/cuda" in tensors and torch.cuda.is_available()
    if restore_cuda:
        _check_rng_state(tensors["rng/cuda"], torch.cuda.get_rng_state(), "rng/cuda", tensors_path)
    try:
        python_rng = _rng_from_json(meta["python_rng"])
        random.Random().setstate(python_rng)
    except (TypeError, ValueError, IndexError, KeyError) as err:
        raise ValueError(f"{meta_path}: 'python_rng' is not a random.Random state ({err})") from err

    params = {n: p for n, p in lm.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for n, t in lora.items():
            params[n].copy_(t)
    value_head.load_state_dict(head)
    opt.load_state_dict(opt_state)
    torch.random.set_rng_state(tensors["rng/torch"])
    if restore_cuda:
        torch.cuda.set_rng_state(tensors["rng/cuda"])
    rng.setstate(python_rng)
    return meta


def _check_optimizer(opt: torch.optim.Optimizer, meta: dict, tensors: dict[str, Tensor], meta_path: Path,
                     tensors_path: Path) -> dict:
    """The optimizer state dict of a checkpoint, checked against ``opt``'s parameters."""
    groups = meta["param_groups"]
    if not (isinstance(groups, list) and len(groups) == len(opt.param_groups) and all(
            isinstance(g, dict) and isinstance(g.get("params"), list) and len(g["params"]) == len(mine["params"])
            for g, mine in zip(groups, opt.param_groups))):
        raise ValueError(f"{meta_path}: 'param_groups' does not match the optimizer's parameter groups")
    param_of = {i: p for g, mine in zip(groups, opt.param_groups) for i, p in zip(g["params"], mine["params"])}
    opt_keys = meta["opt_keys"]
    if not isinstance(opt_keys, dict):
        raise ValueError(f"{meta_path}: 'opt_keys' must be an object")
    state, used = {}, set()
    for index, keys in opt_keys.items():
        if not (index.isdigit() and int(index) in param_of and isinstance(keys, list)):
            raise ValueError(f"{meta_path}: 'opt_keys' entry {index!r} names no parameter of the optimizer")
        param, state[int(index)] = param_of[int(index)], {}
        for key in keys:
            name = f"opt/{index}/{key}"
            if name not in tensors:
                raise ValueError(f"{tensors_path}: missing optimizer tensor {name!r}")
            t = tensors[name]
            if t.dim() and t.shape != param.shape:
                raise ValueError(f"{tensors_path}: {name!r} has shape {tuple(t.shape)}, its parameter's is "
                                 f"{tuple(param.shape)}")
            state[int(index)][key] = t
            used.add(name)
    unknown = sorted(k for k in tensors if k.startswith("opt/") and k not in used)
    if unknown:
        raise ValueError(f"{tensors_path}: {len(unknown)} optimizer tensors not in {meta_path.name} "
                         f"(e.g. {unknown[0]!r})")
    return {"state": state, "param_groups": groups}


def _check_rng_state(state: Tensor | None, like: Tensor, name: str, path: Path) -> None:
    if state is None:
        raise ValueError(f"{path}: missing the RNG state {name!r}")
    if state.dtype != like.dtype or state.shape != like.shape:
        raise ValueError(f"{path}: {name!r} is not a generator state ({state.dtype}, {tuple(state.shape)})")


def _rng_to_json(state):
    return [state[0], list(state[1]), state[2]]


def _rng_from_json(state):
    return (state[0], tuple(state[1]), state[2])


# =========================================================================== run directories


# What ``ippo train --resume`` may change (the run's length and where and how fast it runs): a run resumed with other
# values is still the run of its config.json. Any other option differs (``changed_options``).
RESUME_MAY_CHANGE = ("iterations", "wall_budget", "threads", "device")
# What a run killed before its first checkpoint leaves (with its config.json): starting it again is no loss.
_EARLY_RUN_FILE = re.compile(r"metrics\.jsonl|ckpt-\d{5}\.(?:json|safetensors)")


def changed_options(cfg: Config, saved: dict) -> dict[str, tuple[Any, Any]]:
    """``{option: (the run's value, cfg's value)}`` of the options of a run's config.json (``saved``) that ``cfg``
    sets otherwise, those in ``RESUME_MAY_CHANGE`` aside (options one side does not know are ignored)."""
    return {k: (v, getattr(cfg, k)) for k, v in sorted(saved.items())
            if k not in RESUME_MAY_CHANGE and hasattr(cfg, k) and getattr(cfg, k) != v}


def is_run_config(path: Path) -> bool:
    """``path`` holds a JSON object with an ``algo``: the config.json of an ippo run (an HF model's has none)."""
    try:
        read_json(path, required=("algo",))
    except ValueError:
        return False
    return True


def check_paths(cfg: Config, out: Path) -> None:
    """``out`` (``--out``) and ``cfg.cache_dir`` can be directories this process writes in (:func:`check_dir_path`)."""
    check_dir_path(out, "--out")
    if cfg.cache_dir is not None:
        check_dir_path(cfg.cache_dir, "--cache-dir")


def check_run_dir(cfg: Config, run_dir: Path, resume: bool) -> CheckpointFiles | None:
    """Before any work of a run into ``run_dir`` (``--out``; ValueError if it cannot be a directory this process
    writes in, nor ``cfg.cache_dir``). Resume: the checkpoint of ``run_dir`` (read here, so that a bad file fails
    before any work), whose metrics must be readable and options the same but for ``RESUME_MAY_CHANGE``.
    Otherwise: no run is there yet, and nothing else either: an absent or empty folder, or the files of a run
    killed before its first checkpoint (FileExistsError naming the folder otherwise: an HF model folder's
    config.json must not be overwritten)."""
    run_dir = Path(run_dir)
    check_paths(cfg, run_dir)
    if not resume:
        if (run_dir / "latest.json").is_file():
            raise FileExistsError(f"{str(run_dir)!r} already holds a run; pass --resume to continue it or pick "
                                  f"another --out")
        if run_dir.is_dir():
            foreign = sorted(p.name for p in run_dir.iterdir() if not (
                TEMP_FILE.fullmatch(p.name) or (p.is_file() and _EARLY_RUN_FILE.fullmatch(p.name))
                or (p.name == "config.json" and p.is_file() and is_run_config(p))))
            if foreign:
                raise FileExistsError(f"--out {str(run_dir)!r} is not empty and holds no ippo run (e.g. "
                                      f"{foreign[0]!r}); pick a new or empty folder")
        return None
    if not (run_dir / "latest.json").is_file():
        raise FileNotFoundError(f"--resume: {str(run_dir)!r} holds no checkpoint (latest.json)")
    checkpoint = read_checkpoint(run_dir, required=("wall", "wall_total"))
    read_metrics(run_dir / "metrics.jsonl")
    changed = changed_options(cfg, read_json(run_dir / "config.json", required=("algo",)))
    if changed:
        raise ValueError(f"--resume: options differ from the run's config.json: {list(changed)}")
    return checkpoint


def truncate_metrics(path: Path, iteration: int, log) -> None:
    """Keep the metrics.jsonl lines of iterations up to the checkpoint's (a killed run may have written one
    more, and a line torn by the kill is dropped)."""
    entries, torn = read_metrics(path)
    if torn is not None:
        log(f"{path}: dropped its last line, torn by an interrupted write: {torn[:60]!r}...")
    kept = [line for line, record in entries if record["iteration"] <= iteration]
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(k + "\n" for k in kept), encoding="utf-8"))
