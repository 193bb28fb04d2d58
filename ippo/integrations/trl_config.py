"""``IPPOConfig`` and ``IPPORLOOConfig``: TRL's ``GRPOConfig`` and ``RLOOConfig`` with the I-PPO settings, the
``ippo_*`` fields of :class:`IPPOArguments`, for ``IPPOGRPOTrainer`` and ``IPPORLOOTrainer`` (``ippo.integrations.trl``
re-exports both; see its docstring for what each setting does).

The fields are declared as TRL declares its own (``field(default=..., metadata={"help": ...})``), so they are part of
the training arguments everywhere TRL and transformers take them: ``to_dict()`` / ``to_json_string()`` (hence the
``training_args.bin`` of every checkpoint and the ``report_to`` backends' config), and ``TrlParser`` /
``HfArgumentParser`` (``--ippo_val_size 8``, or ``ippo_val_size: 8`` in a ``--config`` YAML file). Each is checked in
``__post_init__`` (after TRL's own checks): a ValueError names the field.
"""

import math
import numbers
from dataclasses import dataclass, field, fields

from trl import GRPOConfig, RLOOConfig

from ippo.train.config import MAX_SKETCH_DIM, SCORES, STOP_RULES

__all__ = ["IPPOArguments", "IPPOConfig", "IPPORLOOConfig", "IPPO_FIELDS", "TRL_SCORES"]

# The in-house trainer's --score variants that TRL can take: "centred" needs each completion's prompt group, which
# TRL's shuffled micro-batches do not carry (refused, see ippo.integrations.trl's docstring).
TRL_SCORES = tuple(score for score in SCORES if score != "centred")


