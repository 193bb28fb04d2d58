"""The whole trainer in one file, top to bottom: SFT warm start, then SFT / PPO / GRPO / I-PPO iterations.

Read it in order:
  1. Config                       every knob, with the defaults used by ``ippo train``
  2. Batches and forwards         prompt/answer packing, SFT loss, sampling, per-token log-probs and values
  3. Rewards and evaluation       checker-safe rewards; accuracy, majority vote, pass@k, unfaithful rate
  4. Checkpoints                  safetensors + JSON, atomic (temp file + os.replace), exact resume
  5. SFT warm start               cached by a hash of everything that determines it
  6. train()                      the loop; the algorithms share everything but the marked parts

One iteration of ppo / grpo / ippo:
  rollout    k samples per prompt; reward = binary correctness; per-token log-probs of the policy, of the
             reference (adapter disabled) and values (head on detached hidden states)
  advantage  ppo/ippo: reward - kl_coef * KL(policy||ref) per token, GAE, whitening;  grpo: group-normalized
  [ippo]     validation gradient = grad of the SFT loss of val_size (question, gold solution) pairs;
             one backward of sum_i actor_loss_i inside InfluenceScorer gives every score s_i;
             keep s_i > tol, weight survivors by s_i / mean(kept s); none kept -> stop training
  update     epochs x minibatches: clipped surrogate (weighted per episode) + clipped value loss,
             grad-norm clipping; approx-KL and clip fraction logged
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from ippo.train import ppo_math as pm
from ippo.train.model import add_lora, cache_root, default_model_dir, load_causal_lm
from ippo.train.tasks import Example, Task, extract_final_answer, make_task

ALGOS = ("sft", "ppo", "grpo", "ippo")
SHORT_PROMPT = "Solve step by step, one equation per line. End with '#### <answer>'."


# =========================================================================== 1. config


@dataclass
class Config:
    """Every option of a run (``ippo train --help`` explains each one)."""

    algo: str = "ippo"                 # sft | ppo | grpo | ippo
    model: str = "default"             # local HF directory (safetensors), or "default" = SmolLM2-135M-Instruct
    task: str = "arith"                # arith | gsm8k
    data: str | None = None            # gsm8k: user train jsonl (default: bundled GSM8K train)
    eval_data: str | None = None       # gsm8k: eval jsonl (GSM8K has no bundled eval split)
    gsm8k_val_size: int = 1000         # gsm8k: validation problems held out of train
    arith_steps: int = 2               # arith: operations per problem
    arith_digits: int = 1              # arith: digits per operand
    arith_sizes: str = "5000,500,500"  # arith: train,validation,eval problem counts
    short_prompt: bool = True          # a one-line system prompt (fewer tokens per episode on CPU)
    seed: int = 0
    # LoRA
    lora_r: int = 16
    lora_alpha: float = 32.0
    # SFT warm start (cached) and the sft algorithm
    sft_steps: int = 40
    sft_batch: int = 16
    sft_lr: float = 1e-3
    # RL
    iterations: int = 12
    prompts_per_iter: int = 2
    samples_per_prompt: int = 8
    temperature: float = 0.6
    max_new_tokens: int = 40
    epochs: int = 2
    minibatch: int = 8
    lr: float = 1e-4
    value_lr: float = 1e-3
    clip: float = 0.2
    vf_clip: float = 0.2
    vf_coef: float = 0.5
    kl_coef: float = 1e-4
    gamma: float = 1.0
    lam: float = 1.0
    whiten: bool = True
    max_grad_norm: float = 1.0
    # I-PPO
    val_size: int = 16
    tol: float = 0.0
    # evaluation
    eval_size: int = 32
    eval_k: int = 4
    eval_temperature: float = 0.6
    eval_every: int = 4
    # bookkeeping
    gen_batch: int = 64
    device: str = "auto"               # auto (cuda if available, else cpu) | cpu | cuda | cuda:N
    threads: int = 0                   # torch threads (0 = torch default)
    log_episodes: int = 2              # top and bottom episodes (with text) logged per iteration
    cache_dir: str | None = None       # SFT warm-start cache (default $IPPO_CACHE or ~/.cache/ippo)

    def validate(self) -> None:
        """Raise ValueError naming the first bad option."""
        if self.algo not in ALGOS:
            raise ValueError(f"algo must be one of {ALGOS}, got {self.algo!r}")
        positive = ["lora_r", "sft_batch", "prompts_per_iter", "samples_per_prompt", "max_new_tokens", "epochs",
                    "minibatch", "val_size", "eval_size", "eval_k", "eval_every", "gen_batch", "arith_steps",
                    "arith_digits"]
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ["sft_steps", "iterations", "kl_coef", "tol", "threads", "log_episodes", "temperature",
                     "eval_temperature", "vf_coef"]:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ["lr", "value_lr", "sft_lr", "clip", "vf_clip", "max_grad_norm", "lora_alpha"]:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ValueError("gamma and lam must be in [0, 1]")
        if self.algo == "grpo" and self.samples_per_prompt < 2:
            raise ValueError("grpo needs samples_per_prompt >= 2 (group-normalized advantages)")


def build_task(cfg: Config) -> Task:
    """The task of ``cfg``; its splits are checked to be non-empty."""
    if cfg.task == "arith":
        task = make_task("arith", n_steps=cfg.arith_steps, digits=cfg.arith_digits, seed=cfg.seed,
                         sizes=tuple(int(x) for x in cfg.arith_sizes.split(",")))
    elif cfg.task == "gsm8k":
        task = make_task("gsm8k", train_path=cfg.data, eval_path=cfg.eval_data, val_size=cfg.gsm8k_val_size,
                         seed=cfg.seed)
    else:
        task = make_task(cfg.task)  # raises a clear ValueError listing the tasks
    if cfg.short_prompt:
        task.system_prompt = SHORT_PROMPT
    for split in ("train", "validation", "eval"):
        if not task.split(split):
            raise ValueError(f"task {cfg.task!r}: the {split} split is empty")
    return task


def resolve_device(cfg: Config) -> torch.device:
    """The device of the run: ``cfg.device``, where ``auto`` is cuda when available, else cpu."""
    name = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N; got {cfg.device!r}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {cfg.device!r}: no CUDA device is available here")
    return device


def _fork_rng():
    """Fork the CPU generator and, on a GPU machine, the current CUDA one (sampling there draws from it)."""
    return torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else [])


def resolve_model_dir(cfg: Config) -> Path:
    return default_model_dir() if cfg.model == "default" else Path(cfg.model).expanduser()


# =========================================================================== 2. batches and forwards


def lm_forward(lm: nn.Module, ids: Tensor, attn: Tensor, **kwargs):
    """Forward with position ids from the attention mask, so left- and right-padded rows see 0, 1, 2, ..."""
    positions = (attn.long().cumsum(-1) - 1).clamp(min=0)
    return lm(input_ids=ids, attention_mask=attn, position_ids=positions, **kwargs)


def pack_answers(tokenizer, task: Task, examples: list[Example]) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded ``prompt + gold answer + eos``: ids (B, T), attention (B, T), answer mask (B, T-1).

    ``answer_mask[b, t]`` is 1 where logits position t predicts an answer (or eos) token.
    """
    rows = []
    for ex in examples:
        prompt = tokenizer(task.prompt(ex, tokenizer), add_special_tokens=False).input_ids
        answer = tokenizer(ex.answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        rows.append((prompt, answer))
    width = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    answer_mask = torch.zeros(len(rows), width - 1)
    for b, (prompt, answer) in enumerate(rows):
        n = len(prompt) + len(answer)
        ids[b, :n] = torch.tensor(prompt + answer)
        attn[b, :n] = 1
        answer_mask[b, len(prompt) - 1:n - 1] = 1
    return ids, attn, answer_mask


def sft_loss(lm: nn.Module, tokenizer, task: Task, examples: list[Example]) -> Tensor:
    """Mean token cross-entropy of the gold solutions (all answer tokens pooled): the SFT and validation loss."""
    device = next(lm.parameters()).device
    ids, attn, answer_mask = (t.to(device) for t in pack_answers(tokenizer, task, examples))
    first = int(answer_mask.argmax(1).min())  # logits only from the first answer position on (saves lm_head work)
    logits = lm_forward(lm, ids, attn, logits_to_keep=ids.shape[1] - first).logits[:, :-1]
    logp = pm.token_logprobs(logits, ids[:, first + 1:])
    return -pm.masked_mean(logp, answer_mask[:, first:])


@dataclass
class Rollout:
    """A batch of sampled episodes, prompts left-padded to ``prompt_len`` so responses start at one column."""

    ids: Tensor            # (B, P + R) prompt + response tokens
    attn: Tensor           # (B, P + R) 1 on real prompt tokens and on response tokens up to and incl. eos
    mask: Tensor           # (B, R) float, right-padded response mask
    prompt_len: int
    texts: list[str]       # decoded responses
    examples: list[Example]
    group: Tensor          # (B,) prompt index of each episode


@torch.no_grad()
def sample(lm: nn.Module, tokenizer, task: Task, examples: list[Example], k: int, temperature: float,
           max_new_tokens: int, gen_batch: int) -> Rollout:
    """``k`` completions per example (temperature 0 = greedy), generated ``gen_batch`` rows at a time."""
    episodes = [(i, ex) for i, ex in enumerate(examples) for _ in range(k)]
    prompts = tokenizer([task.prompt(ex, tokenizer) for _, ex in episodes], add_special_tokens=False,
                        padding=True, padding_side="left", return_tensors="pt").to(next(lm.parameters()).device)
    was_training = lm.training
    lm.eval()
    chunks = []
    for start in range(0, len(episodes), gen_batch):
        sl = slice(start, start + gen_batch)
        kwargs = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else \
            dict(do_sample=False)
        out = lm.generate(input_ids=prompts.input_ids[sl], attention_mask=prompts.attention_mask[sl],
                          max_new_tokens=max_new_tokens, min_new_tokens=1, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, **kwargs)
        chunks.append(out[:, prompts.input_ids.shape[1]:])
    lm.train(was_training)
    width = max(c.shape[1] for c in chunks)
    response = torch.cat([nn.functional.pad(c, (0, width - c.shape[1]), value=tokenizer.pad_token_id)
                          for c in chunks])
    is_eos = (response == tokenizer.eos_token_id).long()
    mask = ((is_eos.cumsum(1) - is_eos) == 0).float()  # tokens up to and including the first eos
    texts = [tokenizer.decode(r[m.bool()], skip_special_tokens=True, clean_up_tokenization_spaces=False)
             for r, m in zip(response, mask)]
    ids = torch.cat([prompts.input_ids, response], 1)
    attn = torch.cat([prompts.attention_mask, mask.long()], 1)
    group = torch.tensor([i for i, _ in episodes], device=ids.device)
    return Rollout(ids, attn, mask, prompts.input_ids.shape[1], texts, [ex for _, ex in episodes], group)


def response_logprobs(lm: nn.Module, ro: Rollout, rows: Tensor | slice = slice(None),
                      value_head: nn.Module | None = None, temperature: float = 1.0) -> tuple[Tensor, Tensor | None]:
    """Per-token log-probs (B, R) of the response tokens, and values (B, R) if ``value_head`` is given.

    Log-probs are those of the sampling policy: logits divided by ``temperature`` (the rollout's), so
    the PPO ratio and policy gradient are taken for the policy that generated the episodes.

    The value of token j is read at the position that predicts it (the state before it); the head sees
    detached hidden states, so the value loss never reaches the LoRA weights.
    """
    ids, attn = ro.ids[rows], ro.attn[rows]
    width = ids.shape[1] - ro.prompt_len
    out = lm_forward(lm, ids, attn, output_hidden_states=value_head is not None, logits_to_keep=width + 1)
    logits = out.logits[:, :-1]
    logp = pm.token_logprobs(logits / temperature if temperature > 0 else logits, ids[:, ro.prompt_len:])
    values = None
    if value_head is not None:
        hidden = out.hidden_states[-1][:, ro.prompt_len - 1:-1].detach()
        values = value_head(hidden.to(value_head.weight.dtype)).squeeze(-1).float()
    return logp, values


# =========================================================================== 3. rewards and evaluation


def safe_check(task: Task, completion: str, example: Example, errors: Counter) -> bool:
    """``task.check_answer``; a checker exception counts as a wrong answer (reward 0) and is counted."""
    try:
        return bool(task.check_answer(completion, example))
    except Exception:  # a user checker bug must not kill a long run
        errors["check_answer"] += 1
        return False


def safe_steps(task: Task, completion: str, errors: Counter) -> tuple[int, int]:
    try:
        return task.check_steps(completion)
    except Exception:
        errors["check_steps"] += 1
        return 1, 1


@torch.no_grad()
def evaluate(lm: nn.Module, tokenizer, task: Task, cfg: Config, seed: int) -> dict:
    """Metrics on the first ``eval_size`` eval problems, ``eval_k`` samples each, with a fixed sampling seed.

    accuracy: mean correctness over all samples; majority: the most common final answer is right;
    pass_at_k: at least one sample is right; unfaithful: share of correct samples with >= 1 wrong step;
    faithful_accuracy: share of samples that are correct with every step right.
    """
    examples = task.split("eval")[:cfg.eval_size]
    errors: Counter = Counter()
    with _fork_rng():
        torch.manual_seed(seed)
        ro = sample(lm, tokenizer, task, examples, cfg.eval_k, cfg.eval_temperature, cfg.max_new_tokens,
                    cfg.gen_batch)
    correct = [safe_check(task, t, ex, errors) for t, ex in zip(ro.texts, ro.examples)]
    wrong_steps = [safe_steps(task, t, errors)[1] > 0 for t in ro.texts]
    by_question = [range(i * cfg.eval_k, (i + 1) * cfg.eval_k) for i in range(len(examples))]
    majority = []
    for ex, rows in zip(examples, by_question):
        answers = Counter(a for a in (_final(ro.texts[r]) for r in rows) if a is not None)
        majority.append(bool(answers) and answers.most_common(1)[0][0] == _final(ex.answer))
    n_correct = sum(correct)
    unfaithful = sum(c and w for c, w in zip(correct, wrong_steps))
    return {"accuracy": n_correct / len(correct),
            "majority": sum(majority) / len(examples),
            "pass_at_k": sum(any(correct[r] for r in rows) for rows in by_question) / len(examples),
            "unfaithful": unfaithful / n_correct if n_correct else 0.0,
            "faithful_accuracy": (n_correct - unfaithful) / len(correct),
            "mean_len": float(ro.mask.sum(1).mean()), "n_questions": len(examples), "k": cfg.eval_k,
            "checker_errors": sum(errors.values()), "sample": ro.texts[0][:300]}


def _final(text: str):
    try:
        return extract_final_answer(text)
    except Exception:
        return None


# =========================================================================== 4. checkpoints


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
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


def write_json(path: Path, obj) -> None:
    _atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1), encoding="utf-8"))


