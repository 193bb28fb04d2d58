"""I-PPO inside TRL: ``IPPOGRPOTrainer`` and ``IPPORLOOTrainer``, TRL's ``GRPOTrainer`` and ``RLOOTrainer`` that keep
a completion only if a step on it lowers a validation loss.

Both take TRL's own arguments unchanged, plus ``validation_dataset`` (rows with ``prompt`` and ``completion``: gold
answers whose SFT loss is the validation loss); their config is ``IPPOConfig`` (``IPPOGRPOTrainer``) or
``IPPORLOOConfig`` (``IPPORLOOTrainer``): TRL's ``GRPOConfig`` / ``RLOOConfig`` with every field of it, plus the I-PPO
settings as ``ippo_*`` fields (``ippo.integrations.trl_config``, re-exported here): ``ippo_val_size`` (pairs drawn
per validation gradient, default 64), ``ippo_val_every`` (a fresh validation gradient at every k-th generation
batch, default 1: at every one), ``ippo_tol`` (default 0.0), ``ippo_stop_rule`` ("evidence", default, or
"paper"), ``ippo_stop_patience`` (default 2), ``ippo_stop_when_empty`` (default True), ``ippo_score`` ("raw",
default; "answer", "adam" or "deflated", the in-house trainer's ``--score``, see "Score variants" below) with
``ippo_deflate_top`` (default 1) and ``ippo_deflate_dim`` (default 4096) for "deflated", and ``ippo_one_backward``
(default True: take the scores and the filtered update from TRL's own backward when its conditions hold; False:
always the two-pass path, a scoring forward+backward before TRL's). The config checks each field when it is built
(``__post_init__``; a ValueError names the field: every field must have its own type, ``"False"`` is refused, not
taken as True), and the trainer checks the config again. The fields are saved with TRL's other arguments
(``to_dict()``, ``training_args.bin``, the report_to backends' config) and parsed by ``TrlParser`` /
``HfArgumentParser`` (``--ippo_val_size 8``, or ``ippo_*`` keys of a ``--config`` YAML file). ``args`` must be such a
config: a plain ``GRPOConfig`` / ``RLOOConfig`` (or none) is a ValueError. The constructor keywords of earlier
versions (``IPPOGRPOTrainer(..., ippo_val_size=8)``) were removed: passing one is a TypeError naming it.

``validation_dataset`` is a ``datasets.Dataset`` or a list (tuple) of dicts; a dict of columns is refused (pass
``Dataset.from_dict(columns)``). Every row is checked and tokenized at construction, as TRL tokenizes prompts; a
ValueError names the row: ``prompt`` a non-empty string or list of chat messages, ``completion`` a non-blank string,
or (with a chat prompt) a list of messages with some text. A text completion gets the EOS token appended; a chat one
is rendered by the chat template after the prompt. Long rows are cut to the trainer's lengths: the completion keeps
its first ``max_completion_length`` tokens (as generation cuts completions), the prompt its last
``max_prompt_length`` tokens when the config has that field (TRL's left cut; TRL 1.16's ``GRPOConfig`` and
``RLOOConfig`` have none and do not truncate the training prompts, so neither are the validation prompts).

Once per generation batch, after TRL has generated, rewarded and computed advantages, and before any optimizer step
on it (override point: ``_prepare_inputs``, right after TRL has shuffled the generation batch and split it into the
micro-batches it will train on):

1. Validation gradient V = dL_val/dtheta over the active adapter's LoRA A/B weights, at the sampling policy:
   L_val = (sum of -log pi(gold completion token)) / (number of gold completion tokens) over ``ippo_val_size`` pairs
   drawn without replacement (all of them if the set is smaller), with TRL's own per-token log-probs (at TRL's
   ``temperature``, 1.0 by default). The draw depends only on (seed, number of draws made), so every process
   draws the same pairs; process r takes every N-th pair from the r-th, and the N partial gradients (each already
   divided by the global token count) are summed with one all-reduce: every process gets the same V, which is the
   1-process gradient of the same pairs (up to float summation order). With ``ippo_val_every`` = k > 1, V is
   computed (from a new draw) at generation batches 0, k, 2k, ... only, and the batches in between are scored
   against it: a V up to k - 1 optimizer steps old, at 1/k of its cost (a forward+backward of ``ippo_val_size``
   pairs: on a setting where they have as many tokens as the generation batch, V is most of what the one-backward
   path adds to a step). A run resumed between two draws computes V again at its first generation batch, from the
   rows of the latest draw (a checkpoint holds the draw count and the batch count, not V).
2. Scores: for each micro-batch, TRL's own ``_compute_loss`` runs once inside ``InfluenceScorer`` with segment id =
   row (padding -1). The loss of a micro-batch is a sum of per-row terms over constants (grpo/sapo/luspo: / rows /
   accumulation steps; bnpo: / the micro-batch's completion tokens / accumulation steps; dr_grpo: / (rows x
   max_completion_length) / accumulation steps; dapo/cispo/vespo: / (the generation batch's tokens / processes x
   accumulation steps / steps_per_generation); RLOO: per-sequence mean, divided by accumulation steps by the
   Trainer), and scoring runs it on exactly the micro-batches TRL trains on, so every normalization is TRL's own and
   s_i = <dl_i/dtheta, V> for l_i = row i's share of the loss TRL backpropagates, times 1/N on N processes (DDP
   averages the gradients). With beta > 0, GRPO's KL term (and an entropy bonus, if configured) is part of l_i.
3. Keep rows with s_i > ``ippo_tol`` (``ippo_stop_rule="evidence"``: and a non-zero advantage, i.e. reward
   signal: a row whose advantage is 0 everywhere gets no policy gradient, so its score, which then comes from the
   KL or entropy terms alone, decides nothing); advantage *= s_i / mean(kept s), the mean over the kept rows of
   every process;
   dropped rows get advantage exactly 0 (this removes their policy-gradient term; GRPO's KL term and the entropy
   bonus do not scale with the advantage and keep acting on every row, as for any zero-advantage row in TRL).
   The decision is ``ippo.train.ppo_math.ippo_filter`` (and ``evidence_stop``, the in-house trainer's functions)
   on the scores and signal flags of every process's rows, which one all-gather brings to every process, so every
   process takes the same one.
4. Nothing else changes: the scoring pass uses ``torch.autograd.grad`` (``.grad`` untouched), runs under a forked RNG
   (dropout in it does not shift TRL's sampling or training randomness), and TRL's metrics (and its adaptive entropy
   controller's state) are restored afterwards; it logs ``ippo/kept_fraction``, ``ippo/score_mean``,
   ``ippo/score_pos_frac``, ``ippo/signal_fraction`` (rows with a non-zero advantage) and ``ippo/scoring_seconds``
   (validation gradient + scoring, this process) through TRL's metrics, so they appear in the normal logs and
   report_to backends.

Score variants (``ippo_score``; the in-house trainer's ``--score``, ``ippo.train.scoring``'s definitions):

* ``"raw"`` (default): s_i = <dl_i/dtheta, V> as above, the paper's score.
* ``"answer"``: V is the gradient of the validation loss of the final answers' tokens only: per validation
  completion, the tokens that overlap the text after its last ``####`` without surrounding whitespace (found by the
  tokenizer's character offsets, as ``ippo.train.policy.pack_answers(final_answer_only=True)`` finds them; a fast
  tokenizer is required); L_val = their summed NLL / their count. For a list-of-messages completion the answer is
  that of its last message with ``####``, found in the chat template's rendering. At construction, a
  ``validation_dataset`` row whose completion has no ``####``, nothing after it, or no answer token within
  ``max_completion_length`` is a ValueError naming the row.
* ``"adam"``: V is preconditioned by the trainer's own optimizer (``self.optimizer``, through accelerate's wrapper):
  P V with P = 1 / (sqrt(exp_avg_sq / (1 - beta2^step)) + eps) per LoRA weight
  (``ippo.train.scoring.adam_preconditioned``), P = 1 before the optimizer's first step; so s_i is, to first order,
  how much the next Adam step on row i lowers the validation loss. On N processes every process has the same
  optimizer state (DDP), so P V stays the same on every process. Needs an Adam/AdamW optimizer that holds every
  LoRA weight (param groups with ``betas``/``eps``, state ``exp_avg_sq``): anything else is a ValueError at the first
  generation batch; DeepSpeed (flat partitioned state) is refused at construction.
* ``"deflated"``: raw minus its part along the directions the generation batch's rows share:
  s_i - sum_{c <= ippo_deflate_top} <S_i, u_c> <u_c, sketch(V)>, S_i the ``ippo_deflate_dim``-wide sketch of row i's
  gradient from the same scoring backward (``InfluenceScorer(..., sketch_dim=ippo_deflate_dim, sketch_seed=0)``,
  times the same 1/accumulation, 1/N as s_i), u_c the top right singular vectors of the (rows, ippo_deflate_dim)
  matrix of every process's rows (one all-gather of scores and sketches; ``ippo.train.scoring.deflate``, process
  0's result broadcast), sketch(V) = ``sketch_gradients(V, ippo_deflate_dim, 0)``; before the filter.
  ``ippo_deflate_dim`` must be a multiple of 2r for every LoRA rank r (checked at construction). A row whose score
  or sketch is not finite stays out of the SVD (and is dropped by the filter).
* ``"centred"`` is refused by the config: it subtracts each prompt group's mean similarity, and TRL 1.16 shuffles
  the generation batch (``shuffle_sequence_dict``) before splitting it into the micro-batches the scorer sees,
  which carry no group ids (a group may also span processes); use the in-house trainer (``ippo --score centred``).

With ``steps_per_generation`` > 1 or ``num_iterations`` > 1, the generation batch is scored once, when TRL generates
it, and its reweighted advantages serve every micro-batch and iteration that reuses it.

Two paths compute this. The steps above are the **two-pass** path: a scoring forward+backward of every completion before
TRL's own. The **one-backward** path (``ippo_one_backward=True``, the default, whenever its conditions hold) needs no
scoring pass: V is taken as in step 1, then each micro-batch's forward and backward of TRL's loss (with the advantages
TRL computed) run once inside ``InfluenceScorer(episode_grads=True)``, which gives every row's score s_i and its LoRA
gradient G_i = dl_i/dtheta (segmented GEMMs: the dense weight gradient's FLOPs; extra memory: one LoRA gradient per row
of the micro-batch, and up to as much again while the kept rows' are summed). The micro-batch's kept rows (the rule of
step 3, which is per row) add sum_i [kept_i] s_i G_i to the LoRA ``.grad``; after the generation batch's last
micro-batch, the ``.grad`` are divided by mean(kept s) over every process's rows (one all-reduce of the counts) and
summed over processes (one all-reduce of the LoRA gradients; DDP's own reduction never runs, the forward uses the
unwrapped model), before the Trainer's clipping and optimizer step. Because the loss is positively homogeneous in the
advantage, this is the gradient of the two-pass path's reweighted loss: the LoRA weights after each step are the same
(tested to 1e-10 relative in float64 for grpo, dapo, bnpo, dr_grpo and RLOO, 1 and 2 processes). Its conditions:
``num_iterations == 1``, ``steps_per_generation == gradient_accumulation_steps`` (the generation batch is one optimizer
step), GRPO's ``beta == 0`` and no entropy bonus (terms that do not scale with the advantage; RLOO puts its KL in the
reward), a ``loss_type`` among grpo, dapo, bnpo, dr_grpo (the tested ones), no vLLM, no Liger loss, no FSDP or
DeepSpeed, and ``ippo_score != "deflated"`` (it needs every row's sketch before any weight), no reentrant gradient
checkpointing, no fp16 loss scaling, no LOMO optimizer. Otherwise the two-pass path runs; ``trainer.ippo_path`` says
which, and ``train()`` logs it once with the reason for a fallback. On the one-backward path TRL's logged ``loss`` is
that of the unfiltered advantages, and ``ippo/scoring_seconds`` times V and the combination of the rows' gradients (the
scored backward itself is TRL's step).

A generation batch of which nothing is kept (on any process) makes no optimizer step, on either path
(``optimizer.step`` and ``lr_scheduler.step`` are no-ops for it, as at the stop below): a step on zero policy
gradients would still move the weights through Adam's momentum and weight decay (and, two-pass with ``beta`` > 0,
through the KL term alone).

Intrinsic stop (with ``ippo_stop_when_empty``): ``ippo_stop_rule="paper"`` stops at the first generation batch of which
no row is kept on any process. ``"evidence"`` (the default) stops after ``ippo_stop_patience`` generation batches in a
row that carry reward signal (a row with non-zero advantage on some process) and keep none of it; a batch without signal
(every group's rewards equal: nothing for the scores to judge) neither counts nor breaks the streak, and keeps nothing
(so it makes no optimizer step, see above). At the stop, the micro-batches of that batch run no forward/backward
(two-pass path; on the one-backward path the stop is decided after they ran), the optimizer step that closes the current
accumulation window is skipped (``optimizer.step`` and ``lr_scheduler.step`` are no-ops for that one step, so
parameters, optimizer and scheduler state are those of the last update; gradients accumulated earlier in that window are
discarded), and training stops: the Trainer logs that step (``ippo/kept_fraction`` 0) and saves its final checkpoint as
it does at ``max_steps`` (``save_strategy="steps"``; "epoch" saves at the epoch end as usual). ``trainer.ippo_stopped``
is then True. ``global_step`` counts that window.

Checkpoints and resume: the I-PPO state (the stop flag ``ippo_stopped``, the evidence rule's streak, and the number
of validation draws made, which seeds the next draw) is written into every TRL checkpoint, in trainer_state.json's
``stateful_callbacks`` (transformers' ``ExportableState`` mechanism), and ``train(resume_from_checkpoint=...)``
restores it whatever ``restore_callback_states_from_checkpoint`` says; so a resumed run draws the same validation
pairs and counts the same streak as the uninterrupted one. Resuming from a checkpoint saved at (or after) the stop
trains no further: it logs that the run had stopped, runs no step and saves nothing (``ippo_stop_when_empty=False``
trains on instead). A checkpoint without the I-PPO state (an older version's) resumes with a fresh one. A ``train()``
that does not resume starts from a fresh state.

FSDP2 (accelerate's plugin with ``fsdp_version: 2``, or ``fully_shard``): the LoRA weights are sharded DTensors,
and inside each forward their layers hold the all-gathered full weights; the validation gradient and the scoring
pass differentiate with respect to those (``ippo.kernels.scorer.differentiable_weights``: full plain gradients,
``.grad`` untouched, no reduce-scatter), so each process's partial V is the full one, summed by the same all-reduce
as under DDP, and the scores, the all-gather of the decision and the stop are as under DDP. FSDP2's forwards are
collectives: every process runs as many validation forwards (one with fewer pairs runs its last ones on a masked
pair). ``ippo_score="adam"`` is refused under FSDP (the optimizer state is sharded).

Refused with a ValueError naming the setting: DeepSpeed ZeRO-3 and FSDP1 (sharded or flattened LoRA parameters), an
accelerate process count other than torch.distributed's world size (seen on CPU with the DeepSpeed plugin under
torchrun: the decision would silently be per process),
``torch.nn.DataParallel`` (several GPUs in one process), a model without peft LoRA, DoRA, LoRA layers other than
Linear (e.g. Embedding, Conv), trainable parameters outside the LoRA A/B weights (e.g. ``modules_to_save``: the
score would not cover them), MoE router aux loss (it couples the rows of a batch), vision-language processors, a
config other than ``IPPOConfig`` / ``IPPORLOOConfig`` (a bad ``ippo_*`` field: by the config, see above), a bad
``validation_dataset`` row, an ``ippo_deflate_dim`` that "deflated" cannot take, "adam" with DeepSpeed or a
non-Adam optimizer, "answer" with a row without a final answer, and a validation gradient that is zero (or not
finite) for every LoRA parameter. Allowed but
not yet tested: DeepSpeed ZeRO-1/2 (until a GPU run: on CPU accelerate's DeepSpeed plugin reports one process per
rank, refused above), FSDP2 on GPUs (NCCL, bf16 mixed precision, CPU offload), vLLM generation, tools/environments,
CUDA (the tests run TRL on CPU, 1 and 2 processes, DDP and FSDP2 with gloo).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import random
import time
import weakref
from collections.abc import Mapping
from typing import Any

import torch
from accelerate.utils import broadcast
from datasets import Dataset, DatasetDict
from peft import PeftModel
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import IntervalStrategy, SaveStrategy
from trl import GRPOTrainer, RLOOTrainer
from trl.data_utils import is_conversational
from trl.models.utils import disable_gradient_checkpointing

from ippo.integrations.trl_config import IPPO_FIELDS, IPPOArguments, IPPOConfig, IPPORLOOConfig
from ippo.kernels import (
    InfluenceScorer,
    LoRAGrad,
    check_validation_gradient,
    differentiable_weights,
    lora_weights,
    segment_ids_from_mask,
    sketch_gradients,
)
from ippo.train.policy import ANSWER_MARK
from ippo.train.ppo_math import evidence_stop, ippo_filter
from ippo.train.scoring import adam_preconditioned, deflate

__all__ = ["IPPOConfig", "IPPOGRPOTrainer", "IPPORLOOConfig", "IPPORLOOTrainer"]

logger = logging.getLogger(__name__)

# Trainer state that TRL's `_compute_loss` updates as it runs (GRPO's adaptive entropy controller); the scoring pass
# restores it, as it restores TRL's metrics.
_LOSS_STATE = ("entropy_coef", "_entropy_window_stats", "_last_world_entropy")
_MISSING = object()
# The I-PPO state a checkpoint holds: the intrinsic stop, the evidence rule's streak, the validation draws made, the
# generation batches scored (ippo_val_every's schedule; a checkpoint of an earlier version has none: = the draws).
_SAVED_STATE = ("ippo_stopped", "_ippo_streak", "_ippo_draws", "_ippo_batches")
_SKETCH_SEED = 0  # ippo_score="deflated": the sketch projection's seed (the in-house default --sketch-seed)
# GRPO loss types for which the one-backward path is tested against the two-pass one (RLOO has one loss)
_ONE_BACKWARD_LOSSES = ("grpo", "dapo", "bnpo", "dr_grpo")
# per-generation-batch counts of the one-backward path, summed over micro-batches and processes
_COUNTS = ("kept", "kept_score_sum", "rows", "signal_rows", "positive", "finite_score_sum", "nonfinite")


def _skipped_step(*args, **kwargs) -> None:
    """Stands in for optimizer.step / lr_scheduler.step on the step that the intrinsic stop skips."""


class _IPPOStopCallback(TrainerCallback, ExportableState):
    """The intrinsic stop: skips the optimizer and scheduler step of the window in which the stop was decided, then
    stops training the way the Trainer stops at max_steps (log, final checkpoint). Its ``state()`` is the trainer's
    I-PPO state, which the Trainer writes into every checkpoint's trainer_state.json (``stateful_callbacks``); the
    trainer restores it on resume (``_IPPOMixin._load_callback_state``)."""

    def __init__(self, trainer: _IPPOMixin):
        self._trainer = weakref.ref(trainer)
        self._patched: list[tuple[Any, Any]] = []

    def state(self) -> dict:
        trainer = self._trainer()
        return {"args": {}, "attributes": {} if trainer is None else trainer._ippo_saved_state()}

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        trainer = self._trainer()
        if trainer is not None and trainer.ippo_path == "one-backward" and trainer._ippo_micro_batches:
            raise RuntimeError(f"{type(trainer).__name__}: an optimizer step came after {trainer._ippo_micro_batches} "
                               f"of the generation batch's {args.steps_per_generation} micro-batches; the one-backward "
                               "path needs the whole generation batch in one optimizer step (ippo_one_backward=False "
                               "takes the two-pass path)")
        if trainer is None or not (trainer.ippo_stopped or trainer._ippo_skip_steps):
            return
        for obj in (trainer.optimizer, trainer.lr_scheduler):
            if obj is not None:
                self._patched.append((obj, vars(obj).get("step", _MISSING)))
                obj.step = _skipped_step

    def on_step_end(self, args, state, control, **kwargs):
        for obj, previous in self._patched:
            if previous is _MISSING:
                del obj.step
            else:
                obj.step = previous
        self._patched.clear()
        trainer = self._trainer()
        if trainer is None or not trainer.ippo_stopped:
            return
        control.should_training_stop = True
        if args.logging_strategy != IntervalStrategy.NO:
            control.should_log = True
        if args.save_strategy == SaveStrategy.STEPS:
            control.should_save = True


def _check_validation_container(name: str, dataset) -> None:
    """ValueError unless ``dataset`` is a non-empty datasets.Dataset or list (tuple) of rows."""
    if dataset is None:
        raise ValueError(f"{name}: validation_dataset is required: a datasets.Dataset or a list of rows with 'prompt' "
                         "and 'completion' (the gold answers whose SFT loss defines the validation gradient)")
    if isinstance(dataset, Mapping):
        if isinstance(dataset, DatasetDict):
            raise ValueError(f"{name}: validation_dataset is a DatasetDict; pass one of its splits, e.g. "
                             f"dataset[{next(iter(dataset), 'validation')!r}]")
        raise ValueError(f"{name}: validation_dataset is a dict (of columns?); pass datasets.Dataset.from_dict(it), "
                         "or a list of rows with 'prompt' and 'completion'")
    if not isinstance(dataset, (Dataset, list, tuple)):
        raise ValueError(f"{name}: validation_dataset must be a datasets.Dataset or a list of rows with 'prompt' and "
                         f"'completion'; got {type(dataset).__name__}")
    if len(dataset) == 0:
        raise ValueError(f"{name}: validation_dataset is empty")


def _is_messages(value) -> bool:
    """A non-empty list of chat messages, as TRL decides it (``is_conversational``)."""
    return isinstance(value, list) and bool(value) and is_conversational({"prompt": value})


def _message_text(message: Mapping) -> str:
    """The text of a chat message: its content string, or the text parts of a multi-part content."""
    content = message["content"]
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text") or "" for part in content if isinstance(part, Mapping))
    return ""


def _check_validation_row(where: str, prompt, completion) -> None:
    """ValueError (prefixed ``where``) unless the row's prompt is a non-empty string or list of messages and its
    completion a non-blank string, or (with a list-of-messages prompt) a list of messages with some text."""
    if isinstance(prompt, list) and not prompt or prompt == "":
        raise ValueError(f"{where}: the prompt is empty")
    if not isinstance(prompt, str) and not _is_messages(prompt):
        raise ValueError(f"{where}: 'prompt' must be a string or a list of messages ({{'role', 'content'}}); got "
                         f"{type(prompt).__name__}")
    if isinstance(completion, list) and not completion:
        raise ValueError(f"{where}: the completion is empty (no messages)")
    if isinstance(completion, str) or (isinstance(prompt, str) and not isinstance(completion, list)):
        if not isinstance(completion, str):
            raise ValueError(f"{where}: 'completion' must be a string; got {type(completion).__name__}")
        if not completion.strip():
            raise ValueError(f"{where}: the completion is empty")
        return
    if isinstance(prompt, str):
        raise ValueError(f"{where}: a list-of-messages completion needs a list-of-messages prompt; got a string prompt")
    if not _is_messages(completion):
        raise ValueError(f"{where}: 'completion' must be a string or a list of messages ({{'role', 'content'}}); got "
                         f"{type(completion).__name__}")
    if not any(_message_text(m).strip() for m in completion):
        raise ValueError(f"{where}: the completion is empty (its messages have no text)")


def _final_answer(where: str, text: str) -> tuple[int, int]:
    """(start, stop): the characters of ``text``'s final answer, the text after its last ``####`` without surrounding
    whitespace (``ippo.train.policy.pack_answers(final_answer_only=True)``'s rule). ValueError (prefixed ``where``)
    when nothing follows the mark."""
    tail = text[text.rfind(ANSWER_MARK) + len(ANSWER_MARK):]
    start = len(text) - len(tail) + (len(tail) - len(tail.lstrip()))
    if not tail.strip():
        raise ValueError(f"{where}: nothing follows the last {ANSWER_MARK!r} of the completion (ippo_score='answer' "
                         "takes the validation loss of the final answer's tokens)")
    return start, start + len(tail.strip())


def _overlapping(offsets, start: int, stop: int) -> list[int]:
    """1 on the tokens whose character ``offsets`` overlap [start, stop), else 0."""
    return [int(end > start and first < stop) for first, end in offsets]


class _IPPOMixin:
    """The I-PPO filter for TRL's online trainers (GRPO, RLOO); see the module docstring."""

    # the config class the trainer takes (IPPOConfig, IPPORLOOConfig): set by each trainer class
    _ippo_config_class: type[IPPOArguments]

    def __init__(self, *args, validation_dataset=None, **kwargs):
        name, config_class = type(self).__name__, self._ippo_config_class
        removed = [key for key in kwargs if key in IPPO_FIELDS]
        if removed:  # the constructor keywords of earlier versions
            settings = ", ".join(f"{key}=..." for key in removed)
            raise TypeError(f"{name}: the keyword argument(s) {', '.join(removed)} were removed from the trainer: set "
                            f"them on the config, args={config_class.__name__}(..., {settings})")
        config = inspect.signature(super().__init__).bind_partial(*args, **kwargs).arguments.get("args")
        if not isinstance(config, config_class):
            trl_class = config_class.__mro__[2].__name__  # (config class, IPPOArguments, TRL's config, ...)
            raise ValueError(f"{name}: args must be an {config_class.__name__} (TRL's {trl_class} with the I-PPO "
                             f"settings, the ippo_* fields: from ippo.integrations.trl import {config_class.__name__}; "
                             f"args={config_class.__name__}(output_dir=..., ...)); got "
                             f"{'None' if config is None else type(config).__name__}")
        config._ippo_check()  # checked at the config's construction; again here, in case a field was set since
        _check_validation_container(name, validation_dataset)
        super().__init__(*args, **kwargs)
        self.ippo_validation_dataset = validation_dataset
        args = self.args
        self.ippo_val_size, self.ippo_val_every, self.ippo_tol = args.ippo_val_size, args.ippo_val_every, args.ippo_tol
        self.ippo_stop_rule, self.ippo_stop_patience = args.ippo_stop_rule, args.ippo_stop_patience
        self.ippo_stop_when_empty = args.ippo_stop_when_empty
        self.ippo_score, self.ippo_deflate_top, self.ippo_deflate_dim = (args.ippo_score, args.ippo_deflate_top,
                                                                         args.ippo_deflate_dim)
        self.ippo_one_backward = args.ippo_one_backward
        self._ippo_streak = 0  # evidence rule: generation batches in a row with signal and nothing of it kept
        self.ippo_stopped = False  # True once training ended by the intrinsic stop
        self._ippo_draws = 0  # validation draws made (one per V computed): the next draw's position
        self._ippo_batches = 0  # generation batches scored: V is computed afresh when it is a multiple of val_every
        self._ippo_raw_val: dict[str, LoRAGrad] | None = None  # the latest validation gradient (ippo_val_every)
        self._ippo_skip_steps = False  # the generation batch kept nothing: its optimizer step(s) are skipped
        self._ippo_micro_batches = 0  # one-backward path: micro-batches of the generation batch run so far
        self._ippo_choose_path()  # ippo_path; train() chooses again and logs it
        self._ippo_val_cache: dict[int, tuple[list[int], list[int], list[int]]] = {}
        # refuses unsupported set-ups now rather than at the first generation batch
        self._ippo_check_score(self._ippo_lora_weights())
        for index in range(len(validation_dataset)):  # and any validation row TRL's tokenizer cannot take
            self._ippo_val_row(index)
        self.add_callback(_IPPOStopCallback(self))

    # ---- checks ------------------------------------------------------------------------------------------------

    def _ippo_lora_weights(self) -> dict[str, LoRAGrad]:
        """{layer: LoRAGrad(lora_A weight, lora_B weight)} of the active adapter (``ippo.kernels.lora_weights``);
        raises ValueError on what is not supported."""
        name = type(self).__name__
        if self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3:
            raise ValueError(f"{name}: DeepSpeed ZeRO-3 is not supported: it shards the LoRA parameters across "
                             "processes, and the influence scorer needs every LoRA layer's full A and B on each "
                             "process; use DDP or DeepSpeed ZeRO-0/1/2")
        fsdp_version = getattr(getattr(self.accelerator.state, "fsdp_plugin", None), "fsdp_version", 1)
        if self.is_fsdp_enabled and fsdp_version != 2:
            raise ValueError(f"{name}: FSDP1 (fsdp_version 1) is not supported: it flattens and shards the LoRA "
                             "parameters into FlatParameters, so neither the influence scorer nor the validation "
                             "gradient can address each LoRA layer's A and B; use FSDP2 (fsdp_version: 2 in the "
                             "accelerate config, fsdp_config={'fsdp_version': 2}) or DDP")
        self._ippo_check_processes(name)
        if self.args.n_gpu > 1:
            raise ValueError(f"{name}: torch.nn.DataParallel ({self.args.n_gpu} GPUs in one process) is not supported; "
                             "launch one process per GPU (accelerate launch or torchrun)")
        if getattr(self, "_is_vlm", False):
            raise ValueError(f"{name}: vision-language processors are not supported yet (the validation loss is "
                             "text-only)")
        if getattr(self, "aux_loss_enabled", False):
            raise ValueError(f"{name}: the MoE router load-balancing loss couples all rows of a batch, so it has no "
                             "per-completion share; set router_aux_loss_coef=0")
        model = self.accelerator.unwrap_model(self.model)
        if not isinstance(model, PeftModel):
            raise ValueError(f"{name}: the model must be a peft LoRA model (pass peft_config=LoraConfig(...) or a "
                             f"PeftModel): influence scores are taken over the LoRA parameters; got "
                             f"{type(model).__name__}")
        config = model.peft_config.get(model.active_adapter)
        if getattr(config, "use_dora", False):
            raise ValueError(f"{name}: DoRA (LoraConfig(use_dora=True)) is not supported; the influence scorer handles "
                             "plain LoRA only")
        try:
            weights = lora_weights(model)
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from error
        lora = {id(w) for pair in weights.values() for w in pair}
        others = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in lora]
        if others:
            raise ValueError(f"{name}: trainable parameters outside the LoRA A/B weights are not supported (the "
                             f"influence score would not cover them): {others[:3]}{'...' if len(others) > 3 else ''}; "
                             "freeze them (e.g. no modules_to_save)")
        return weights

    def _ippo_check_processes(self, name: str) -> None:
        """ValueError when accelerate's process count is not torch.distributed's world size: the filter's decision
        (one all-gather of every process's scores) would then silently be per process. Seen on CPU under torchrun
        with accelerate's DeepSpeed plugin, where accelerate reports num_processes=1 on every rank."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        world, processes = dist.get_world_size(), self.accelerator.num_processes
        if world != processes:
            deepspeed = " with DeepSpeed" if self.is_deepspeed_enabled else ""
            raise ValueError(f"{name}: accelerate reports num_processes={processes}{deepspeed}, but torch.distributed "
                             f"has world size {world}: the I-PPO keep/weights decision and the stop would be taken "
                             "per process instead of over every process's rows; launch so that accelerate sees every "
                             "process (accelerate launch with a matching num_processes; DeepSpeed ZeRO-1/2 is untested "
                             "with this trainer)")

    def _ippo_check_score(self, weights: dict[str, LoRAGrad]) -> None:
        """ValueError on what ``ippo_score`` cannot take: deflated, an ``ippo_deflate_dim`` that is not a multiple
        of 2r for every LoRA rank r; adam, DeepSpeed (its optimizer keeps the Adam state in flat partitions, not per
        LoRA weight); answer, a slow tokenizer (no character offsets)."""
        name = type(self).__name__
        if self.ippo_score == "deflated":
            needed = sorted({2 * pair.A.shape[0] for pair in weights.values()})
            if any(self.ippo_deflate_dim % n for n in needed):
                raise ValueError(f"{name}: ippo_deflate_dim must be a multiple of 2r for every LoRA layer's rank r "
                                 f"(2r in {needed}) with ippo_score='deflated'; got {self.ippo_deflate_dim}")
        if self.ippo_score == "adam" and self.is_deepspeed_enabled:
            raise ValueError(f"{name}: ippo_score='adam' is not supported with DeepSpeed: its optimizer keeps the Adam "
                             "state in flat partitions, not per LoRA weight; use DDP")
        if self.ippo_score == "adam" and self.is_fsdp_enabled:
            raise ValueError(f"{name}: ippo_score='adam' is not supported with FSDP yet: the optimizer's second moment "
                             "is sharded with the LoRA weights (DTensors); use ippo_score='raw', 'answer' or "
                             "'deflated', or DDP")
        if self.ippo_score == "answer" and not getattr(self._tokenizer, "is_fast", False):
            raise ValueError(f"{name}: ippo_score='answer' needs a fast tokenizer (character offsets, to find the "
                             f"final answer's tokens); got {type(self._tokenizer).__name__}")

    # ---- validation gradient -----------------------------------------------------------------------------------

    def _ippo_val_pair(self, index: int) -> tuple[list[int], list[int]]:
        """(prompt ids, completion ids) of validation row ``index`` (:meth:`_ippo_val_row`)."""
        prompt_ids, completion_ids, _ = self._ippo_val_row(index)
        return prompt_ids, completion_ids

    def _ippo_val_row(self, index: int) -> tuple[list[int], list[int], list[int]]:
        """(prompt ids, completion ids, loss mask of the completion ids) of validation row ``index``, tokenized as
        TRL tokenizes prompts; a text completion gets the EOS token appended, a conversational one is rendered by
        the chat template (and cut after its last EOS). The prompt keeps its last ``max_prompt_length`` tokens if the
        config has one (TRL 1.16's GRPO and RLOO have none, and do not truncate prompts), the completion (and its
        mask) its first ``max_completion_length``. The mask is 1 on every completion token, or with
        ``ippo_score="answer"`` on the tokens of the final answer only (:meth:`_ippo_tokenize`)."""
        cached = self._ippo_val_cache.get(index)
        if cached is not None:
            return cached
        row = self.ippo_validation_dataset[index]
        where = f"{type(self).__name__}: validation_dataset row {index}"
        if not isinstance(row, Mapping) or "prompt" not in row or "completion" not in row:
            raise ValueError(f"{where} must have 'prompt' and 'completion'; got "
                             f"{sorted(row) if isinstance(row, Mapping) else type(row).__name__}")
        prompt, completion = row["prompt"], row["completion"]
        _check_validation_row(where, prompt, completion)
        if self.ippo_score == "answer" and not any(
                ANSWER_MARK in text for text in ([completion] if isinstance(completion, str) else
                                                 map(_message_text, completion))):
            raise ValueError(f"{where}: the completion has no {ANSWER_MARK!r}; ippo_score='answer' takes the "
                             f"validation loss of the final answer, the text after the last {ANSWER_MARK!r}")
        try:
            prompt_ids, completion_ids, mask = self._ippo_tokenize(where, prompt, completion)
        except ValueError:
            raise
        except Exception as error:  # the tokenizer's or the chat template's own error, on this row
            raise ValueError(f"{where} cannot be tokenized: {type(error).__name__}: "
                             f"{(str(error).splitlines() or [''])[0]}") from error
        max_prompt, max_completion = getattr(self.args, "max_prompt_length", None), self.args.max_completion_length
        if max_prompt is not None:
            prompt_ids = prompt_ids[-max_prompt:]
        if max_completion is not None:
            completion_ids, mask = completion_ids[:max_completion], mask[:max_completion]
        if not prompt_ids or not completion_ids:
            raise ValueError(f"{where}: the {'completion' if prompt_ids else 'prompt'} has no tokens")
        if not any(mask):
            raise ValueError(f"{where}: no token of the final answer is in the completion's first "
                             f"max_completion_length={max_completion} tokens (ippo_score='answer')")
        self._ippo_val_cache[index] = (prompt_ids, completion_ids, mask)
        return prompt_ids, completion_ids, mask

    def _ippo_tokenize(self, where: str, prompt, completion) -> tuple[list[int], list[int], list[int]]:
        """(prompt ids, completion ids, loss mask) of a checked validation row, before truncation. The mask is 1 on
        every completion token; with ``ippo_score="answer"``, 1 on the tokens that overlap the final answer, the text
        after the last ``####`` (stripped), found by the tokenizer's character offsets: in the completion string, or
        for a list of messages in the chat template's rendering of prompt + completion (which must tokenize to the
        same ids)."""
        tokenizer, eos = self.processing_class, self._tokenizer.eos_token_id
        eos_ids = set(getattr(self, "eos_token_ids", None) or [eos])
        answer = self.ippo_score == "answer"

        def text_completion(prompt_ids: list[int]) -> tuple[list[int], list[int], list[int]]:
            encoded = tokenizer(text=completion, add_special_tokens=False, return_offsets_mapping=answer)
            ids = list(encoded["input_ids"])
            mask = _overlapping(encoded["offset_mapping"], *_final_answer(where, completion)) if answer else \
                [1] * len(ids)
            return prompt_ids, ids + [eos], mask + [0 if answer else 1]

        if isinstance(prompt, str):
            return text_completion(list(tokenizer(text=prompt)["input_ids"]))
        kwargs = {"tokenize": True, "return_dict": True, **(getattr(self, "chat_template_kwargs", None) or {})}
        if getattr(self, "tools", None):
            kwargs["tools"] = self.tools
        if getattr(self, "chat_template", None) is not None:
            kwargs["chat_template"] = self.chat_template
        prompt_ids = list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, **kwargs)["input_ids"])
        if isinstance(completion, str):
            return text_completion(prompt_ids)
        messages = list(prompt) + list(completion)
        full = list(tokenizer.apply_chat_template(messages, **kwargs)["input_ids"])
        if full[:len(prompt_ids)] != prompt_ids:
            raise ValueError(f"{where}: the chat template renders prompt + completion with a different prefix than the "
                             "prompt alone, so the completion tokens are ambiguous; give the completion as a string")
        completion_ids = full[len(prompt_ids):]
        ends = [i for i, token in enumerate(completion_ids) if token in eos_ids]
        completion_ids = completion_ids[:ends[-1] + 1] if ends else completion_ids
        mask = [1] * len(completion_ids)
        if answer:  # the final answer of the last message with the mark, found after the rendering's last mark
            content = [_message_text(m) for m in completion if ANSWER_MARK in _message_text(m)][-1]
            answer_text = content[slice(*_final_answer(where, content))]
            text = tokenizer.apply_chat_template(messages, **{**kwargs, "tokenize": False, "return_dict": False})
            start = text.rfind(ANSWER_MARK) + len(ANSWER_MARK)
            start += len(text[start:]) - len(text[start:].lstrip())
            encoded = tokenizer(text=text, add_special_tokens=False, return_offsets_mapping=True)
            if not text.startswith(answer_text, start) or list(encoded["input_ids"]) != full:
                raise ValueError(f"{where}: the final answer's tokens cannot be found in the chat template's rendering "
                                 f"(its text does not tokenize to its ids, or the answer does not follow its last "
                                 f"{ANSWER_MARK!r}; ippo_score='answer'); give the completion as a string")
            mask = _overlapping(encoded["offset_mapping"], start, start + len(answer_text))
            mask = mask[len(prompt_ids):len(prompt_ids) + len(completion_ids)]
        return prompt_ids, completion_ids, mask

    def _ippo_validation_indices(self, redraw: bool = True) -> list[int]:
        """The validation rows of a new V: the same on every process, a function of the seed and the number of draws
        made in the run (saved in checkpoints, so a resumed run draws as the uninterrupted one); ``redraw=False``:
        the rows of the latest draw again."""
        if redraw:
            self._ippo_draws += 1
        n, draw = len(self.ippo_validation_dataset), self._ippo_draws - 1
        if self.ippo_val_size >= n:
            return list(range(n))
        rng = random.Random(f"ippo-validation:{self.args.seed}:{draw}")
        return sorted(rng.sample(range(n), self.ippo_val_size))

    def _ippo_validation_direction(self) -> dict[str, LoRAGrad]:
        """The V that ``ippo_score`` scores this generation batch against: the validation gradient of a new draw of
        rows (answer: of their final answers' tokens), computed afresh at every ``ippo_val_every``-th generation
        batch and reused in between (a run resumed between two draws computes it again, at its first batch, from the
        rows of the latest draw: a checkpoint holds no V), preconditioned for adam by the second moment of the
        optimizer that takes the next step (``ippo.train.scoring.adam_preconditioned``: P = 1 before its first
        step). The same on every process: V is all-reduced, and DDP keeps every process's optimizer state equal."""
        fresh = self._ippo_batches % self.ippo_val_every == 0
        if fresh or self._ippo_raw_val is None:
            self._ippo_raw_val = self._ippo_validation_gradients(self._ippo_validation_indices(redraw=fresh))
        self._ippo_batches += 1
        val = self._ippo_raw_val
        if self.ippo_score == "adam":
            val = adam_preconditioned(val, self._ippo_adam_optimizer(), self.accelerator.unwrap_model(self.model))
        return val

    def _ippo_adam_optimizer(self):
        """The trainer's optimizer (accelerate's wrapper forwards ``state`` and ``param_groups``), checked to be an
        Adam-like one that holds every LoRA weight: param groups with ``betas`` and ``eps``, and a state with
        ``exp_avg_sq`` for every LoRA weight it has stepped (none yet before the first step: P = 1)."""
        name, optimizer = type(self).__name__, self.optimizer
        if optimizer is None:
            raise ValueError(f"{name}: ippo_score='adam' needs the trainer's optimizer, and it has none yet")
        groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}
        for layer, weights in self._ippo_lora_weights().items():
            for part, weight in zip("AB", weights):
                group, state = groups.get(id(weight)), optimizer.state.get(weight) or {}
                if group is None or "betas" not in group or "eps" not in group or (state and not {
                        "exp_avg_sq", "step"} <= set(state)):
                    raise ValueError(f"{name}: ippo_score='adam' needs an Adam/AdamW optimizer over every LoRA weight "
                                     f"(param groups with betas and eps, state exp_avg_sq and step); "
                                     f"{type(optimizer).__name__} does not have that for {layer}.lora_{part}")
        return optimizer

    def _ippo_validation_gradients(self, indices: list[int]) -> dict[str, LoRAGrad]:
        """{layer: LoRAGrad} of L_val = mean NLL per gold completion token (answer: per final-answer token) over rows
        ``indices``, the same on every process (each computes every N-th pair; one all-reduce sums them). Raises
        ValueError when it is zero or not finite for every LoRA parameter."""
        model = self.accelerator.unwrap_model(self.model)
        weights = self._ippo_lora_weights()
        params = [w for pair in weights.values() for w in pair]
        rows = [self._ippo_val_row(i) for i in indices]
        tokens = sum(sum(mask) for _, _, mask in rows)
        mine = rows[self.accelerator.process_index::self.accelerator.num_processes]
        grads = [torch.zeros(p.shape, dtype=torch.promote_types(p.dtype, torch.float32), device=p.device)
                 for p in params]
        chunk = max(1, self.args.per_device_train_batch_size)
        # FSDP2: every process runs the same number of forwards (each all-gathers every sharded layer), also a
        # process with fewer (or no) pairs of its own: it runs its forwards on a pair with a zero loss mask
        forwards = -(-len(rows) // self.accelerator.num_processes // chunk) if self.is_fsdp_enabled else 0
        batches = [mine[start:start + chunk] for start in range(0, len(mine), chunk)]
        batches += [[(*rows[0][:2], [0] * len(rows[0][2]))]] * (forwards - len(batches))
        for batch in batches:
            input_ids, attention_mask, loss_mask = self._ippo_pad(batch)
            with self.compute_loss_context_manager():
                logps, _, _ = self._get_per_token_logps_and_entropies(model, input_ids, attention_mask,
                                                                      loss_mask.shape[1])
            loss = -(logps * loss_mask.to(logps.dtype)).sum() / tokens
            targets = differentiable_weights(model, params)  # FSDP2: the all-gathered weights the forward used
            for grad, got in zip(grads, torch.autograd.grad(loss, targets, allow_unused=True)):
                if got is not None:
                    grad += got
        flat = torch.cat([g.reshape(-1) for g in grads])
        if self.accelerator.num_processes > 1:
            flat = self.accelerator.reduce(flat, reduction="sum")
        check_validation_gradient(type(self).__name__, [flat])
        grads = list(torch.split(flat, [g.numel() for g in grads]))
        shaped = [g.view(p.shape) for g, p in zip(grads, params)]
        return {layer: LoRAGrad(shaped[2 * i], shaped[2 * i + 1]) for i, layer in enumerate(weights)}

    def _ippo_pad(self, rows: list[tuple[list[int], list[int], list[int]]]):
        """(input_ids, attention_mask, loss_mask) for (prompt ids, completion ids, completion loss mask) rows, padded
        as TRL pads: prompts on the left, completions on the right."""
        device, pad = self.accelerator.device, self._tokenizer.pad_token_id
        prompt_len = max(len(p) for p, _, _ in rows)
        completion_len = max(len(c) for _, c, _ in rows)
        ids, masks, loss_masks = [], [], []
        for prompt, completion, loss_mask in rows:
            left, right = prompt_len - len(prompt), completion_len - len(completion)
            ids.append([pad] * left + prompt + completion + [pad] * right)
            masks.append([0] * left + [1] * (len(prompt) + len(completion)) + [0] * right)
            loss_masks.append(list(loss_mask) + [0] * right)
        as_tensor = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
        return as_tensor(ids), as_tensor(masks), as_tensor(loss_masks)

    # ---- scores and the filter ---------------------------------------------------------------------------------

    def _ippo_scores(self, batches: list[dict[str, Any]], val_grads: dict[str, LoRAGrad]) -> list[torch.Tensor]:
        """Per micro-batch, (rows,) float64 s_i = <dl_i/dtheta, V>, l_i = row i's share of the loss the Trainer
        backpropagates for that micro-batch, divided by the number of processes (DDP averages gradients); deflated:
        then :meth:`_ippo_deflate` with the rows' gradient sketches from the same backward (scaled alike)."""
        model = self.accelerator.unwrap_model(self.model)
        params = [w for pair in self._ippo_lora_weights().values() for w in pair]
        accumulation = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        scale = (1.0 if self.loss_is_scaled_for_ga else 1.0 / accumulation) / self.accelerator.num_processes
        deflated = self.ippo_score == "deflated"
        sketch = {"sketch_dim": self.ippo_deflate_dim, "sketch_seed": _SKETCH_SEED} if deflated else {}
        scores, sketches = [], []
        for batch in batches:
            attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
            rows = attention_mask.shape[0]
            with InfluenceScorer(model, val_grads, segment_ids_from_mask(attention_mask), rows, **sketch) as scorer:
                with self.compute_loss_context_manager():
                    loss = self._compute_loss(model, batch)
                if loss.requires_grad:  # FSDP2: with respect to the all-gathered weights the forward used
                    torch.autograd.grad(loss, differentiable_weights(model, params), allow_unused=True)
            scores.append(scorer.scores.to(torch.float64) * scale)
            if deflated:
                sketches.append(scorer.sketches.to(torch.float64) * scale)
        return self._ippo_deflate(scores, sketches, val_grads) if deflated else scores

    def _ippo_deflate(self, scores: list[torch.Tensor], sketches: list[torch.Tensor],
                      val_grads: dict[str, LoRAGrad]) -> list[torch.Tensor]:
        """ippo_score="deflated": ``ippo.train.scoring.deflate`` over the whole generation batch, every process's
        rows (one all-gather of scores and sketches): s_i - sum_{c <= ippo_deflate_top} <S_i, u_c> <u_c, sketch(V)>,
        u_c the top right singular vectors of the rows' (rows, ippo_deflate_dim) sketch matrix S. Rows whose score
        or sketch is not finite stay out of the SVD and keep their score (the filter drops them). Process 0's result
        is broadcast, so every process filters on the same numbers. Returns this process's rows, per micro-batch."""
        device, processes = self.accelerator.device, self.accelerator.num_processes
        local = torch.cat([torch.cat(scores)[:, None], torch.cat(sketches)], 1).to(device)
        gathered = self.accelerator.gather(local) if processes > 1 else local
        all_scores, all_sketches = gathered[:, 0], gathered[:, 1:]
        model = self.accelerator.unwrap_model(self.model)
        val_sketch = sketch_gradients(val_grads, self.ippo_deflate_dim, _SKETCH_SEED, model=model).to(device)
        finite = all_scores.isfinite() & all_sketches.isfinite().all(1)
        out = all_scores.clone()
        if finite.any():
            out[finite] = deflate(all_scores[finite], all_sketches[finite], val_sketch, self.ippo_deflate_top)
        if processes > 1:
            out = broadcast(out.contiguous(), from_process=0)
        mine = out[self.accelerator.process_index * len(local):(self.accelerator.process_index + 1) * len(local)]
        return list(torch.split(mine, [len(s) for s in scores]))

    @contextlib.contextmanager
    def _ippo_isolated(self):
        """Runs the scoring pass without side effects on TRL: RNG forked, TRL's metrics and loss state restored, and
        reentrant gradient checkpointing (which autograd.grad cannot go through) off."""
        device = self.accelerator.device
        devices = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else []
        metrics = self._metrics["train"]
        saved_metrics = {key: list(values) for key, values in metrics.items()}
        saved_state = {name: getattr(self, name) for name in _LOSS_STATE if hasattr(self, name)}
        checkpointing = contextlib.nullcontext()
        if (self.args.gradient_checkpointing_kwargs or {}).get("use_reentrant"):
            checkpointing = disable_gradient_checkpointing(self.accelerator.unwrap_model(self.model),
                                                           self.args.gradient_checkpointing_kwargs)
        try:
            with torch.random.fork_rng(devices=devices), checkpointing:
                yield
        finally:
            metrics.clear()
            metrics.update(saved_metrics)
            for name, value in saved_state.items():
                setattr(self, name, value)

    def _ippo_filter(self, batches: list[dict[str, Any]]) -> None:
        """Scores every row of this process's micro-batches of one generation batch and rewrites their advantages in
        place (kept: x s_i / mean(kept s); dropped: 0); logs the ippo/* metrics; sets ``ippo_stopped`` per
        ``ippo_stop_rule`` (and ``ippo_stop_when_empty``)."""
        start = time.perf_counter()
        with self._ippo_isolated():
            val_grads = self._ippo_validation_direction()
            scores = self._ippo_scores(batches, val_grads)
        device = self.accelerator.device
        local = torch.cat(scores).to(device) if scores else torch.zeros(0, dtype=torch.float64, device=device)
        # reward signal: a non-zero advantage (TRL's batches hold no rewards or prompt groups, and a row whose
        # advantage is 0 gets no policy gradient whatever its group's rewards)
        signal = [b["advantages"].reshape(len(b["advantages"]), -1).ne(0).any(1) for b in batches]
        signal = torch.cat(signal).to(device) if signal else torch.zeros(0, dtype=torch.bool, device=device)
        # every process's rows, in process order (TRL gives every process a generation batch of the same size)
        gathered = torch.stack([local, signal.to(local.dtype)], 1)
        if self.accelerator.num_processes > 1:
            gathered = self.accelerator.gather(gathered)
        all_scores, all_signal = gathered[:, 0], gathered[:, 1].bool()
        result = ippo_filter(all_scores, self.ippo_tol, all_signal if self.ippo_stop_rule == "evidence" else None)
        mine = slice(self.accelerator.process_index * len(local), (self.accelerator.process_index + 1) * len(local))
        keep, weights = result.keep[mine], result.weights[mine]
        kept, rows, signal_rows = int(result.keep.sum()), all_scores.numel(), int(all_signal.sum())
        finite = all_scores.isfinite()  # a non-finite score (its loss overflowed) is dropped by ippo_filter
        positive, total = int((all_scores > 0).sum()), float(all_scores[finite].sum())
        self._ippo_skip_steps = kept == 0  # nothing kept: no optimizer step on this generation batch
        offset = 0
        for batch, batch_scores in zip(batches, scores):
            n = batch_scores.numel()
            advantages = batch["advantages"]
            shape = (n,) + (1,) * (advantages.dim() - 1)
            w, k = weights[offset:offset + n].view(shape), keep[offset:offset + n].view(shape)
            batch["advantages"] = torch.where(k, advantages * w.to(advantages.dtype), torch.zeros_like(advantages))
            offset += n
        self._ippo_decided(kept, rows, signal_rows, positive, total, int((~finite).sum()),
                           time.perf_counter() - start)

    def _ippo_decided(self, kept: int, rows: int, signal_rows: int, positive: int, total: float, nonfinite: int,
                      seconds: float) -> None:
        """Logs the ippo/* metrics of a generation batch's decision (counts over every process's rows; ``total``
        the sum of the finite scores) and applies the stop rule."""
        metrics = self._metrics["train"]
        metrics["ippo/kept_fraction"].append(kept / max(rows, 1.0))
        metrics["ippo/score_mean"].append(total / max(rows, 1.0))
        metrics["ippo/score_pos_frac"].append(positive / max(rows, 1.0))
        metrics["ippo/signal_fraction"].append(signal_rows / max(rows, 1.0))
        metrics["ippo/nonfinite_scores"].append(float(nonfinite))
        metrics["ippo/scoring_seconds"].append(seconds)
        if self.ippo_stop_rule == "paper":
            empty = kept == 0
        else:
            self._ippo_streak, empty = evidence_stop(self._ippo_streak, signal_rows > 0, kept > 0,
                                                     self.ippo_stop_patience)
        if empty and self.ippo_stop_when_empty:
            self.ippo_stopped = True
            logger.warning("I-PPO: no completion of the generation batch at step %d%s has an influence score above "
                           "ippo_tol=%g (%d rows, %d with reward signal, %d with a positive score); stopping training "
                           "without an update on it", self.state.global_step,
                           "" if self.ippo_stop_rule == "paper" else
                           f" (batch {self._ippo_streak} in a row with reward signal and nothing kept)",
                           self.ippo_tol, int(rows), int(signal_rows), int(positive))

    # ---- one backward ------------------------------------------------------------------------------------------

    def _ippo_fallback_reason(self) -> str | None:
        """None when the one-backward path applies (see the module docstring), else why the two-pass path runs."""
        args, loss_type = self.args, getattr(self, "loss_type", None)
        rloo = isinstance(self, RLOOTrainer)
        checks = [
            (not self.ippo_one_backward, "ippo_one_backward=False"),
            (self.num_iterations != 1, f"num_iterations={self.num_iterations} (the scores are those of the sampling "
                                       "policy, and TRL steps on the generation batch more than once)"),
            (args.steps_per_generation != args.gradient_accumulation_steps,
             f"steps_per_generation={args.steps_per_generation} differs from gradient_accumulation_steps="
             f"{args.gradient_accumulation_steps} (the generation batch must be one optimizer step)"),
            (not rloo and self.beta != 0, f"beta={self.beta} (GRPO's KL term does not scale with the advantage)"),
            (getattr(self, "_entropy_bonus_enabled", False), "an entropy bonus (it does not scale with the "
                                                             "advantage)"),
            (not rloo and loss_type not in _ONE_BACKWARD_LOSSES,
             f"loss_type={loss_type!r} (the one-backward path is verified for {_ONE_BACKWARD_LOSSES})"),
            (self.use_vllm, "use_vllm=True (vLLM generation is untested with it)"),
            (getattr(args, "use_liger_kernel", False), "use_liger_kernel=True (Liger's fused loss)"),
            (self.is_fsdp_enabled, "FSDP (the LoRA gradients are sharded)"),
            (self.is_deepspeed_enabled, "DeepSpeed (its engine runs the backward)"),
            (self.ippo_score == "deflated", "ippo_score='deflated' (it needs every row's sketch before any weight)"),
            (args.gradient_checkpointing and (args.gradient_checkpointing_kwargs or {}).get("use_reentrant"),
             "reentrant gradient checkpointing (torch.autograd.grad cannot run through it)"),
            (self.accelerator.scaler is not None, "fp16 loss scaling (its GradScaler would unscale gradients that "
                                                  "this path writes unscaled)"),
            (getattr(args.optim, "value", args.optim) in ("lomo", "adalomo"),
             f"optim={getattr(args.optim, 'value', args.optim)} (LOMO updates the weights inside the backward)"),
        ]
        return next((reason for failed, reason in checks if failed), None)

    def _ippo_choose_path(self) -> str | None:
        """Sets ``ippo_path`` ("one-backward" or "two-pass") from :meth:`_ippo_fallback_reason`; returns the reason."""
        reason = self._ippo_fallback_reason()
        self.ippo_path = "two-pass" if reason else "one-backward"
        return reason

    def _ippo_begin_batch(self) -> None:
        """One-backward path, at a new generation batch: V (as in the two-pass path) and fresh per-batch counts."""
        start = time.perf_counter()
        with self._ippo_isolated():
            self._ippo_val = self._ippo_validation_direction()
        self._ippo_params = [w for pair in self._ippo_lora_weights().values() for w in pair]  # looked up once
        self._ippo_counts = torch.zeros(len(_COUNTS), dtype=torch.float64, device=self.accelerator.device)
        self._ippo_micro_batches = 0
        self._ippo_seconds = time.perf_counter() - start

    def _ippo_one_backward(self, inputs: dict[str, Any]) -> torch.Tensor:
        """``compute_loss`` of the one-backward path: TRL's loss on one micro-batch, forward and backward once inside
        ``InfluenceScorer(episode_grads=True)``:
        the rows' scores s_i (scaled like the two-pass path's) and gradients G_i = dl_i/dtheta; this process's
        kept rows add sum_i [kept_i] c s_i G_i to the LoRA .grad (c = 1/accumulation if TRL's loss is not scaled
        for it, times 1/processes: what the Trainer's backward and DDP apply). At the last micro-batch of the
        generation batch (:meth:`_ippo_finish_batch`) the .grad are divided by the mean kept score of every
        process and all-reduced: sum_i [kept_i] c (s_i / mean kept s) G_i, the two-pass path's gradient."""
        model, params = self.accelerator.unwrap_model(self.model), self._ippo_params
        scale = (1.0 if self.loss_is_scaled_for_ga else 1.0 / self.current_gradient_accumulation_steps) \
            / self.accelerator.num_processes
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        rows = attention_mask.shape[0]
        with InfluenceScorer(model, self._ippo_val, segment_ids_from_mask(attention_mask), rows, lora_grads=False,
                             episode_grads=True) as scorer:
            with self.compute_loss_context_manager():
                loss = self._compute_loss(model, inputs)
            if loss.requires_grad:
                torch.autograd.grad(loss, params, allow_unused=True)
        start = time.perf_counter()
        scores = scorer.scores.to(torch.float64) * scale
        advantages = inputs["advantages"]
        signal = advantages.reshape(rows, -1).ne(0).any(1).to(scores.device)
        keep = ippo_filter(scores, self.ippo_tol, signal if self.ippo_stop_rule == "evidence" else None).keep
        if keep.any():  # dropped rows (a non-finite one included) are left out of the sum, not multiplied by 0
            # weights scale * s_i: s_i is already scaled (as kept_sum is, which _ippo_finish_batch divides by); the
            # second scale is the one the Trainer's backward and DDP would apply to row i's gradient
            weighted = scorer.weighted_gradient(torch.where(keep, scores * scale, 0.0))
            for param, grad in zip(params, [g for pair in weighted.values() for g in pair]):
                grad = grad.to(param.dtype)
                param.grad = grad if param.grad is None else param.grad.add_(grad)
        finite = scores.isfinite()
        counts = [keep.sum(), scores[keep].sum(), rows, signal.sum(), (scores > 0).sum(), scores[finite].sum(),
                  (~finite).sum()]  # in the order of _COUNTS
        self._ippo_counts += torch.tensor([float(c) for c in counts], dtype=torch.float64,
                                          device=self._ippo_counts.device)
        self._ippo_micro_batches += 1
        if self._ippo_micro_batches == self.args.steps_per_generation:
            self._ippo_finish_batch()
        self._ippo_seconds += time.perf_counter() - start
        # TRL's loss (of the unfiltered advantages) for the Trainer's logs, as a leaf: its backward() does nothing
        return loss.detach().requires_grad_()

    def _ippo_finish_batch(self) -> None:
        """One-backward path, after the generation batch's last micro-batch (before clipping and the optimizer
        step): the counts of every process (one all-reduce), the .grad divided by the mean kept score and summed
        over processes (one all-reduce of the LoRA gradients: DDP's own reduction never ran), the metrics and the
        stop; nothing kept anywhere: no .grad and no optimizer step."""
        self._ippo_micro_batches = 0
        processes = self.accelerator.num_processes
        counts = self.accelerator.reduce(self._ippo_counts, reduction="sum") if processes > 1 else self._ippo_counts
        kept, kept_sum, rows, signal_rows, positive, total, nonfinite = counts.tolist()
        params = self._ippo_params
        if kept:
            grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
            flat = torch.cat([g.reshape(-1) for g in grads]) / (kept_sum / kept)
            if processes > 1:
                flat = self.accelerator.reduce(flat, reduction="sum")
            for param, grad in zip(params, torch.split(flat, [p.numel() for p in params])):
                param.grad = grad.view_as(param)
        self._ippo_skip_steps = not kept
        self._ippo_decided(int(kept), int(rows), int(signal_rows), int(positive), total, int(nonfinite),
                           self._ippo_seconds)

    # ---- checkpoints ---------------------------------------------------------------------------------------------

    def train(self, *args, **kwargs):
        # a fresh I-PPO state; a resume then restores the checkpoint's (_load_callback_state)
        self.ippo_stopped, self._ippo_streak, self._ippo_draws, self._ippo_skip_steps = False, 0, 0, False
        self._ippo_micro_batches, self._ippo_batches, self._ippo_raw_val = 0, 0, None
        reason = self._ippo_choose_path()
        if reason is None:
            logger.info("I-PPO: one-backward path (the scores and the filtered update from TRL's own backward)")
        else:
            log = logger.info if reason == "ippo_one_backward=False" else logger.warning
            log("I-PPO: two-pass path (a scoring forward+backward before TRL's): %s", reason)
        return super().train(*args, **kwargs)

    def _load_callback_state(self) -> None:
        """On resume: restores the I-PPO state from the checkpoint's trainer_state.json (always: it is the run's
        state, like the optimizer's, not an optional callback setting), then lets the Trainer restore the other
        callbacks (``restore_callback_states_from_checkpoint``) without re-creating this trainer's own."""
        name, saved = _IPPOStopCallback.__name__, self.state.stateful_callbacks
        attributes = saved[name].get("attributes", {}) if isinstance(saved.get(name), dict) else {}
        if set(attributes) >= set(_SAVED_STATE) - {"_ippo_batches"}:
            for key in _SAVED_STATE:
                setattr(self, key, attributes.get(key, attributes["_ippo_draws"]))
        else:
            logger.warning("I-PPO: the checkpoint holds no I-PPO state (saved by an older version?); the stop rule's "
                           "streak and the validation draws start afresh")
        if self.ippo_stopped and not self.ippo_stop_when_empty:
            logger.warning("I-PPO: the run had stopped at this checkpoint (intrinsic stop, global step %d); "
                           "ippo_stop_when_empty=False: training on", self.state.global_step)
            self.ippo_stopped = False
        elif self.ippo_stopped:
            logger.warning("I-PPO: the run had stopped at this checkpoint (intrinsic stop, global step %d: no "
                           "completion kept, ippo_stop_rule=%r); resuming does not train further (ippo_stop_when_empty"
                           "=False would train on)", self.state.global_step, self.ippo_stop_rule)
        self.state.stateful_callbacks = {k: v for k, v in saved.items() if k != name}
        try:
            super()._load_callback_state()
        finally:
            self.state.stateful_callbacks = {**saved, name: {"args": {}, "attributes": self._ippo_saved_state()}}

    def _ippo_saved_state(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _SAVED_STATE}

    def _run_epoch(self, *args, **kwargs):
        if self.ippo_stopped:  # resumed from the checkpoint of a stopped run: no step, straight to the end of training
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    # ---- TRL hooks ---------------------------------------------------------------------------------------------

    def _prepare_inputs(self, generation_batch):
        if not self.model.training:
            return super()._prepare_inputs(generation_batch)
        previous = self._buffered_inputs
        inputs = super()._prepare_inputs(generation_batch)
        if self._buffered_inputs is not previous:  # TRL generated, scored, shuffled and split a new generation batch
            if self.ippo_path == "one-backward":
                self._ippo_begin_batch()
            else:
                self._ippo_filter(self._buffered_inputs)
        return inputs  # one of the buffered micro-batches (two-pass: with rewritten advantages)

    def training_step(self, model, inputs, num_items_in_batch):
        if self.ippo_stopped:  # the rest of the accumulation window in which the stop was decided
            return torch.zeros((), device=self.args.device)
        return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.ippo_stopped and self.model.training:  # the micro-batch on which the stop was decided
            return torch.zeros((), device=self.accelerator.device, requires_grad=True)
        if self.ippo_path == "one-backward" and self.model.training:  # forward and backward run here
            return self._ippo_one_backward(inputs)
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)


