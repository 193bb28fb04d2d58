"""Tasks: data loading and splits, prompts, answer extraction and the arithmetic step checker."""

import gzip
import json
import time
import warnings

import pytest

from ippo.testing import tiny_tokenizer
from ippo.train import tasks
from ippo.train.tasks import GSM8K, Arith, Example, check_equations, extract_final_answer, make_task

GOLD = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
        "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")


@pytest.fixture(scope="module")
def gsm8k():
    return GSM8K()


def write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------- gsm8k data

def test_bundled_gsm8k_splits(gsm8k):
    train, val = gsm8k.split("train"), gsm8k.split("validation")
    assert (len(train), len(val)) == (6473, 1000)
    assert not {e.question for e in train} & {e.question for e in val}
    assert train[0].question.startswith("Natalia sold clips")  # train keeps file order
    assert GSM8K().split("validation") == val  # fixed seed: same split every time
    assert GSM8K(seed=1).split("validation") != val


def test_bundled_gsm8k_gold_answers_check(gsm8k):
    examples = gsm8k.split("validation")
    assert all(gsm8k.check_answer(e.answer, e) for e in examples)
    n_steps, n_wrong = map(sum, zip(*(gsm8k.check_steps(e.answer) for e in examples)))
    assert n_steps > 3000 and n_wrong / n_steps < 0.01  # the few misses are errors in GSM8K itself


def test_gsm8k_eval_split_needs_path(gsm8k, tmp_path):
    with pytest.raises(ValueError, match="eval_path"):
        gsm8k.split("eval")
    with pytest.raises(ValueError, match="which"):
        gsm8k.split("test")
    lines = [json.dumps({"question": f"q{i}", "answer": "#### 1"}) for i in range(3)]
    path = write_jsonl(tmp_path / "test.jsonl", lines)
    task = GSM8K(train_path=path, eval_path=path, val_size=1)
    assert len(task.split("eval")) == 3 and len(task.split("train")) == 2


def test_user_jsonl_gz_and_malformed_lines(tmp_path):
    good = json.dumps({"question": "What is 2+3?", "answer": "2+3 = <<2+3=5>>5\n#### 5"})
    lines = [good, "{not json", json.dumps({"question": "q"}), json.dumps(["a"]),
             json.dumps({"question": "q", "answer": "no final answer"}), "", good]
    path = tmp_path / "data.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines))
    with pytest.warns(UserWarning, match=r"skipped 4 malformed line\(s\): line 2 \(invalid JSON\), 3 .*, 4 .*, 5 "):
        examples = tasks.read_gsm8k_jsonl(path)
    assert examples == [Example("What is 2+3?", "2+3 = <<2+3=5>>5\n#### 5")] * 2


def test_user_jsonl_bad_bytes_and_huge_numbers_skip_their_line(tmp_path):
    good = json.dumps({"question": "q", "answer": "#### 5"}).encode()
    lines = [good, b'{"question": "q\xff", "answer": "#### 5"}',
             json.dumps({"question": "q", "answer": "#### " + "9" * 5000}).encode(),
             b'{"question": "q", "answer": "#### 5", "id": ' + b"1" * 5000 + b"}", b"[" * 100000, good]
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join(lines))
    reasons = r"line 2 \(not UTF-8\), 3 \(answer lacks .*\), 4 \(invalid JSON\), 5 \(invalid JSON\)"
    with pytest.warns(UserWarning, match=rf"skipped 4 malformed line\(s\): {reasons}"):
        assert tasks.read_gsm8k_jsonl(path) == [Example("q", "#### 5")] * 2


def test_bad_gzip_or_unreadable_file_names_the_file(tmp_path, monkeypatch):
    not_gzip = write_jsonl(tmp_path / "plain.jsonl.gz", [json.dumps({"question": "q", "answer": "#### 1"})])
    truncated = tmp_path / "truncated.jsonl.gz"
    truncated.write_bytes(gzip.compress(not_gzip.read_bytes() * 100)[:-20])
    for path in (not_gzip, truncated):
        with pytest.raises(ValueError, match=rf"path: '.*{path.name}' is not a valid gzip file: "):
            tasks.read_gsm8k_jsonl(path)

    def unreadable(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tasks, "open", unreadable, raising=False)
    with pytest.raises(OSError, match="path: cannot read '.*one.jsonl': .*Permission denied"):
        tasks.read_gsm8k_jsonl(write_jsonl(tmp_path / "one.jsonl", []))