def trainable_state(lm: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in lm.named_parameters() if p.requires_grad}


def load_trainable_state(lm: nn.Module, tensors: dict[str, Tensor], prefix: str = "") -> None:
    """Copy the tensors named ``prefix + parameter name`` (as ``trainable_state`` wrote them) into ``lm``."""
    params = dict(lm.named_parameters())
    with torch.no_grad():
        for key, t in tensors.items():
            if key.startswith(prefix):
                params[key[len(prefix):]].copy_(t)


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
    _atomic_write(run_dir / f"{name}.safetensors", lambda tmp: save_file(tensors, tmp))
    meta = {"iteration": iteration, "param_groups": opt_state["param_groups"],
            "opt_keys": {str(i): sorted(s) for i, s in opt_state["state"].items()},
            "python_rng": _rng_to_json(rng.getstate()), **extra}
    write_json(run_dir / f"{name}.json", meta)
    write_json(run_dir / "latest.json", {"checkpoint": name, "iteration": iteration})
    for old in run_dir.glob("ckpt-*"):  # keep only the newest checkpoint
        if not old.name.startswith(name):
            old.unlink(missing_ok=True)


def load_checkpoint(run_dir: Path, lm: nn.Module, value_head: nn.Module, opt: torch.optim.Optimizer,
                    rng: random.Random) -> dict:
    """Restore everything ``save_checkpoint`` wrote; returns its JSON metadata."""
    from safetensors.torch import load_file

    latest = json.loads((run_dir / "latest.json").read_text())
    meta = json.loads((run_dir / f"{latest['checkpoint']}.json").read_text())
    tensors = load_file(run_dir / f"{latest['checkpoint']}.safetensors")
    load_trainable_state(lm, tensors, "lora/")
    value_head.load_state_dict({k[11:]: t for k, t in tensors.items() if k.startswith("value_head/")})
    state = {int(i): {key: tensors[f"opt/{i}/{key}"] for key in keys} for i, keys in meta["opt_keys"].items()}
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.random.set_rng_state(tensors["rng/torch"])
    if "rng/cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng/cuda"])
    rng.setstate(_rng_from_json(meta["python_rng"]))
    return meta