class IPPOGRPOTrainer(_IPPOMixin, GRPOTrainer):
    """TRL's ``GRPOTrainer`` with the I-PPO filter: keeps a completion only if its influence score on the validation
    loss is above ``ippo_tol``, weights the kept ones by score / mean kept score, stops when none is kept
    (``ippo_stop_rule``).

    ``args`` must be an :class:`IPPOConfig` (TRL's ``GRPOConfig`` plus the I-PPO settings; a plain ``GRPOConfig``
    or none is a ValueError): ``ippo_val_size`` (pairs per generation batch, default 64), ``ippo_tol`` (default 0.0),
    ``ippo_stop_rule`` ("evidence" or "paper"), ``ippo_stop_patience`` (default 2), ``ippo_stop_when_empty``
    (default True, a bool), ``ippo_score`` ("raw", default; "answer": V of the final answers after ``####``, every
    validation completion must have one, else a ValueError naming ``validation_dataset`` and the row at
    construction; "adam": V preconditioned by the optimizer's second moment; "deflated": minus the generation
    batch's top ``ippo_deflate_top`` (1) gradient directions from ``ippo_deflate_dim``-wide (4096, a multiple of 2r)
    sketches; "centred" is refused: TRL's micro-batches carry no prompt groups), ``ippo_one_backward`` (default
    True). The constructor keywords of earlier versions (``ippo_val_size=...`` etc.) were removed: passing one is a
    TypeError that says to set it on the config.

    Extra keyword argument (everything else is ``GRPOTrainer``'s): ``validation_dataset`` (a ``datasets.Dataset`` or
    a list of rows with ``prompt`` and ``completion``, the gold answers; every row is checked at construction, the
    completion cut to ``max_completion_length`` tokens, the prompt to ``max_prompt_length`` if the config has one).
    See ``ippo.integrations.trl``'s docstring.
    """

    _tag_names = ["trl", "grpo", "ippo"]
    _ippo_config_class = IPPOConfig


class IPPORLOOTrainer(_IPPOMixin, RLOOTrainer):
    """TRL's ``RLOOTrainer`` with the I-PPO filter; ``args`` must be an :class:`IPPORLOOConfig` (TRL's ``RLOOConfig``
    plus the same ``ippo_*`` fields as :class:`IPPOConfig`), and the same ``validation_dataset`` as
    :class:`IPPOGRPOTrainer`."""

    _tag_names = ["trl", "rloo", "ippo"]
    _ippo_config_class = IPPORLOOConfig
