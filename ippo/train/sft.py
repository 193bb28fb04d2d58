"""The SFT warm start: LoRA steps on gold solutions before RL, cached by a hash of every option that determines it.

A cache entry is ``<cache>/sft/<hash>/`` holding ``info.json`` and ``adapter.safetensors`` (written last, so
its presence marks a finished entry). An entry that cannot be used (a file missing, corrupt, or not filling
every LoRA tensor with finite values of the right shape) is reported and rebuilt. A killed warm start goes on
from its own checkpoint in ``<hash>/partial/``, every ``SFT_CHECKPOINT_EVERY`` steps.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import time
from pathlib import Path

import torch
from torch import nn

from ippo.train.checkpoint import (
    atomic_write,
    load_checkpoint,
    load_tensors,
    load_trainable_state,
    read_json,
    remove_stale_temp_files,
    save_checkpoint,
    trainable_state,
    write_json,
)
from ippo.train.config import Config
from ippo.train.model import cache_root
from ippo.train.policy import fork_rng, sft_loss
from ippo.train.tasks import Task

SFT_CHECKPOINT_EVERY = 5  # warm-start steps between checkpoints (a killed warm start loses at most these)
SFT_KEYS = ("model", "task", "data", "arith_steps", "arith_digits", "arith_sizes", "short_prompt", "seed", "lora_r",
            "lora_alpha", "sft_steps", "sft_batch", "sft_lr")
STALE_TEMP_AGE_S = 3600  # the cache is shared by concurrent runs: only older temporary files are another's leftovers


def sft_cache_dir(cfg: Config, model_dir: Path) -> Path:
    """Where the warm-start adapter for this config lives: a hash of every option that determines it."""
    keys = SFT_KEYS + (("gsm8k_val_size",) if cfg.task == "gsm8k" else ())
    key = {k: getattr(cfg, k) for k in keys} | {"model": str(Path(model_dir).resolve())}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cfg.cache_dir).expanduser() / "sft" / digest if cfg.cache_dir else cache_root() / "sft" / digest


def load_cached(lm: nn.Module, cache: Path, log=print) -> dict | None:
    """The info of the finished warm start in ``cache``, its adapter loaded into ``lm``; None if there is none,
    or if the entry is unusable (then ``lm`` is unchanged, the reason logged and the adapter removed)."""
    adapter, info_path = cache / "adapter.safetensors", cache / "info.json"
    if not adapter.exists():
        return None
    try:
        info = read_json(info_path)
        if not isinstance(info, dict):
            raise ValueError(f"{info_path}: expected a JSON object, got {type(info).__name__}")
        load_trainable_state(lm, load_tensors(adapter), source=adapter)
    except (ValueError, FileNotFoundError) as err:
        log(f"SFT warm start: the cache entry {cache} is unusable, rebuilding it: {err}")
        adapter.unlink(missing_ok=True)
        return None
    log(f"SFT warm start: reusing {cache}")
    return info


def sft_warm_start(lm: nn.Module, tokenizer, task: Task, cfg: Config, model_dir: Path, log=print,
                   progress: bool = True) -> dict:
    """Train the LoRA on gold solutions for ``sft_steps`` steps, or load the cached result of the same config."""
    from safetensors.torch import save_file

    cache = sft_cache_dir(cfg, model_dir)
    partial, no_head = cache / "partial", nn.Module()  # the warm start's own checkpoint (no value head yet)
    for directory in (cache, partial):
        remove_stale_temp_files(directory, min_age_s=STALE_TEMP_AGE_S)
    info = load_cached(lm, cache, log)
    if info is not None:
        return info | {"cached": True}
    if cfg.sft_steps == 0:
        return {"steps": 0, "cached": False}
    from tqdm.auto import tqdm

    params = [p for p in lm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.sft_lr, weight_decay=0.0)
    rng = random.Random(f"sft:{cfg.seed}")
    train = task.split("train")
    losses, done, start = [], 0, time.perf_counter()
    lm.train()
    with fork_rng():
        torch.manual_seed(cfg.seed)
        if (partial / "latest.json").is_file():  # a killed warm start goes on from its last checkpoint
            try:
                meta = load_checkpoint(partial, lm, no_head, opt, rng, required=("losses",))
            except (ValueError, FileNotFoundError) as err:  # nothing was restored: start over
                log(f"SFT warm start: its checkpoint is unusable, starting over: {err}")
                shutil.rmtree(partial, ignore_errors=True)
            else:
                done, losses = meta["iteration"], meta["losses"]
                log(f"SFT warm start: resuming at step {done} from {partial}")
        for step in tqdm(range(done + 1, cfg.sft_steps + 1), desc="SFT warm start", disable=not progress,
                         initial=done, total=cfg.sft_steps):
            loss = sft_loss(lm, tokenizer, task, rng.sample(train, min(cfg.sft_batch, len(train))))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            losses.append(loss.item())
            if step % SFT_CHECKPOINT_EVERY == 0 and step < cfg.sft_steps:
                partial.mkdir(parents=True, exist_ok=True)
                save_checkpoint(partial, step, lm, no_head, opt, rng, {"losses": losses})
    info = {"steps": cfg.sft_steps, "final_loss": sum(losses[-5:]) / len(losses[-5:]),
            "seconds": time.perf_counter() - start, "config": {k: getattr(cfg, k) for k in SFT_KEYS}}
    cache.mkdir(parents=True, exist_ok=True)
    write_json(cache / "info.json", info)
    atomic_write(cache / "adapter.safetensors", lambda tmp: save_file(trainable_state(lm), tmp))
    shutil.rmtree(partial, ignore_errors=True)
    log(f"SFT warm start: {cfg.sft_steps} steps, loss {info['final_loss']:.3f}, {info['seconds']:.0f}s, "
        f"cached in {cache}")
    return info | {"cached": False}
