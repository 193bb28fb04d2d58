"""ippo.integrations.trl: what the trainers check at construction (issue 18): every validation row and the truncation
of long validation rows to the trainer's max lengths; and the I-PPO settings, the ``ippo_*`` fields of ``IPPOConfig``
/ ``IPPORLOOConfig`` (issue 20, item 3): each field's check, the removed constructor keywords, the config the
trainers require, the fields in the saved arguments and in ``TrlParser`` (command line and YAML)."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from _trl_tiny import (  # noqa: F401 (one_thread: autouse)
    VALIDATION,
    config,
    make_trainer,
    one_thread,
    reward,
    tiny_model,
    tokenizer,
    train_dataset,
    validation_dataset,
)
from datasets import Dataset
from trl import GRPOConfig, RLOOConfig, TrlParser

from ippo.integrations.trl import IPPOConfig, IPPOGRPOTrainer, IPPORLOOConfig, IPPORLOOTrainer
from ippo.integrations.trl_config import IPPO_FIELDS

CHAT = [{"role": "user", "content": "1+1?"}]
GOOD = [dict(VALIDATION[i % len(VALIDATION)]) for i in range(40)]


def rows_with(index: int, row) -> list:
    rows = list(GOOD)
    rows[index] = row
    return rows


@pytest.mark.parametrize("validation, match", [
    (rows_with(37, {"prompt": "1+1="}), r"validation_dataset row 37 must have 'prompt' and 'completion'"),
    (Dataset.from_list(rows_with(37, {"prompt": "1+1=", "completion": None})),
     r"validation_dataset row 37: .*NoneType"),
    (rows_with(37, {"prompt": "1+1=", "completion": 2}), r"validation_dataset row 37: .*int"),
    (rows_with(5, "1+1=2"), r"validation_dataset row 5 must .*got str"),
    (rows_with(0, {"prompt": "1+1=", "completion": ""}), r"validation_dataset row 0: the completion is empty"),
    (rows_with(3, {"prompt": "1+1=", "completion": "  "}), r"validation_dataset row 3: the completion is empty"),
    (rows_with(2, {"prompt": "", "completion": "2"}), r"validation_dataset row 2: the prompt is empty"),
    (rows_with(0, {"prompt": CHAT, "completion": []}), r"validation_dataset row 0: the completion is empty"),
    (rows_with(1, {"prompt": CHAT, "completion": [{"role": "assistant", "content": ""}]}),
     r"validation_dataset row 1: the completion is empty"),
    (rows_with(1, {"prompt": [], "completion": "2"}), r"validation_dataset row 1: the prompt is empty"),
    (rows_with(4, {"prompt": CHAT, "completion": None}), r"validation_dataset row 4: .*NoneType"),
    ({"prompt": ["1+1="], "completion": ["2"]}, r"validation_dataset is a dict.*Dataset.from_dict"),
    ("1+1=2", r"validation_dataset must be a datasets.Dataset or a list of rows.*got str"),
    ([], r"validation_dataset is empty"),
], ids=["row37-missing-key", "row37-dataset-null-completion", "row37-int-completion", "row5-not-a-dict",
        "empty-completion", "blank-completion", "empty-prompt", "chat-completion-no-messages",
        "chat-completion-empty-content", "chat-prompt-no-messages", "none-completion", "dict-of-columns", "string",
        "empty"])
def test_every_validation_row_is_checked_at_construction(tmp_path, validation, match):
    with pytest.raises(ValueError, match=match) as error:
        make_trainer(IPPOGRPOTrainer, tmp_path, validation_dataset=validation)
    assert "\n" not in str(error.value)


# ---- IPPOConfig / IPPORLOOConfig ------------------------------------------------------------------------------

DEFAULTS = dict(ippo_val_size=64, ippo_val_every=1, ippo_tol=0.0, ippo_stop_rule="evidence", ippo_stop_patience=2,
                ippo_stop_when_empty=True, ippo_score="raw", ippo_deflate_top=1, ippo_deflate_dim=4096,
                ippo_one_backward=True)
# every field's bad values, with what the error says beyond the field's name
BAD = [
    ("ippo_val_size", 0, "int >= 1"), ("ippo_val_size", -3, "int >= 1"), ("ippo_val_size", "4", "int >= 1"),
    ("ippo_val_size", 4.0, "int >= 1"), ("ippo_val_size", True, "int >= 1"), ("ippo_val_size", None, "int >= 1"),
    ("ippo_val_every", 0, "int >= 1"), ("ippo_val_every", 2.0, "int >= 1"), ("ippo_val_every", True, "int >= 1"),
    ("ippo_val_every", "2", "int >= 1"),
    ("ippo_tol", -0.1, "finite number >= 0"), ("ippo_tol", math.inf, "finite number >= 0"),
    ("ippo_tol", math.nan, "finite number >= 0"), ("ippo_tol", "0", "finite number >= 0"),
    ("ippo_tol", False, "finite number >= 0"),
    ("ippo_stop_rule", "never", r"one of \('evidence', 'paper'\)"), ("ippo_stop_rule", ["evidence"], "one of"),
    ("ippo_stop_rule", None, "one of"),
    ("ippo_stop_patience", 0, "int >= 1"), ("ippo_stop_patience", 1.5, "int >= 1"),
    ("ippo_stop_patience", True, "int >= 1"), ("ippo_stop_patience", "2", "int >= 1"),
    ("ippo_stop_when_empty", "False", "True or False"), ("ippo_stop_when_empty", 0, "True or False"),
    ("ippo_stop_when_empty", None, "True or False"),
    ("ippo_score", "cosine", r"one of \('raw', 'answer', 'adam', 'deflated'\)"), ("ippo_score", None, "one of"),
    ("ippo_score", ["raw"], "one of"),
    ("ippo_score", "centred", r"='centred' is not supported in TRL: .*shuffles.*in-house trainer"),
    ("ippo_deflate_top", 0, "int >= 1"), ("ippo_deflate_top", 1.0, "int >= 1"), ("ippo_deflate_top", True, "int >= 1"),
    ("ippo_deflate_top", "2", "int >= 1"),
    ("ippo_deflate_dim", 0, r"int in \[1, 2\*\*24\]"), ("ippo_deflate_dim", 8.0, "int in"),
    ("ippo_deflate_dim", "8", "int in"), ("ippo_deflate_dim", 2**25, r"int in \[1, 2\*\*24\]"),
    ("ippo_one_backward", "True", "True or False"), ("ippo_one_backward", 1, "True or False"),
    ("ippo_one_backward", None, "True or False"),
]


def test_every_field_has_bad_values_below():
    assert IPPO_FIELDS == tuple(DEFAULTS) and {field for field, _, _ in BAD} == set(IPPO_FIELDS)


@pytest.mark.parametrize("config_cls", [IPPOConfig, IPPORLOOConfig])
def test_config_fields_and_defaults(tmp_path, config_cls):
    args = config(tmp_path, cls=config_cls)
    assert {k: getattr(args, k) for k in DEFAULTS} == DEFAULTS
    assert isinstance(args, GRPOConfig if config_cls is IPPOConfig else RLOOConfig)
    assert args.learning_rate == 1e-2 and args.max_completion_length == 4  # TRL's own fields, as given
    # the ippo_* fields come after TRL's (the first positional argument is still output_dir)
    names = [f.name for f in dataclasses.fields(config_cls)]
    assert names[-len(IPPO_FIELDS):] == list(IPPO_FIELDS) and config_cls(str(tmp_path), use_cpu=True).output_dir == str(
        tmp_path)
    # numbers are normalized to plain int / float (numpy's are not JSON-serializable)
    args = config(tmp_path, cls=config_cls, ippo_val_size=np.int64(8), ippo_tol=1)
    assert type(args.ippo_val_size) is int and type(args.ippo_tol) is float and args.ippo_tol == 1.0


@pytest.mark.parametrize("config_cls", [IPPOConfig, IPPORLOOConfig])
@pytest.mark.parametrize("field, value, match", BAD, ids=[f"{f}={v!r}" for f, v, _ in BAD])
def test_config_fields_are_checked(tmp_path, config_cls, field, value, match):
    with pytest.raises(ValueError, match=rf"^{config_cls.__name__}: {field}.*{match}") as error:
        config(tmp_path, cls=config_cls, **{field: value})
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("trainer_cls, config_cls", [(IPPOGRPOTrainer, IPPOConfig), (IPPORLOOTrainer, IPPORLOOConfig)])
def test_trainer_reads_the_config(tmp_path, trainer_cls, config_cls):
    settings = dict(ippo_val_size=3, ippo_val_every=3, ippo_tol=0.25, ippo_stop_rule="paper", ippo_stop_patience=5,
                    ippo_stop_when_empty=False, ippo_score="deflated", ippo_deflate_top=2, ippo_deflate_dim=8,
                    ippo_one_backward=False)
    trainer = make_trainer(trainer_cls, tmp_path, **settings)
    assert type(trainer.args) is config_cls
    assert {k: getattr(trainer, k) for k in settings} == settings == {k: getattr(trainer.args, k) for k in settings}
    # the config is checked again by the trainer: a field set after the config's construction
    args = config(tmp_path, cls=config_cls)
    args.ippo_tol = -1.0
    with pytest.raises(ValueError, match=rf"{config_cls.__name__}: ippo_tol must be a finite number >= 0"):
        trainer_cls(model=trainer.model, reward_funcs=reward, args=args, train_dataset=train_dataset(),
                    processing_class=trainer.processing_class, validation_dataset=validation_dataset())


@pytest.mark.parametrize("trainer_cls, config_cls", [(IPPOGRPOTrainer, IPPOConfig), (IPPORLOOTrainer, IPPORLOOConfig)])
def test_old_keywords_are_refused(tmp_path, trainer_cls, config_cls):
    tok = tokenizer()
    common = dict(model=tiny_model(tok), reward_funcs=reward, args=config(tmp_path, cls=config_cls),
                  train_dataset=train_dataset(), processing_class=tok, validation_dataset=validation_dataset())
    for field in IPPO_FIELDS:
        with pytest.raises(TypeError, match=rf"{trainer_cls.__name__}: the keyword argument\(s\) {field} were "
                                            rf"removed from the trainer: set them on the config, "
                                            rf"args={config_cls.__name__}\(\.\.\., {field}=\.\.\.\)"):
            trainer_cls(**common, **{field: DEFAULTS[field]})
    with pytest.raises(TypeError, match=r"ippo_val_size, ippo_tol were removed.*ippo_val_size=\.\.\., ippo_tol=\.\.\."):
        trainer_cls(**common, ippo_val_size=8, ippo_tol=0.0)


@pytest.mark.parametrize("trainer_cls, config_cls, plain_cls, other_cls", [
    (IPPOGRPOTrainer, IPPOConfig, GRPOConfig, IPPORLOOConfig),
    (IPPORLOOTrainer, IPPORLOOConfig, RLOOConfig, IPPOConfig),
], ids=["grpo", "rloo"])
def test_plain_trl_config_is_refused(tmp_path, trainer_cls, config_cls, plain_cls, other_cls):
    tok = tokenizer()
    model = tiny_model(tok)
    common = dict(reward_funcs=reward, train_dataset=train_dataset(), processing_class=tok,
                  validation_dataset=validation_dataset())
    trl_name = plain_cls.__name__
    for args, got in [(config(tmp_path, cls=plain_cls), trl_name), (None, "None"),
                      (config(tmp_path, cls=other_cls), other_cls.__name__)]:
        match = (rf"^{trainer_cls.__name__}: args must be an {config_cls.__name__} \(TRL's {trl_name} with the I-PPO "
                 rf"settings, the ippo_\* fields: from ippo.integrations.trl import {config_cls.__name__}.*got {got}$")
        with pytest.raises(ValueError, match=match):
            trainer_cls(model=model, args=args, **common)
        if args is not None:  # args passed by position too (model, reward_funcs, args)
            with pytest.raises(ValueError, match=match):
                trainer_cls(model, common["reward_funcs"], args, **{k: v for k, v in common.items()
                                                                      if k != "reward_funcs"})
        if args is None:  # and left out
            with pytest.raises(ValueError, match=match):
                trainer_cls(model=model, **common)
    # an IPPOConfig by position is taken
    trainer = trainer_cls(model, reward, config(tmp_path, cls=config_cls, ippo_val_size=3),
                          **{k: v for k, v in common.items() if k != "reward_funcs"})
    assert trainer.ippo_val_size == 3


@pytest.mark.parametrize("config_cls", [IPPOConfig, IPPORLOOConfig])
def test_fields_are_saved_with_the_arguments(tmp_path, config_cls):
    settings = dict(ippo_val_size=8, ippo_val_every=2, ippo_tol=0.5, ippo_stop_rule="paper", ippo_stop_patience=3,
                    ippo_stop_when_empty=False, ippo_score="answer", ippo_deflate_top=2, ippo_deflate_dim=16,
                    ippo_one_backward=False)
    args = config(tmp_path, cls=config_cls, **settings)
    assert {k: args.to_dict()[k] for k in IPPO_FIELDS} == settings
    assert {k: json.loads(args.to_json_string())[k] for k in IPPO_FIELDS} == settings
    assert {k: args.to_sanitized_dict()[k] for k in IPPO_FIELDS} == settings  # what report_to backends log
    # the training_args.bin that the Trainer writes with the model (and into every checkpoint)
    trainer = make_trainer(IPPOGRPOTrainer if config_cls is IPPOConfig else IPPORLOOTrainer, tmp_path / "run",
                           **{**settings, "ippo_score": "raw"})
    trainer.save_model(str(tmp_path / "saved"))
    saved = torch.load(tmp_path / "saved" / "training_args.bin", weights_only=False)
    assert type(saved) is config_cls
    assert {k: getattr(saved, k) for k in IPPO_FIELDS} == {**settings, "ippo_score": "raw"}


@pytest.mark.parametrize("config_cls", [IPPOConfig, IPPORLOOConfig])
def test_trl_parser_command_line_and_yaml(tmp_path, config_cls):
    parser = TrlParser((config_cls,))
    command_line = ["--output_dir", str(tmp_path), "--use_cpu", "--ippo_val_size", "8", "--ippo_val_every", "4",
                    "--ippo_score", "answer",
                    "--ippo_tol", "1e-3", "--ippo_stop_rule", "paper", "--ippo_stop_patience", "3",
                    "--ippo_stop_when_empty", "false", "--ippo_deflate_top", "2", "--ippo_deflate_dim", "16",
                    "--no_ippo_one_backward"]
    (args,) = parser.parse_args_and_config(command_line)
    want = dict(ippo_val_size=8, ippo_val_every=4, ippo_tol=1e-3, ippo_stop_rule="paper", ippo_stop_patience=3,
                ippo_stop_when_empty=False, ippo_score="answer", ippo_deflate_top=2, ippo_deflate_dim=16,
                ippo_one_backward=False)
    assert type(args) is config_cls and {k: getattr(args, k) for k in IPPO_FIELDS} == want
    (args,) = parser.parse_args_and_config(["--output_dir", str(tmp_path), "--use_cpu"])
    assert {k: getattr(args, k) for k in IPPO_FIELDS} == DEFAULTS
    # a YAML config file, the command line overriding it
    path = tmp_path / "config.yaml"
    path.write_text(f"output_dir: {tmp_path}\nuse_cpu: true\nippo_val_size: 16\nippo_val_every: 2\nippo_tol: 0.25\n"
                    "ippo_stop_rule: paper\nippo_stop_when_empty: false\nippo_score: deflated\nippo_deflate_dim: 8\n"
                    "ippo_one_backward: false\n")
    (args,) = parser.parse_args_and_config(["--config", str(path), "--ippo_deflate_top", "3"])
    assert {k: getattr(args, k) for k in IPPO_FIELDS} == {**DEFAULTS, "ippo_val_size": 16, "ippo_val_every": 2,
                                                          "ippo_tol": 0.25,
                                                          "ippo_stop_rule": "paper", "ippo_stop_when_empty": False,
                                                          "ippo_score": "deflated", "ippo_deflate_dim": 8,
                                                          "ippo_deflate_top": 3, "ippo_one_backward": False}
    # a bad value in the YAML file is the config's ValueError; on the command line, argparse's choices
    path.write_text(f"output_dir: {tmp_path}\nuse_cpu: true\nippo_score: centred\n")
    with pytest.raises(ValueError, match=rf"{config_cls.__name__}: ippo_score='centred' is not supported in TRL"):
        parser.parse_args_and_config(["--config", str(path)])
    with pytest.raises(SystemExit):
        parser.parse_args_and_config(["--output_dir", str(tmp_path), "--ippo_stop_rule", "never"])


@dataclass
class PromptCappedGRPOConfig(IPPOConfig):
    """A config with TRL's (pre-1.0, and other trainers') ``max_prompt_length``: GRPO in TRL 1.16 has none."""

    max_prompt_length: int | None = None


def test_long_validation_rows_are_truncated(tmp_path):
    tok = tokenizer()
    prompt, completion = "1+" * 1500, "2" * 3000  # 3000 characters each: 3000 tokens of the character tokenizer
    chat = [{"role": "user", "content": prompt}]
    rows = [{"prompt": prompt, "completion": completion}, {"prompt": chat, "completion": completion},
            {"prompt": chat, "completion": [{"role": "assistant", "content": completion}]}]
    full = [tok(text=prompt)["input_ids"], tok.apply_chat_template(chat, add_generation_prompt=True)["input_ids"]]
    full.append(full[1])
    # TRL 1.16's GRPO does not truncate prompts: neither are the validation prompts; completions are cut to
    # max_completion_length, as generation cuts them
    trainer = make_trainer(IPPOGRPOTrainer, tmp_path, tok=tok, validation_dataset=rows, max_completion_length=5)
    for index in range(3):
        prompt_ids, completion_ids = trainer._ippo_val_pair(index)
        assert prompt_ids == list(full[index]) and len(prompt_ids) >= 3000
        assert completion_ids == tok(text="22222", add_special_tokens=False)["input_ids"]
    # with a max_prompt_length in the config, prompts keep their last max_prompt_length tokens (TRL's left cut)
    trainer = make_trainer(IPPOGRPOTrainer, tmp_path, tok=tok, validation_dataset=rows, max_completion_length=5,
                           config_cls=PromptCappedGRPOConfig, max_prompt_length=7)
    for index in range(3):
        prompt_ids, completion_ids = trainer._ippo_val_pair(index)
        assert prompt_ids == list(full[index][-7:])
        assert len(completion_ids) == 5
