"""Per-iteration episode sketches of a run (``ippo train --sketch-dim K``), and TracIn attribution over them
(``ippo attribute``).

With ``--sketch-dim K`` (ppo, grpo, ippo) every RL iteration t writes three files into ``RUN/sketches/``, each
atomically, the sketch file last (an iteration is stored once its sketch file exists):

  iter-<t>.adapter.safetensors  the LoRA adapter in bf16 at the sampling policy, i.e. before iteration t's update
  iter-<t>.json                 {"iteration", "questions": [E], "completions": [E]}: the episodes' texts
  iter-<t>.safetensors          sketches (E, K) float32: each episode's whole-model sketch of the gradient of its
                                actor loss at that policy (ippo: taken in the scoring backward itself; ppo, grpo:
                                one extra backward); rewards (E,) float32; keep (E,) bool; weights (E,) float32
                                (the update's: ippo s_i / mean of the kept s, 0 if dropped; 1 for ppo, grpo); index
                                (E,) int64, the prompt's index in the task's train split; scores (E,) float32, ippo
                                only. Metadata: format, iteration, algo, k, seed, lr, layers (LoRA layers in
                                projection order, ``InfluenceScorer.sketch_layers``), config (the run's options,
                                JSON: its base model, sketch dim and seed, ...)

Measured at the defaults (SmolLM2-135M, LoRA r=16: 4.88M adapter parameters; 16 episodes; K=4096): 9.83 MB of
adapter + 0.27 MB of sketches + 1-3 KB of text = 10.1 MB per iteration, almost all of it the adapter snapshot.

:func:`attribute` scores every stored episode i of iteration t against the SFT loss L_val of a validation set
(TracIn, Pruthi et al. 2020, on sketched gradients; a single term per episode, since each is trained on in one
iteration only):

    a_i = lr_t * w_i * < sketch_i(t), sketch(d L_val / d theta at the iteration-t adapter) >

The update steps theta by about -lr_t w_i g_i for episode i's actor-loss gradient g_i, so L_val changes by about
-lr_t w_i <g_i, d L_val / d theta>: a_i > 0 means the step on episode i lowered L_val (helped), to first order; the
sketch dot product estimates <g_i, d L_val / d theta> without bias. Ignored, as TracIn does: Adam's
preconditioning, gradient clipping, the 1 / minibatch of the mean loss, the epochs x minibatches steps (one step
at the sampling policy stands for them) and grpo's KL term. Dropped episodes (w = 0) get 0. The validation gradient
is taken at the bf16 snapshot, i.e. at the sampling policy's adapter rounded to bf16.

Before any model work :func:`attribute` checks that the stored iterations are the run's: exactly 1..the iteration of
its latest checkpoint (a kill between an iteration's sketch files and its checkpoint leaves files that the resumed
run writes again: refused), each sketch file written with the options of the run's config.json (but those a resume
may change, ``checkpoint.changed_options``) and its lr finite and > 0, each adapter snapshot of its iteration. Sketch
files of format ippo-sketches/1 (before the config was stored) are refused: nothing in them says which base model
they were taken on.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ippo.train.checkpoint import (
    atomic_write,
    changed_options,
    check_dir_path,
    latest_checkpoint,
    load_tensors,
    load_trainable_state,
    read_json,
    trainable_state,
    write_json,
)
from ippo.train.config import Config, build_task, resolve_device, resolve_model_dir, run_config
from ippo.train.tasks import Example, Task, read_gsm8k_jsonl

SKETCH_DIR = "sketches"
FORMAT = "ippo-sketches/2"
OLD_FORMATS = ("ippo-sketches/1",)  # no config: cannot be checked against the run (refused)
_META = ("format", "iteration", "algo", "k", "seed", "lr", "layers", "config")
_SKETCH_FILE = re.compile(r"iter-(\d{6})\.safetensors")
_ITERATION_FILE = re.compile(r"iter-(\d{6})\.(?:safetensors|adapter\.safetensors|json)")
_TEMP_FILE = re.compile(r"\.iter-\d{6}\.(?:safetensors|adapter\.safetensors|json)\.[a-z0-9_]{8}")  # atomic_write's
SPLIT_DATA = ("validation", "eval")


# =========================================================================== the files of one iteration


def iteration_paths(run_dir: str | Path, iteration: int) -> tuple[Path, Path, Path]:
    """(sketch file, adapter snapshot, texts) of ``iteration`` in ``run_dir/sketches``."""
    stem = Path(run_dir) / SKETCH_DIR / f"iter-{iteration:06d}"
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".adapter.safetensors"), \
        stem.with_name(stem.name + ".json")


def write_iteration(run_dir: Path, iteration: int, cfg: Config, buf, sketches: Tensor, scores: Tensor | None,
                    keep: Tensor, weights: Tensor, lm: nn.Module, lr: float) -> None:
    """Store iteration ``iteration``'s episodes (``buf``: the trainer's Buffer, its ``ro`` texts and examples,
    ``rewards`` and ``train_index``), their sketches (E, k), ippo ``scores`` (E,) or None, ``keep`` and
    ``weights`` (E,), and ``lm``'s LoRA adapter now (call it before the update); ``lr`` is the update's."""
    from safetensors.torch import save_file

    from ippo.kernels.scorer import lora_linear_layers

    sketch_path, adapter_path, texts_path = iteration_paths(run_dir, iteration)
    sketch_path.parent.mkdir(exist_ok=True)
    adapter = {name: t.to(torch.bfloat16) for name, t in trainable_state(lm).items()}
    atomic_write(adapter_path, lambda tmp: save_file(adapter, tmp, metadata={"iteration": str(iteration)}))
    write_json(texts_path, {"iteration": iteration, "questions": [ex.question for ex in buf.ro.examples],
                            "completions": list(buf.ro.texts)})
    tensors = {"sketches": sketches.float(), "rewards": buf.rewards.float(), "keep": keep.bool(),
               "weights": weights.float(), "index": buf.train_index.long()}
    if scores is not None:
        tensors["scores"] = scores.float()
    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    meta = {"format": FORMAT, "iteration": str(iteration), "algo": cfg.algo, "k": str(cfg.sketch_dim),
            "seed": str(cfg.sketch_seed), "lr": repr(float(lr)), "layers": json.dumps(list(lora_linear_layers(lm))),
            "config": json.dumps(asdict(cfg))}
    atomic_write(sketch_path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def prune_sketches(run_dir: Path, last_iteration: int) -> list[Path]:
    """Delete the files of iterations after ``last_iteration`` from ``run_dir/sketches``, and the temporary files of
    interrupted writes; returns them. A run resumed from ``last_iteration``'s checkpoint writes them again."""
    directory, removed = Path(run_dir) / SKETCH_DIR, []
    if not directory.is_dir():
        return removed
    for path in sorted(directory.iterdir()):
        match = _ITERATION_FILE.fullmatch(path.name)
        if (match and int(match.group(1)) > last_iteration) or _TEMP_FILE.fullmatch(path.name):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def stored_iterations(run_dir: str | Path) -> list[int]:
    """The iterations of ``run_dir`` with a sketch file, ascending; ValueError if there is none."""
    directory = Path(run_dir) / SKETCH_DIR
    found = sorted(int(m.group(1)) for p in directory.glob("iter-*") if (m := _SKETCH_FILE.fullmatch(p.name)))
    if not found:
        raise ValueError(f"{str(run_dir)!r} holds no sketches ({directory}/iter-*.safetensors): train it with "
                         f"--sketch-dim K (ppo, grpo or ippo) to store them")
    return found