def test_empty_or_missing_dataset(tmp_path):
    with pytest.raises(ValueError, match="no valid GSM8K example"):
        tasks.read_gsm8k_jsonl(write_jsonl(tmp_path / "empty.jsonl", []))
    with pytest.warns(UserWarning, match="line 1"), pytest.raises(ValueError, match="path"):
        GSM8K(train_path=write_jsonl(tmp_path / "bad.jsonl", ["{"]))
    with pytest.raises(FileNotFoundError, match="path"):
        GSM8K(train_path=tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="val_size"):
        GSM8K(train_path=write_jsonl(tmp_path / "one.jsonl", [json.dumps({"question": "q", "answer": "#### 1"})]))


# ---------------------------------------------------------------- answers

@pytest.mark.parametrize("text, value", [
    ("#### 72", 72), ("so #### $1,234.", 1234), ("#### -3", -3), ("#### 2.50", 2.5), ("#### 1 #### 7", 7),
    ("#### .5", 0.5), ("The answer is 72", None), ("####", None), ("", None),
    ("#### " + "9" * 5000, None), ("#### 0." + "0" * 5000 + "1", None),  # over Python's int digit limit
])
def test_extract_final_answer(text, value):
    assert extract_final_answer(text) == value


def test_check_answer(gsm8k):
    ex = Example("q", GOLD)
    assert gsm8k.check_answer("blah\n#### 72", ex)
    assert gsm8k.check_answer("#### $72.00", ex)
    assert not gsm8k.check_answer("#### 73", ex)
    assert not gsm8k.check_answer("72", ex)


# ---------------------------------------------------------------- step checker

@pytest.mark.parametrize("text, expected", [
    (GOLD, (2, 0)),                                   # annotation + text form of one step count once
    ("48/2 = <<48/2=25>>25", (1, 1)),
    ("48/2 = 24 but <<48/2=25>>", (2, 1)),            # text and annotation disagree: two steps
    ("12 + 7 = 19\n19 * 3 = 57\n57 - 5 = 52\n#### 52", (3, 0)),
    ("12 + 7 = 20\n20 * 3 = 60", (2, 1)),
    ("$1,200 x 2 = $2,400. 4 × 3 = 12, 8 ÷ 2 = 4", (3, 0)),
    ("10/3 = 3.33 and 10/3 = 3", (2, 1)),             # rounding only to the decimals written
    ("1 - (1/2) = 1/2; (3+4)*2 = 14", (2, 0)),
    ("(3+4 = 7) and (so 2) 5*5 = 25 (ok)", (2, 0)),   # prose parentheses are cut off
    ("1) 2) 3*3 = 9", (1, 0)),                        # cut after the last unmatched ")"
    ("4080 + 4080/2 = 4000 + 2040 = 6040", (2, 1)),   # a chain gives one step per '='
    ("-6 * 3 = -18\n-18 + 4 = -14", (2, 0)),
    ("1/0 = 5", (1, 1)),
    ("M + 4 + 2 = 8, p + p/2 + 3 = 69, 22 - 16 = 16 + x", (0, 0)),  # variables: not arithmetic
    ("at 6:00+48=6:48, 2+2=5x", (0, 0)),
    ("x = 5, 7 = 7, there are 3 = three", (0, 0)),    # no operator: not a step
    ("__import__('os').system('true') + 1 = 1", (0, 0)),
    ("2 ** 10 = 1024", (0, 0)),
    ("", (0, 0)), ("=== ))(( = 3+ =", (0, 0)), ("9" * 500 + "+1 = 5", (0, 0)),
])
def test_check_equations(text, expected):
    assert check_equations(text) == expected


# Each is a 40,001+ character completion that took seconds when runs of ")" or spaces were backtracked.
ADVERSARIAL = ["1" + ")" * 40000, "1" + ") " * 20000, "1+1=2" + ")" * 40000, "(" * 40000 + "1+1=2",
               "1" + " )" * 20000 + "=", "1 " * 10000 + "=" + ")" * 20000]