def _rng_to_json(state):
    return [state[0], list(state[1]), state[2]]


def _rng_from_json(state):
    return (state[0], tuple(state[1]), state[2])


# =========================================================================== 5. SFT warm start (cached)


SFT_CHECKPOINT_EVERY = 5  # warm-start steps between checkpoints (a killed warm start loses at most these)
SFT_KEYS = ("model", "task", "data", "arith_steps", "arith_digits", "arith_sizes", "short_prompt", "seed", "lora_r", "lora_alpha", "sft_steps",
            "sft_batch", "sft_lr")


def sft_cache_dir(cfg: Config, model_dir: Path) -> Path:
    """Where the warm-start adapter for this config lives: a hash of every option that determines it."""
    keys = SFT_KEYS + (("gsm8k_val_size",) if cfg.task == "gsm8k" else ())
    key = {k: getattr(cfg, k) for k in keys} | {"model": str(Path(model_dir).resolve())}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cfg.cache_dir).expanduser() / "sft" / digest if cfg.cache_dir else cache_root() / "sft" / digest


def sft_warm_start(lm: nn.Module, tokenizer, task: Task, cfg: Config, model_dir: Path, log=print,
                   progress: bool = True) -> dict:
    """Train the LoRA on gold solutions for ``sft_steps`` steps, or load the cached result of the same config."""
    from safetensors.torch import load_file, save_file

    cache = sft_cache_dir(cfg, model_dir)
    if (cache / "adapter.safetensors").is_file():
        load_trainable_state(lm, load_file(cache / "adapter.safetensors"))
        log(f"SFT warm start: reusing {cache}")
        return json.loads((cache / "info.json").read_text()) | {"cached": True}
    if cfg.sft_steps == 0:
        return {"steps": 0, "cached": False}
    from tqdm.auto import tqdm

    params = [p for p in lm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.sft_lr, weight_decay=0.0)
    rng = random.Random(f"sft:{cfg.seed}")
    train = task.split("train")
    partial, no_head = cache / "partial", nn.Module()  # the warm start's own checkpoint (no value head yet)
    losses, done, start = [], 0, time.perf_counter()
    lm.train()
    with _fork_rng():
        torch.manual_seed(cfg.seed)
        if (partial / "latest.json").is_file():  # a killed warm start goes on from its last checkpoint
            meta = load_checkpoint(partial, lm, no_head, opt, rng)
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
    _atomic_write(cache / "adapter.safetensors", lambda tmp: save_file(trainable_state(lm), tmp))
    shutil.rmtree(partial, ignore_errors=True)
    log(f"SFT warm start: {cfg.sft_steps} steps, loss {info['final_loss']:.3f}, {info['seconds']:.0f}s, cached in {cache}")
    return info | {"cached": False}