class StoredIteration(NamedTuple):
    """One iteration's stored episodes, checked (:func:`read_iteration`)."""

    iteration: int
    algo: str
    k: int
    seed: int
    lr: float
    layers: list[str]
    tensors: dict[str, Tensor]   # sketches (E, k), rewards, keep, weights, index (E,), scores (E,) for ippo
    questions: list[str]
    completions: list[str]
    path: Path
    adapter_path: Path
    config: dict                 # the options of the run that wrote it


_TENSORS = {"rewards": torch.float32, "keep": torch.bool, "weights": torch.float32, "index": torch.int64,
            "scores": torch.float32}


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return f.metadata() or {}
    except Exception as err:  # SafetensorError (not a ValueError), OSError, ...
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from err


def read_iteration(run_dir: str | Path, iteration: int) -> StoredIteration:
    """Read and check what :func:`write_iteration` stored for ``iteration`` (of the adapter snapshot, only that it
    is there and of this iteration); a missing, partial or malformed file is an error naming it."""
    from safetensors import safe_open

    path, adapter_path, texts_path = iteration_paths(run_dir, iteration)
    for needed, what in ((path, "sketch file"), (texts_path, "texts"), (adapter_path, "adapter snapshot")):
        if not needed.is_file():
            raise FileNotFoundError(f"{needed}: missing {what} of iteration {iteration}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as err:  # SafetensorError (not a ValueError), OSError, ...
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from err
    if meta.get("format") in OLD_FORMATS:
        raise ValueError(f"{path}: written by an older ippo (format {meta['format']}), whose sketch files do not "
                         f"record their run's config: their base model and options cannot be checked against "
                         f"{Path(run_dir) / 'config.json'}; train the run again to attribute it")
    if meta.get("format") != FORMAT or any(key not in meta for key in _META):
        raise ValueError(f"{path}: not an ippo sketch file (metadata keys {sorted(meta)}, expected {list(_META)})")
    try:
        k, seed, lr, layers = int(meta["k"]), int(meta["seed"]), float(meta["lr"]), json.loads(meta["layers"])
        stated, config = int(meta["iteration"]), json.loads(meta["config"])
    except ValueError as err:
        raise ValueError(f"{path}: malformed metadata ({err})") from err
    if stated != iteration or not isinstance(layers, list) or not isinstance(config, dict):
        raise ValueError(f"{path}: metadata says iteration {stated}, layers {type(layers).__name__} and config "
                         f"{type(config).__name__}; expected iteration {iteration}, a list and an object")
    if not (math.isfinite(lr) and lr > 0):  # the update's learning rate scales every attribution
        raise ValueError(f"{path}: lr must be a finite number > 0, got {meta['lr']}")
    snapshot = _metadata(adapter_path).get("iteration")
    if snapshot != str(iteration):
        raise ValueError(f"{adapter_path}: adapter snapshot of iteration {snapshot}, expected {iteration}")
    sketches = tensors.pop("sketches", None)
    if sketches is None or sketches.dtype != torch.float32 or sketches.dim() != 2 or sketches.shape[1] != k:
        raise ValueError(f"{path}: 'sketches' must be a float32 (episodes, {k}) tensor, got "
                         f"{None if sketches is None else (sketches.dtype, tuple(sketches.shape))}")
    n = sketches.shape[0]
    for name, t in tensors.items():
        if name not in _TENSORS or t.dtype != _TENSORS[name] or t.shape != (n,):
            raise ValueError(f"{path}: unexpected tensor {name!r} ({t.dtype}, {tuple(t.shape)}); expected ({n},) "
                             f"of {_TENSORS.get(name, 'none such')}")
    missing = [name for name in _TENSORS if name not in tensors and name != "scores"]
    if missing:
        raise ValueError(f"{path}: missing tensors {missing}")
    for name, t in {"sketches": sketches, **tensors}.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"{path}: {name!r} holds NaN or infinite values")
    texts = read_json(texts_path, required=("iteration", "questions", "completions"))
    for key in ("questions", "completions"):
        value = texts[key]
        if not (isinstance(value, list) and len(value) == n and all(isinstance(s, str) for s in value)):
            raise ValueError(f"{texts_path}: {key!r} must be a list of {n} strings (one per episode)")
    if texts["iteration"] != iteration:
        raise ValueError(f"{texts_path}: iteration {texts['iteration']!r}, expected {iteration}")
    return StoredIteration(iteration, meta["algo"], k, seed, lr, layers, {"sketches": sketches, **tensors},
                           texts["questions"], texts["completions"], path, adapter_path, config)


