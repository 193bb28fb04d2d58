"""Evaluation: accuracy over k samples, majority vote, pass@k and the unfaithful-reasoning rate, with the task's
checkers (whatever reward a run trains on); and the evaluation of a run directory's newest checkpoint."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
from torch import nn

from ippo.train.checkpoint import latest_checkpoint, load_tensors, load_trainable_state
from ippo.train.config import Config, build_task, resolve_device, resolve_model_dir, run_config
from ippo.train.model import add_lora, load_causal_lm
from ippo.train.policy import fork_rng, sample
from ippo.train.tasks import Task, extract_final_answer


@torch.no_grad()
def evaluate(lm: nn.Module, tokenizer, task: Task, cfg: Config, seed: int, size: int | None = None) -> dict:
    """Metrics on the first ``size`` (default ``eval_size``) eval problems, ``eval_k`` samples each, with a fixed
    sampling seed.

    accuracy: mean correctness over all samples; greedy_accuracy (``eval_greedy``): correctness of one greedy
    completion per problem, generated in batches of ``gen_batch``; majority: the most common final answer is right;
    pass_at_k: at least one sample is right; unfaithful: share of correct samples with >= 1 wrong step;
    faithful_accuracy: share of samples that are correct with every step right. checker_errors: checker
    calls that raised (a raising ``check_answer`` counts as wrong, a raising ``check_steps`` as a wrong step).
    """
    examples = task.split("eval")[:size or cfg.eval_size]
    with fork_rng():
        torch.manual_seed(seed)
        ro = sample(lm, tokenizer, task, examples, cfg.eval_k, cfg.eval_temperature, cfg.max_new_tokens,
                    cfg.gen_batch)
        # at eval temperature 0 the samples are the greedy completions already
        greedy_ro = sample(lm, tokenizer, task, examples, 1, 0.0, cfg.max_new_tokens, cfg.gen_batch) \
            if cfg.eval_greedy and cfg.eval_temperature > 0 else ro
    errors = Counter()
    correct = [_checked(errors, False, task.check_answer, t, ex) for t, ex in zip(ro.texts, ro.examples)]
    greedy = {}
    if cfg.eval_greedy:
        greedy_correct = [_checked(errors, False, task.check_answer, t, ex)
                          for t, ex in zip(greedy_ro.texts, greedy_ro.examples)]
        greedy = {"greedy_accuracy": sum(greedy_correct) / len(greedy_correct)}
    wrong_steps = [_checked(errors, (1, 1), task.check_steps, t)[1] > 0 for t in ro.texts]
    by_question = [range(i * cfg.eval_k, (i + 1) * cfg.eval_k) for i in range(len(examples))]
    majority = []
    for ex, rows in zip(examples, by_question):
        answers = Counter(a for a in (extract_final_answer(ro.texts[r]) for r in rows) if a is not None)
        majority.append(bool(answers) and answers.most_common(1)[0][0] == extract_final_answer(ex.answer))
    n_correct = sum(correct)
    unfaithful = sum(c and w for c, w in zip(correct, wrong_steps))
    return {"accuracy": n_correct / len(correct),
            "majority": sum(majority) / len(examples),
            "pass_at_k": sum(any(correct[r] for r in rows) for rows in by_question) / len(examples),
            "unfaithful": unfaithful / n_correct if n_correct else 0.0,
            "faithful_accuracy": (n_correct - unfaithful) / len(correct),
            "mean_len": float(ro.mask.sum(1).mean()), "n_questions": len(examples), "k": cfg.eval_k,
            "checker_errors": errors["raised"], "sample": ro.texts[0][:300]} | greedy


def _checked(errors: Counter, fallback, check, *args):
    """``check(*args)``; if it raises, ``fallback``, counted in ``errors["raised"]`` (a user checker bug must not
    end a long run)."""
    try:
        result = check(*args)
    except Exception:
        errors["raised"] += 1
        return fallback
    return bool(result) if isinstance(fallback, bool) else result


def evaluate_run(run_dir: str | Path, eval_size: int | None = None, eval_k: int | None = None,
                 model_and_tokenizer=None) -> dict:
    """Evaluate the newest checkpoint of ``run_dir`` (its LoRA weights) with the run's eval settings, or
    ``eval_size`` problems x ``eval_k`` samples."""
    run_dir = Path(run_dir)
    if not (run_dir / "latest.json").is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} holds no checkpoint (latest.json): not a run directory")
    cfg = run_config(run_dir)
    cfg.eval_size = cfg.eval_size if eval_size is None else eval_size
    cfg.eval_k = cfg.eval_k if eval_k is None else eval_k
    cfg.validate()  # names --eval-size / --eval-k
    name, iteration = latest_checkpoint(run_dir)
    tensors_path = run_dir / f"{name}.safetensors"
    tensors = load_tensors(tensors_path)
    task = build_task(cfg)
    base, tokenizer = model_and_tokenizer or load_causal_lm(resolve_model_dir(cfg))
    lm = add_lora(base, r=cfg.lora_r, alpha=cfg.lora_alpha).to(resolve_device(cfg))
    load_trainable_state(lm, tensors, "lora/", source=tensors_path)
    return evaluate(lm, tokenizer, task, cfg, seed=cfg.seed + 10_000) | {"iteration": iteration}