# =========================================================================== 6. the loop


def score_episodes(lm: nn.Module, tokenizer, task: Task, cfg: Config, ro: Rollout, old_logp: Tensor,
                   advantages: Tensor, val_examples: list[Example], timing: dict) -> Tensor:
    """I-PPO influence scores (E,): <d actor_loss_i / d theta, d L_val / d theta> for every episode at once."""
    from ippo.kernels import InfluenceScorer, validation_gradients

    t0 = time.perf_counter()
    val = validation_gradients(lm, sft_loss(lm, tokenizer, task, val_examples))
    t1 = time.perf_counter()
    segments = torch.arange(len(ro.texts), device=ro.ids.device)[:, None].expand_as(ro.ids).masked_fill(ro.attn == 0, -1)
    with InfluenceScorer(lm, val, segments.contiguous(), len(ro.texts)) as scorer:
        logp, _ = response_logprobs(lm, ro, temperature=cfg.temperature)
        per_episode, _ = pm.policy_loss(logp, old_logp, advantages, ro.mask, cfg.clip)
        per_episode.sum().backward()  # the sum of per-episode actor losses: one backward scores them all
    lm.zero_grad(set_to_none=True)
    timing["val_grad"] += t1 - t0
    timing["scoring"] += time.perf_counter() - t1
    return scorer.scores.detach().float()