def read_run_iterations(run_dir: Path, cfg: Config) -> list[StoredIteration]:
    """Every stored iteration of the run in ``run_dir`` (``cfg``: its config.json), checked to be the run's: the
    iterations 1..that of its latest checkpoint, no other and none missing; the same k, seed and layers in each;
    each written with ``cfg``'s options (but those a resume may change) and its sketch options. An error naming
    the first file that is not."""
    found = stored_iterations(run_dir)
    _, latest = latest_checkpoint(run_dir)
    after = [it for it in found if it > latest]
    if after:
        raise ValueError(f"{iteration_paths(run_dir, after[0])[0]}: iteration {after[0]} is after the run's latest "
                         f"checkpoint (iteration {latest}, {run_dir / 'latest.json'}): written by a run killed before "
                         f"that checkpoint; `ippo train --resume` writes it again")
    stored = [read_iteration(run_dir, it) for it in range(1, latest + 1)]  # every RL iteration stores its episodes
    first = stored[0]
    for s in stored[1:]:
        for what in ("k", "seed", "layers"):
            if getattr(s, what) != getattr(first, what):
                raise ValueError(f"{s.path}: sketch {what} {getattr(s, what)!r} differs from {first.path}'s "
                                 f"{getattr(first, what)!r}; the iterations of a run must share k, seed and layers")
    for s in stored:
        changed = changed_options(cfg, s.config)
        if changed:
            diff = "; ".join(f"{k} {mine!r} (the run's {theirs!r})" for k, (mine, theirs) in changed.items())
            raise ValueError(f"{s.path}: not this run's: written with options other than those of "
                             f"{run_dir / 'config.json'}: {diff}")
        for what, mine, theirs in (("algo", s.algo, cfg.algo), ("k", s.k, cfg.sketch_dim),
                                   ("seed", s.seed, cfg.sketch_seed)):
            if mine != theirs:
                raise ValueError(f"{s.path}: sketch {what} {mine!r}, but the run's config.json says {theirs!r}")
    return stored


