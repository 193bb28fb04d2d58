"""ippo.integrations.trl: what the trainers check at construction (issue 18): every validation row, each ippo_*
keyword's type, and the truncation of long validation rows to the trainer's max lengths."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from _trl_tiny import VALIDATION, make_trainer, one_thread, tokenizer  # noqa: F401 (one_thread: autouse)
from datasets import Dataset
from trl import GRPOConfig

from ippo.integrations.trl import IPPOGRPOTrainer

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


@pytest.mark.parametrize("keyword, value", [
    ("ippo_stop_when_empty", "False"), ("ippo_stop_when_empty", 0), ("ippo_stop_when_empty", None),
    ("ippo_val_size", "4"), ("ippo_val_size", 4.0), ("ippo_tol", "0"), ("ippo_stop_rule", ["evidence"]),
    ("ippo_stop_patience", "2"),
])
def test_ippo_keywords_are_type_checked(tmp_path, keyword, value):
    with pytest.raises(ValueError, match=keyword):
        make_trainer(IPPOGRPOTrainer, tmp_path, **{keyword: value})


@dataclass
class PromptCappedGRPOConfig(GRPOConfig):
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