def _histogram(x: Tensor, bins: int = 10) -> dict:
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        hi = lo + 1e-12
    counts = torch.histc(x.double(), bins=bins, min=lo, max=hi)
    return {"edges": [lo + (hi - lo) * i / bins for i in range(bins + 1)], "counts": [int(c) for c in counts]}


def _episodes_log(ro: Rollout, rewards: Tensor, key: Tensor, n: int) -> tuple[list, list]:
    order = torch.argsort(key, descending=True, stable=True).tolist()
    show = lambda i: {"key": float(key[i]), "reward": float(rewards[i]), "question": ro.examples[i].question,
                      "completion": ro.texts[i][:400]}
    return [show(i) for i in order[:n]], [show(i) for i in order[::-1][:n]]


def train(cfg: Config, run_dir: str | Path, resume: bool = False, progress: bool = True, log=print,
          model_and_tokenizer=None) -> dict:
    """Run ``cfg`` into ``run_dir`` (config.json, metrics.jsonl, checkpoints); returns the final eval metrics.

    ``resume=True`` continues from the newest checkpoint of ``run_dir``: LoRA, value head, optimizer and
    RNG states are restored, so the continuation equals an uninterrupted run. ``model_and_tokenizer``
    (tests) skips loading ``cfg.model``.
    """
    from tqdm.auto import tqdm

    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.jsonl"
    if resume:
        if not (run_dir / "latest.json").is_file():
            raise FileNotFoundError(f"--resume: {str(run_dir)!r} holds no checkpoint (latest.json)")
        saved = json.loads((run_dir / "config.json").read_text())
        changed = {k for k, v in saved.items() if k not in ("iterations", "threads", "device") and getattr(cfg, k, v) != v}
        if changed:
            raise ValueError(f"--resume: options differ from the run's config.json: {sorted(changed)}")
    elif (run_dir / "latest.json").is_file():
        raise FileExistsError(f"{str(run_dir)!r} already holds a run; pass --resume to continue it or pick "
                              f"another --out")

    # ---- data and model (all failures here happen before any work is done)
    task = build_task(cfg)
    if model_and_tokenizer is None:
        model_dir = resolve_model_dir(cfg)
        base, tokenizer = load_causal_lm(model_dir)
    else:
        (base, tokenizer), model_dir = model_and_tokenizer, Path(cfg.model)
    device = resolve_device(cfg)
    torch.manual_seed(cfg.seed)
    lm = add_lora(base, r=cfg.lora_r, alpha=cfg.lora_alpha).to(device)
    value_head = nn.Linear(base.config.hidden_size, 1, device=device)
    nn.init.zeros_(value_head.weight)
    nn.init.zeros_(value_head.bias)
    run_dir.mkdir(parents=True, exist_ok=True)
    base_eval = None
    if not resume and cfg.sft_steps:  # the true starting point, before the warm start (LoRA B = 0: the base
        # model); without a warm start it is the iteration-0 eval itself
        t0 = time.perf_counter()
        base_eval = evaluate(lm, tokenizer, task, cfg, seed=cfg.seed + 10_000)
        log(f"base model (before the SFT warm start): eval accuracy {base_eval['accuracy']:.3f}, "
            f"majority {base_eval['majority']:.3f} ({time.perf_counter() - t0:.0f}s)")
    sft_info = sft_warm_start(lm, tokenizer, task, cfg, model_dir, log, progress)
    lora_params = [p for p in lm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": lora_params, "lr": cfg.sft_lr if cfg.algo == "sft" else cfg.lr},
                             {"params": list(value_head.parameters()), "lr": cfg.value_lr}], weight_decay=0.0)
    rng = random.Random(f"prompts:{cfg.seed}")
    torch.manual_seed(cfg.seed)

    start_iter, wall, wall_total, stopped = 0, 0.0, 0.0, False
    if resume:
        meta = load_checkpoint(run_dir, lm, value_head, opt, rng)
        start_iter, wall, wall_total = meta["iteration"], meta["wall"], meta["wall_total"]
        stopped = meta.get("stopped", False)
        kept = [line for line in metrics_path.read_text().splitlines()
                if line.strip() and json.loads(line)["iteration"] <= start_iter]
        _atomic_write(metrics_path, lambda tmp: Path(tmp).write_text("".join(k + "\n" for k in kept)))
        log(f"resumed {run_dir} at iteration {start_iter}")
    else:
        write_json(run_dir / "config.json", asdict(cfg))
        metrics_path.write_text("")
    write_json(run_dir / "config.json", asdict(cfg))

    def emit(record: dict) -> None:
        with metrics_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    last_eval = None
    if start_iter == 0:  # the starting point (after the SFT warm start)
        t0 = time.perf_counter()
        last_eval = evaluate(lm, tokenizer, task, cfg, seed=cfg.seed + 10_000)
        wall_total += time.perf_counter() - t0
        emit({"iteration": 0, "algo": cfg.algo, "wall": wall, "wall_total": wall_total, "eval": last_eval,
              "eval_base_model": base_eval, "sft": sft_info})
        log(f"iteration 0: eval accuracy {last_eval['accuracy']:.3f}, majority {last_eval['majority']:.3f}, "
            f"unfaithful {last_eval['unfaithful']:.3f}")
        save_checkpoint(run_dir, 0, lm, value_head, opt, rng, {"wall": wall, "wall_total": wall_total})

    train_split, val_split = task.split("train"), task.split("validation")
    todo = range(start_iter + 1, cfg.iterations + 1) if not stopped else range(0)
    bar = tqdm(todo, desc=f"{cfg.algo}", disable=not progress, initial=start_iter, total=cfg.iterations)
    for it in bar:
        timing = Counter({"rollout": 0.0, "val_grad": 0.0, "scoring": 0.0, "update": 0.0, "eval": 0.0})
        record: dict = {"iteration": it, "algo": cfg.algo}
        errors: Counter = Counter()
        lm.train()

        if cfg.algo == "sft":  # ------------------------------------------ sft: one step on gold solutions
            t0 = time.perf_counter()
            loss = sft_loss(lm, tokenizer, task, rng.sample(train_split, min(cfg.sft_batch, len(train_split))))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            record["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(lora_params, cfg.max_grad_norm))
            opt.step()
            record["sft_loss"] = loss.item()
            timing["update"] += time.perf_counter() - t0
        else:
            # ---- rollout: k samples per prompt, binary reward, policy/reference log-probs and values
            t0 = time.perf_counter()
            prompts = rng.sample(train_split, min(cfg.prompts_per_iter, len(train_split)))
            ro = sample(lm, tokenizer, task, prompts, cfg.samples_per_prompt, cfg.temperature, cfg.max_new_tokens,
                        cfg.gen_batch)
            rewards = torch.tensor([float(safe_check(task, t, ex, errors)) for t, ex in zip(ro.texts, ro.examples)],
                                   device=device)
            with torch.no_grad():
                old_logp, old_values = response_logprobs(lm, ro, value_head=value_head, temperature=cfg.temperature)
                with lm.disable_adapter():  # the reference policy is the model without the adapter
                    ref_logp, _ = response_logprobs(lm, ro, temperature=cfg.temperature)
            mask = ro.mask
            kl = pm.kl_penalty(old_logp, ref_logp, mask, "k1")
            # ---- advantages
            if cfg.algo == "grpo":
                advantages = pm.grpo_advantages(rewards, ro.group)[:, None] * mask
                returns = old_values * mask
            else:
                token_rewards = pm.shaped_rewards(rewards, kl, mask, cfg.kl_coef)
                advantages, returns = pm.gae(token_rewards, old_values, mask, cfg.gamma, cfg.lam)
                if cfg.whiten:
                    advantages = pm.masked_whiten(advantages, mask)
            timing["rollout"] += time.perf_counter() - t0
            n = len(ro.texts)
            weights = torch.ones(n, device=device)
            keep = torch.ones(n, dtype=torch.bool, device=device)

            if cfg.algo == "ippo":  # -------------------------------- ippo: influence filter and reweighting
                val_examples = rng.sample(val_split, min(cfg.val_size, len(val_split)))
                scores = score_episodes(lm, tokenizer, task, cfg, ro, old_logp, advantages, val_examples, timing)
                keep, weights, stop = pm.ippo_filter(scores, cfg.tol)
                record.update(score_hist=_histogram(scores), score_mean=float(scores.mean()),
                              score_pos_frac=float((scores > 0).float().mean()), early_stop=stop)
                top, bottom = _episodes_log(ro, rewards, scores, cfg.log_episodes)
                if stop:
                    log(f"iteration {it}: no episode has influence score > tol={cfg.tol}: intrinsic early stop")
                    stopped = True
            else:
                top, bottom = _episodes_log(ro, rewards, rewards, cfg.log_episodes)
            record.update(reward=float(rewards.mean()), kept_fraction=float(keep.float().mean()),
                          kl_ref=float(pm.masked_mean(kl, mask)), response_len=float(mask.sum(1).mean()),
                          top_episodes=top, bottom_episodes=bottom)

            # ---- update: epochs x minibatches over the kept episodes, each weighted
            t0 = time.perf_counter()
            kept_idx = torch.nonzero(keep).squeeze(1)
            stats = Counter()
            n_mb = 0
            for _ in range(cfg.epochs if not stopped else 0):
                for mb in kept_idx[torch.randperm(len(kept_idx)).to(device)].split(cfg.minibatch):
                    m = mask[mb]
                    logp, values = response_logprobs(lm, ro, mb, value_head, cfg.temperature)
                    per_episode, _ = pm.policy_loss(logp, old_logp[mb], advantages[mb], m, cfg.clip)
                    loss = (weights[mb] * per_episode).mean()
                    if cfg.algo == "grpo":  # GRPO: k3 KL to the reference in the loss, no critic
                        loss = loss + cfg.kl_coef * pm.masked_mean(pm.kl_penalty(logp, ref_logp[mb], m, "k3"), m)
                    else:
                        _, vf = pm.value_loss(values, old_values[mb], returns[mb], m, cfg.vf_clip)
                        loss = loss + cfg.vf_coef * vf
                        stats["vf_loss"] += vf.item()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    stats["grad_norm"] += float(torch.nn.utils.clip_grad_norm_(lora_params, cfg.max_grad_norm))
                    opt.step()
                    stats["pg_loss"] += (weights[mb] * per_episode).mean().item()
                    stats["approx_kl"] += pm.approx_kl(logp.detach(), old_logp[mb], m).item()
                    stats["clip_frac"] += pm.clip_fraction(logp.detach(), old_logp[mb], m, cfg.clip).item()
                    n_mb += 1
            record.update({k: v / n_mb for k, v in stats.items()} if n_mb else {})
            timing["update"] += time.perf_counter() - t0

        wall += sum(timing.values())
        if it % cfg.eval_every == 0 or it == cfg.iterations or stopped:
            t0 = time.perf_counter()
            last_eval = record["eval"] = evaluate(lm, tokenizer, task, cfg, seed=cfg.seed + 10_000)
            timing["eval"] = time.perf_counter() - t0
        wall_total += sum(timing.values())
        record.update(time=dict(timing), wall=wall, wall_total=wall_total, checker_errors=dict(errors))
        emit(record)
        save_checkpoint(run_dir, it, lm, value_head, opt, rng, {"wall": wall, "wall_total": wall_total,
                                                                "stopped": stopped})
        bar.set_postfix({k: f"{record[k]:.3f}" for k in ("reward", "kept_fraction", "sft_loss") if k in record})
        if "eval" in record:
            log(f"iteration {it}: eval accuracy {last_eval['accuracy']:.3f}, majority {last_eval['majority']:.3f}, "
                f"pass@{cfg.eval_k} {last_eval['pass_at_k']:.3f}, unfaithful {last_eval['unfaithful']:.3f}, "
                f"train wall {wall:.0f}s")
        if stopped:
            break
    bar.close()
    if last_eval is None:  # resumed a finished run
        last_eval = next((json.loads(l)["eval"] for l in reversed(metrics_path.read_text().splitlines())
                          if "eval" in json.loads(l)), {})
    return last_eval


def evaluate_run(run_dir: str | Path, eval_size: int | None = None, eval_k: int | None = None,
                 model_and_tokenizer=None) -> dict:
    """Evaluate the newest checkpoint of ``run_dir`` (its LoRA weights) with the run's eval settings."""
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    if not (run_dir / "latest.json").is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} holds no checkpoint (latest.json): not a run directory")
    saved = json.loads((run_dir / "config.json").read_text())
    cfg = Config(**{k: v for k, v in saved.items() if k in {f.name for f in dataclasses.fields(Config)}})
    cfg.eval_size, cfg.eval_k = eval_size or cfg.eval_size, eval_k or cfg.eval_k
    cfg.validate()
    task = build_task(cfg)
    base, tokenizer = model_and_tokenizer or load_causal_lm(resolve_model_dir(cfg))
    lm = add_lora(base, r=cfg.lora_r, alpha=cfg.lora_alpha).to(resolve_device(cfg))
    latest = json.loads((run_dir / "latest.json").read_text())
    load_trainable_state(lm, load_file(run_dir / f"{latest['checkpoint']}.safetensors"), "lora/")
    return evaluate(lm, tokenizer, task, cfg, seed=cfg.seed + 10_000) | {"iteration": latest["iteration"]}