# =========================================================================== attribution


def validation_examples(task: Task, data: str, size: int | None) -> list[Example]:
    """The first ``size`` (default all) examples of ``data``: a GSM8K-format jsonl, or 'validation' / 'eval' for
    ``task``'s split."""
    if size is not None and size < 1:
        raise ValueError(f"--val-size must be >= 1, got {size}")
    examples = task.split(data) if data in SPLIT_DATA else read_gsm8k_jsonl(data)
    if not examples:
        raise ValueError(f"--data {data!r}: no example")
    return examples[:size]


def attribute(run_dir: str | Path, data: str, out: str | Path | None = None, val_size: int | None = None,
              val_batch: int | None = None, progress: bool = True, model_and_tokenizer=None, top: int = 10) -> dict:
    """TracIn attribution (module docstring) of every stored episode of ``run_dir`` to the SFT loss of ``data``.

    ``data``: a GSM8K-format jsonl (question, answer lines) or 'validation' / 'eval', the run task's split;
    ``val_size``: its first N examples (default all); ``val_batch``: examples per forward+backward (default the
    run's ``--val-batch``). Per stored iteration: the adapter snapshot is loaded, the validation gradient taken
    (one forward+backward over the examples) and sketched like the episodes. Writes attribution.json (every
    episode), attribution.md (per-iteration totals, the ``top`` highest and lowest kept episodes, with texts) and
    attribution.png into ``out`` (default RUN/attribution); returns the JSON's content plus ``"report"`` (the
    markdown path). Every stored file is checked before any model work.
    """
    from tqdm.auto import tqdm

    from ippo.kernels import sketch_gradients
    from ippo.kernels.scorer import lora_linear_layers
    from ippo.train.model import add_lora, load_causal_lm
    from ippo.train.policy import validation_gradient

    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    out = run_dir / "attribution" if out is None else Path(out)
    check_dir_path(out, "--out")
    stored = read_run_iterations(run_dir, cfg)
    first = stored[0]
    val_batch = cfg.val_batch if val_batch is None else val_batch
    if val_batch < 1:
        raise ValueError(f"--val-batch must be >= 1, got {val_batch}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    task = build_task(cfg)
    examples = validation_examples(task, data, val_size)
    base, tokenizer = model_and_tokenizer or load_causal_lm(resolve_model_dir(cfg))
    lm = add_lora(base, r=cfg.lora_r, alpha=cfg.lora_alpha).to(resolve_device(cfg))
    if list(lora_linear_layers(lm)) != first.layers:
        raise ValueError(f"{first.path}: its LoRA layers ({len(first.layers)}) are not the model's "
                         f"({len(lora_linear_layers(lm))}) in the same order")

    episodes, iterations = [], []
    for s in tqdm(stored, desc="attribute", disable=not progress):
        load_trainable_state(lm, load_tensors(s.adapter_path), source=s.adapter_path)
        val = validation_gradient(lm, tokenizer, task, examples, val_batch)
        dots = s.tensors["sketches"].double() @ sketch_gradients(val, s.k, s.seed, model=lm).double().cpu()
        values = s.lr * s.tensors["weights"].double() * dots
        scores = s.tensors.get("scores")
        for i in range(len(dots)):
            episodes.append({"iteration": s.iteration, "episode": i, "index": int(s.tensors["index"][i]),
                             "reward": float(s.tensors["rewards"][i]),
                             "score": None if scores is None else float(scores[i]),
                             "kept": bool(s.tensors["keep"][i]), "weight": float(s.tensors["weights"][i]),
                             "dot": float(dots[i]), "attribution": float(values[i]), "question": s.questions[i],
                             "text": s.completions[i]})
        iterations.append({"iteration": s.iteration, "lr": s.lr, "episodes": len(dots),
                           "kept": int(s.tensors["keep"].sum()), "total": float(values.sum())})
    result = {"run": str(run_dir), "data": data, "val_examples": len(examples), "algo": first.algo, "k": first.k,
              "seed": first.seed, "total": sum(it["total"] for it in iterations),
              "sign": "attribution > 0: the step on the episode lowered the validation loss (to first order)",
              "iterations": iterations, "episodes": episodes}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "attribution.json", result)
    result["report"] = write_attribution_report(result, out, top)
    return result