def _integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass
class IPPOArguments:
    """The I-PPO settings shared by :class:`IPPOConfig` and :class:`IPPORLOOConfig` (a mixin: it comes before TRL's
    config in their bases, so its fields come after TRL's and its ``__post_init__`` runs TRL's first).

    Parameters:
        ippo_val_size (`int`, *optional*, defaults to `64`):
            Validation pairs drawn (without replacement) per generation batch for the validation gradient; all of
            them if the validation set is smaller.
        ippo_val_every (`int`, *optional*, defaults to `1`):
            Compute the validation gradient at every `ippo_val_every`-th generation batch and score the batches in
            between against it (a V up to `ippo_val_every - 1` optimizer steps old; `"adam"`'s preconditioner is
            applied fresh at every batch). 1 (the paper): a fresh V at every generation batch. V costs a
            forward+backward of the `ippo_val_size` pairs; this divides that cost by `ippo_val_every`.
        ippo_tol (`float`, *optional*, defaults to `0.0`):
            A completion is kept when its influence score is above this (a finite number >= 0).
        ippo_stop_rule (`str`, *optional*, defaults to `"evidence"`):
            Intrinsic stop: `"evidence"` stops after `ippo_stop_patience` generation batches in a row that carry
            reward signal and keep none of it; `"paper"` at the first generation batch of which nothing is kept.
        ippo_stop_patience (`int`, *optional*, defaults to `2`):
            The evidence rule's number of batches.
        ippo_stop_when_empty (`bool`, *optional*, defaults to `True`):
            Whether to stop training by `ippo_stop_rule`; False trains on.
        ippo_score (`str`, *optional*, defaults to `"raw"`):
            The influence score: `"raw"`, `"answer"`, `"adam"` or `"deflated"` (the in-house trainer's `--score`);
            `"centred"` is refused (TRL's micro-batches carry no prompt groups).
        ippo_deflate_top (`int`, *optional*, defaults to `1`):
            `ippo_score="deflated"`: the number of shared gradient directions removed.
        ippo_deflate_dim (`int`, *optional*, defaults to `4096`):
            `ippo_score="deflated"`: the sketch width, in [1, 2**24] and a multiple of 2r for every LoRA rank r (that
            is checked by the trainer, which knows the ranks).
        ippo_one_backward (`bool`, *optional*, defaults to `True`):
            Take the scores and the filtered update from TRL's own backward when its conditions hold (see
            ``ippo.integrations.trl``'s docstring); False: always the two-pass path (a scoring forward+backward
            before TRL's).
    """

    ippo_val_size: int = field(
        default=64,
        metadata={"help": "Validation pairs (gold prompt/completion) drawn per generation batch for the validation "
                          "gradient; all of them if the validation set is smaller."},
    )
    ippo_val_every: int = field(
        default=1,
        metadata={"help": "Compute the validation gradient V at every k-th generation batch and score the batches in "
                          "between against it (V up to k-1 optimizer steps old; 'adam' preconditions it afresh at "
                          "every batch); 1 (the paper): a fresh V per generation batch. Divides V's cost (a "
                          "forward+backward of ippo_val_size pairs) by k."},
    )
    ippo_tol: float = field(
        default=0.0,
        metadata={"help": "Keep a completion when its influence score is above this (a finite number >= 0)."},
    )
    ippo_stop_rule: str = field(
        default="evidence",
        metadata={"help": "Intrinsic stop: 'evidence' stops after ippo_stop_patience generation batches in a row "
                          "that carry reward signal and keep none of it; 'paper' at the first generation batch of "
                          "which nothing is kept.",
                  "choices": list(STOP_RULES)},
    )
    ippo_stop_patience: int = field(
        default=2,
        metadata={"help": "The evidence stop rule's number of generation batches (>= 1)."},
    )
    ippo_stop_when_empty: bool = field(
        default=True,
        metadata={"help": "Stop training by ippo_stop_rule; False trains on whatever is kept."},
    )
    ippo_score: str = field(
        default="raw",
        metadata={"help": f"The influence score, one of {TRL_SCORES} (the in-house trainer's --score): 'answer' takes "
                          "the validation gradient of the final answers after '####', 'adam' preconditions it with "
                          "the optimizer's second moment, 'deflated' removes the generation batch's shared gradient "
                          "directions. 'centred' is refused: TRL's micro-batches carry no prompt groups."},
    )
    ippo_deflate_top: int = field(
        default=1,
        metadata={"help": "ippo_score='deflated': the number of shared gradient directions removed (>= 1)."},
    )
    ippo_deflate_dim: int = field(
        default=4096,
        metadata={"help": "ippo_score='deflated': the sketch width, in [1, 2**24] and a multiple of 2r for every "
                          "LoRA rank r."},
    )
    ippo_one_backward: bool = field(
        default=True,
        metadata={"help": "Take the scores and the filtered update from TRL's own backward when its conditions hold "
                          "(num_iterations=1, steps_per_generation == gradient_accumulation_steps, beta=0, no "
                          "entropy bonus, loss_type grpo/dapo/bnpo/dr_grpo or RLOO, no vLLM, Liger, FSDP, DeepSpeed, "
                          "reentrant gradient checkpointing, fp16 loss scaling or LOMO, ippo_score != 'deflated'); "
                          "False: always the two-pass path (a scoring forward+backward before TRL's). The path taken "
                          "and the reason for a fallback are logged once (trainer.ippo_path)."},
    )

    def __post_init__(self):
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:  # TRL's config (and TrainingArguments) first
            parent()
        self._ippo_check()

    def _ippo_check(self) -> None:
        """ValueError naming the first ``ippo_*`` field whose value is not allowed; normalizes the numbers to plain
        ``int`` / ``float`` (JSON-serializable). The trainers run it again on the config they are given."""
        name = type(self).__name__
        if not _integer(self.ippo_val_size) or self.ippo_val_size < 1:
            raise ValueError(f"{name}: ippo_val_size must be an int >= 1; got {self.ippo_val_size!r}")
        if not _integer(self.ippo_val_every) or self.ippo_val_every < 1:
            raise ValueError(f"{name}: ippo_val_every must be an int >= 1; got {self.ippo_val_every!r}")
        tol = self.ippo_tol
        if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not math.isfinite(tol) or tol < 0:
            raise ValueError(f"{name}: ippo_tol must be a finite number >= 0 (kept rows are weighted by s_i / mean of "
                             f"the kept scores, which needs positive kept scores); got {tol!r}")
        if not isinstance(self.ippo_stop_rule, str) or self.ippo_stop_rule not in STOP_RULES:
            raise ValueError(f"{name}: ippo_stop_rule must be one of {STOP_RULES}; got {self.ippo_stop_rule!r}")
        if not _integer(self.ippo_stop_patience) or self.ippo_stop_patience < 1:
            raise ValueError(f"{name}: ippo_stop_patience must be an int >= 1; got {self.ippo_stop_patience!r}")
        if not isinstance(self.ippo_stop_when_empty, bool):
            raise ValueError(f"{name}: ippo_stop_when_empty must be True or False; got {self.ippo_stop_when_empty!r}")
        if self.ippo_score == "centred":
            raise ValueError(f"{name}: ippo_score='centred' is not supported in TRL: it subtracts the mean over each "
                             "completion's prompt group, and TRL shuffles the generation batch before splitting it "
                             "into micro-batches and keeps no group ids; use the in-house trainer (ippo --score "
                             f"centred), or one of {TRL_SCORES}")
        if not isinstance(self.ippo_score, str) or self.ippo_score not in TRL_SCORES:
            raise ValueError(f"{name}: ippo_score must be one of {TRL_SCORES}; got {self.ippo_score!r}")
        if not _integer(self.ippo_deflate_top) or self.ippo_deflate_top < 1:
            raise ValueError(f"{name}: ippo_deflate_top must be an int >= 1; got {self.ippo_deflate_top!r}")
        if not _integer(self.ippo_deflate_dim) or not 1 <= self.ippo_deflate_dim <= MAX_SKETCH_DIM:
            raise ValueError(f"{name}: ippo_deflate_dim must be an int in [1, 2**24] (a multiple of 2r for every LoRA "
                             f"rank r); got {self.ippo_deflate_dim!r}")
        if not isinstance(self.ippo_one_backward, bool):
            raise ValueError(f"{name}: ippo_one_backward must be True or False; got {self.ippo_one_backward!r}")
        self.ippo_val_size, self.ippo_tol = int(self.ippo_val_size), float(self.ippo_tol)
        self.ippo_val_every = int(self.ippo_val_every)
        self.ippo_stop_patience, self.ippo_deflate_top = int(self.ippo_stop_patience), int(self.ippo_deflate_top)
        self.ippo_deflate_dim = int(self.ippo_deflate_dim)