def test_equation_finding_is_linear_time():
    start = time.perf_counter()
    results = [check_equations(text) for text in ADVERSARIAL]
    assert time.perf_counter() - start < 0.5
    assert results == [(0, 0), (0, 0), (1, 0), (1, 0), (0, 0), (0, 0)]


NASTY = ADVERSARIAL + [
    "#### " + "9" * 5000, "#### 0." + "0" * 5000 + "1", "1e999 = <<1e999*2=1e999>>", "<<1e308*10=1e309>>",
    "9**9**9 = 1", "<<9**9**9=1>>", "<<9**9**9**9**9**9**9**9**9**9**9**9**9>>", "(" * 150 + "1+1" + ")" * 150 + " = 2",
    "<<" + "-" * 198 + "1+1=2>>", "<<" + "(" * 99 + "1" + ")" * 99 + "+1=2>>", "1/0 = 1 <<1/0=1>> <<0/0=0>>",
    "١ + ١ = ٢ #### ١", "１+１=２ #### ３", "1_000 + 0x1F = 1j", "<<1e=2>> <<1if 1else 2=1>>", "\ud800\x00 1+1=2 ####",
    "=" * 2000, "#" * 2000, "<<" * 1000, "1" * 5000 + "+1 = " + "2" * 5000, " \n\t".join(["1+1=2"] * 500),
]


@pytest.mark.parametrize("text", NASTY, ids=range(len(NASTY)))
def test_builtin_checkers_are_total(gsm8k, text):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        n_steps, n_wrong = gsm8k.check_steps(text)
        assert 0 <= n_wrong <= n_steps
        assert gsm8k.check_answer(text, Example("q", GOLD)) in (True, False)
        assert gsm8k.check_answer("#### 72", Example("q", text)) in (True, False)


def test_checker_exceptions_reach_the_trainer(gsm8k, monkeypatch):
    def broken(_):
        raise RuntimeError("boom")

    monkeypatch.setattr(tasks, "check_equations", broken)
    monkeypatch.setattr(tasks, "extract_final_answer", broken)
    for check in (lambda: gsm8k.check_steps("1 + 1 = 2"), lambda: gsm8k.check_answer("#### 72", Example("q", GOLD))):
        with pytest.raises(RuntimeError, match="boom"):  # not swallowed: the trainer counts checker errors
            check()


# ---------------------------------------------------------------- arith

def test_arith_gold_format_and_difficulty():
    task = Arith(n_steps=4, digits=3, seed=7, sizes=(50, 20, 20))
    for which in ("train", "validation", "eval"):
        for ex in task.split(which):
            lines = ex.answer.splitlines()
            assert len(lines) == 5 and lines[-1].startswith("#### ")
            assert task.check_steps(ex.answer) == (4, 0)
            assert task.check_answer(ex.answer, ex)
            assert ex.question.count("(") == 3
    first = task.split("train")[0]
    assert first == Arith(n_steps=4, digits=3, seed=7, sizes=(50, 20, 20)).split("train")[0]
    assert first != Arith(n_steps=4, digits=3, seed=8, sizes=(50, 20, 20)).split("train")[0]


def test_arith_splits_disjoint_and_bad_args():
    task = Arith(n_steps=1, digits=1, sizes=(200, 50, 50))  # 300 of 300 possible problems
    questions = [e.question for w in ("train", "validation", "eval") for e in task.split(w)]
    assert len(set(questions)) == len(questions) == 300
    with pytest.raises(ValueError, match="sizes"):
        Arith(n_steps=1, digits=1, sizes=(200, 100, 50))
    for kwargs, name in [({"n_steps": 0}, "n_steps"), ({"digits": 0}, "digits"), ({"sizes": (1, 0, 1)}, "sizes")]:
        with pytest.raises(ValueError, match=name):
            Arith(**kwargs)


# ---------------------------------------------------------------- prompts

def test_prompt_uses_chat_template():
    task = make_task("arith", sizes=(3, 1, 1))
    ex = task.split("train")[0]
    prompt = task.prompt(ex, tiny_tokenizer())
    assert prompt.startswith("<|im_start|>system\n" + tasks.SYSTEM_PROMPT)
    assert prompt.endswith(f"<|im_start|>user\n{ex.question}<|im_end|>\n<|im_start|>assistant\n")
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="chat_template"):
        task.prompt(ex, tokenizer)
    with pytest.raises(ValueError, match="name"):
        make_task("mnist")