# =========================================================================== report


def write_attribution_report(result: dict, out: Path, top: int = 10) -> Path:
    """attribution.md (totals per iteration, the ``top`` highest and lowest kept episodes with their texts) and
    attribution.png (totals per iteration, the distribution over episodes) in ``out``; returns the markdown path."""
    kept = sorted((e for e in result["episodes"] if e["kept"]), key=lambda e: e["attribution"], reverse=True)
    highest = kept[:top]
    lowest = kept[::-1][:min(top, len(kept) - len(highest))]
    lines = [f"# Attribution of `{result['run']}` to the SFT loss of `{result['data']}`", "",
             f"TracIn over {len(result['iterations'])} stored iterations of {result['algo']} (sketch k = "
             f"{result['k']}, seed {result['seed']}), {result['val_examples']} validation examples. Attribution of "
             "an episode = lr x its update weight x < its gradient sketch, the sketch of the validation loss's "
             "gradient at that iteration's adapter >: positive = the step on it lowered the validation loss, to "
             "first order (Adam, clipping and the minibatch steps ignored; dropped episodes get 0). "
             f"Sum over all episodes: {result['total']:.4g}.", "",
             "| iteration | lr | episodes | kept | total |", "|---|---|---|---|---|"]
    lines += [f"| {it['iteration']} | {it['lr']:.3g} | {it['episodes']} | {it['kept']} | {it['total']:.4g} |"
              for it in result["iterations"]]
    lines += ["", "![attribution](attribution.png)"]
    for title, chosen in ((f"Top {len(highest)} kept episodes: lowered the validation loss most", highest),
                          (f"Bottom {len(lowest)} kept episodes: raised it most", lowest)):
        lines += ["", f"## {title}"]
        for e in chosen:
            score = "" if e["score"] is None else f", score {e['score']:.3g}"
            lines += ["", f"**{e['attribution']:.4g}**: iteration {e['iteration']}, episode {e['episode']} (train "
                      f"index {e['index']}), reward {e['reward']:g}{score}, {'kept' if e['kept'] else 'dropped'}",
                      "", f"> {e['question']}", "", "````text", e["text"], "````"]
    _plot(result, out / "attribution.png")
    md = out / "attribution.md"
    atomic_write(md, lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n", encoding="utf-8"))
    return md


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.bar([it["iteration"] for it in result["iterations"]], [it["total"] for it in result["iterations"]])
    left.axhline(0, color="k", lw=0.6)
    left.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True, min_n_ticks=1))
    left.set(xlabel="iteration", ylabel="sum of attributions", title="per iteration (> 0: lowered val loss)")
    right.hist([e["attribution"] for e in result["episodes"] if e["kept"]], bins=30)
    right.set(xlabel="attribution", ylabel="episodes", title="kept episodes")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