# The I-PPO fields, in declaration order (the trainers refuse them as constructor keywords).
IPPO_FIELDS = tuple(f.name for f in fields(IPPOArguments))


@dataclass
class IPPOConfig(IPPOArguments, GRPOConfig):
    r"""Configuration class for ``IPPOGRPOTrainer``: TRL's ``GRPOConfig`` (every field of it, unchanged) plus the I-PPO
    settings of :class:`IPPOArguments` (``ippo_val_size``, ``ippo_val_every``, ``ippo_tol``, ``ippo_stop_rule``,
    ``ippo_stop_patience``, ``ippo_stop_when_empty``, ``ippo_score``, ``ippo_deflate_top``, ``ippo_deflate_dim``,
    ``ippo_one_backward``),
    each checked at construction (a ValueError names the field). ``HfArgumentParser`` / ``TrlParser`` take them as
    ``--ippo_*`` arguments or ``ippo_*`` keys of a YAML config.

    >>> IPPOConfig(output_dir="out", ippo_val_size=8, ippo_score="answer")  # doctest: +SKIP
    """


@dataclass
class IPPORLOOConfig(IPPOArguments, RLOOConfig):
    r"""Configuration class for ``IPPORLOOTrainer``: TRL's ``RLOOConfig`` (every field of it, unchanged) plus the same
    I-PPO settings as :class:`IPPOConfig` (:class:`IPPOArguments`)."""
