"""Reasoning tasks: data splits, prompts, and answer/step checkers.

Every task uses the GSM8K answer format: reasoning lines in which arithmetic
is written out as equations (``48/2 = 24``, optionally annotated
``<<48/2=24>>``), then a final line ``#### 72``. Gold answers are in the same
format, so they serve both as SFT targets and as the validation loss text.

Tasks:
  * ``gsm8k``: grade-school math word problems (bundled OpenAI train split, or
    any user JSONL of ``{"question", "answer"}`` lines in GSM8K format).
  * ``arith``: procedurally generated multi-step integer arithmetic.

The built-in checkers are total: no ``str`` input makes them raise, and a malformed
completion is a wrong answer / has no steps. Exceptions of user checkers (a
:class:`Task` subclass's overrides) are caught and counted by the trainer.
"""

from __future__ import annotations

import ast
import gzip
import importlib.resources
import json
import random
import re
import warnings
import zlib
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Literal

Split = Literal["train", "validation", "eval"]
SPLITS: tuple[str, ...] = ("train", "validation", "eval")

SYSTEM_PROMPT = (
    "Solve the problem step by step. Write every calculation as an equation such as "
    "'12 + 7 = 19', one step per line. End with a line '#### <answer>' holding only the final number."
)


@dataclass(frozen=True)
class Example:
    """One problem. ``answer`` is the gold solution in GSM8K format (ends with ``#### <number>``)."""

    question: str
    answer: str


# --------------------------------------------------------------------------- numbers and equations

_NUMBER = r"-?(?:\d+(?:\.\d+)?|\.\d+)"
_FINAL_RE = re.compile(rf"####\s*({_NUMBER})")
_ANNOTATION_RE = re.compile(r"<<([^<>]*)>>")
# Thousands separators: "1,000" -> "1000" (a comma not followed by exactly 3 digits is punctuation).
_THOUSANDS_RE = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
# "3 x 4", "3×4" -> "3*4" (only between operands, so words containing "x" are untouched).
_TIMES_RE = re.compile(r"(?<=[\d)])\s*[x×X]\s*(?=[\d(.])")
# An equation "lhs = rhs", both sides maximal runs of arithmetic characters (a "." only before a
# digit, so a sentence's full stop ends a run) and the lhs's last non-blank character a digit or
# ")". The rhs is in a lookahead so that a chain "a = b = c" yields both "a = b" and "b = c".
# Runs are matched possessively (no backtracking into a run), so matching is linear in the text.
_SYMBOL = r"(?:[\d()+\-*/]|\.(?=\d))"
_ARITH = rf"(?:[ \t]|{_SYMBOL})"
_RUN_START = r"(?:(?<![\d()+\-*/ \t.])|(?<=\.)(?!\d))"
_EQUATION_RE = re.compile(rf"{_RUN_START}((?:[ \t]*+{_SYMBOL})*+(?<=[\d)])[ \t]*+)=(?=({_ARITH}*+))")
_OPENING_RE = re.compile(r"\(\s*")
_MAX_EXPR_CHARS = 200


def _normalize(text: str) -> str:
    """Canonical arithmetic spelling: no ``$``, no thousands commas, ``x``/``×``/``÷`` as ``*``/``/``."""
    text = text.replace("$", "").replace("÷", "/")
    text = _THOUSANDS_RE.sub("", text)
    return _TIMES_RE.sub("*", text)


def _eval_node(node: ast.AST) -> Fraction:
    """Exact value of an arithmetic AST made only of numbers, ``+ - * /`` and unary ``+ -``."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return Fraction(repr(node.value))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _eval_node(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
        a, b = _eval_node(node.left), _eval_node(node.right)
        if isinstance(node.op, ast.Add):
            return a + b
        if isinstance(node.op, ast.Sub):
            return a - b
        if isinstance(node.op, ast.Mult):
            return a * b
        return a / b  # ZeroDivisionError propagates; callers treat it as a wrong step
    raise ValueError(f"not arithmetic: {ast.dump(node)}")


def parse_arithmetic(expr: str) -> ast.expr | None:
    """Parse ``expr`` as arithmetic (numbers, ``+ - * /``, unary signs, parentheses) or return None.

    Only the syntax tree is built; nothing is executed.
    """
    if len(expr) > _MAX_EXPR_CHARS:
        return None
    try:
        tree = ast.parse(expr.strip(), mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    nodes = list(ast.walk(tree))
    allowed = (ast.BinOp, ast.UnaryOp, ast.Constant, ast.Add, ast.Sub, ast.Mult, ast.Div, ast.UAdd, ast.USub)
    if not all(isinstance(n, allowed) for n in nodes):
        return None
    if any(isinstance(n, ast.Constant) and type(n.value) not in (int, float) for n in nodes):
        return None
    return tree


def _has_operator(tree: ast.expr) -> bool:
    return any(isinstance(node, ast.BinOp) for node in ast.walk(tree))


def _mirror(side: str) -> str:
    return side[::-1].translate(str.maketrans("()", ")("))


def _trim_start(side: str) -> str | None:
    """A left side of a text equation without the prose at its start, or None if it is not an expression.

    Prose leaks into the matched run: everything up to the last unmatched ")" ("(so 2) 3 + 4 =")
    and unmatched leading "(" ("(3 + 4 =") are cut off. A run that starts with a binary
    operator continues a word ("M + 4 =", "p/2 =").
    """
    depth = start = 0
    for i, char in enumerate(side):
        depth += 1 if char == "(" else -1 if char == ")" else 0
        if depth < 0:
            depth, start = 0, i + 1
    side = side[start:].strip()
    excess, start = side.count("(") - side.count(")"), 0
    while excess > 0 and (opening := _OPENING_RE.match(side, start)):
        excess, start = excess - 1, opening.end()
    side = side[start:]
    if not side or side[0] in "+*/" or re.match(r"-\s", side):
        return None
    return side


def _equation_sides(text: str, match: re.Match) -> tuple[str | None, str | None]:
    """The ``(lhs, rhs)`` expressions of an equation match, None for a side that is not one.

    A side whose number touches a word or a clock time ("6:00+48=6:48", "= 5x") is not
    arithmetic. The right side is trimmed as the mirror image of a left side ("= 7) so",
    "= 16 + x" ends in an operator).
    """
    lhs, rhs = match.group(1), match.group(2)
    end = match.end() + len(rhs)
    before, after = text[match.start() - 1:match.start()], text[end:end + 1]
    glued_left = re.fullmatch(r"[\w:]", before) and re.match(r"[\d.]", lhs)
    glued_right = re.fullmatch(r"[\w:]", after) and re.search(r"[\d.]$", rhs)
    rhs = _trim_start(_mirror(rhs))
    return None if glued_left else _trim_start(lhs), None if glued_right or rhs is None else _mirror(rhs)


def _matches(value: Fraction, stated: ast.expr) -> bool:
    """True if ``stated`` evaluates to ``value``, or is a number: ``value`` rounded to its decimals."""
    target = _eval_node(stated)
    if value == target:
        return True
    if not isinstance(stated, ast.Constant) or not isinstance(stated.value, float):
        return False
    decimals = len(repr(stated.value).partition(".")[2])
    return abs(value - target) <= Fraction(1, 2 * 10**decimals)


def extract_final_answer(completion: str) -> Fraction | None:
    """The number after the last ``####`` (``$`` and thousands commas ignored), or None.

    None too if that number has more digits than Python converts (``sys.get_int_max_str_digits``);
    never raises on a ``str``.
    """
    found = _FINAL_RE.findall(_normalize(completion))
    try:
        return Fraction(found[-1]) if found else None
    except ValueError:  # int conversion digit limit
        return None


def find_equations(completion: str) -> Counter[tuple[ast.expr, ast.expr]]:
    """The arithmetic steps of ``completion``: a multiset of ``(lhs AST, rhs AST)``.

    Steps are the ``<<lhs=rhs>>`` annotations and the text equations ``lhs = rhs`` whose ``lhs``
    has a binary operator (a chain ``a = b = c`` gives ``a = b`` and ``b = c``). An equation
    written both as text and as an annotation ("48/2 = <<48/2=24>>24") counts once.
    """
    trees: dict[str, ast.expr] = {}

    def collect(pairs) -> Counter[tuple[str, str]]:
        found: Counter[tuple[str, str]] = Counter()
        for lhs, rhs in pairs:
            left = None if lhs is None else parse_arithmetic(lhs)
            right = None if rhs is None else parse_arithmetic(rhs)
            if left is not None and right is not None and _has_operator(left):
                key = ast.dump(left), ast.dump(right)
                trees.update(zip(key, (left, right)))
                found[key] += 1
        return found

    annotations = (_normalize(body).rpartition("=")[::2] for body in _ANNOTATION_RE.findall(completion))
    text = _normalize(_ANNOTATION_RE.sub("", completion))
    equations = (_equation_sides(text, match) for match in _EQUATION_RE.finditer(text))
    steps = collect(annotations) | collect(equations)  # multiset union: max of the two counts
    return Counter({(trees[lhs], trees[rhs]): count for (lhs, rhs), count in steps.items()})


def check_equations(completion: str) -> tuple[int, int]:
    """Verify the steps of :func:`find_equations`; return ``(n_steps, n_wrong_steps)``.

    A step is right if both sides have the same exact value, or if the right side is a decimal
    number equal to the left side rounded to that many decimals ("10/3 = 3.33"). A division
    by zero is wrong.
    """
    n_steps = n_wrong = 0
    for (lhs, rhs), count in find_equations(completion).items():
        try:
            right = _matches(_eval_node(lhs), rhs)
        except (ValueError, ArithmeticError, RecursionError):
            right = False
        n_steps += count
        n_wrong += 0 if right else count
    return n_steps, n_wrong


# --------------------------------------------------------------------------- task interface


class Task(ABC):
    """A reasoning task: splits of :class:`Example`, a chat prompt, and checkers.

    Subclasses implement :meth:`split`. Checkers default to the GSM8K answer format.
    """

    name: str
    system_prompt: str = SYSTEM_PROMPT

    @abstractmethod
    def split(self, which: Split) -> list[Example]:
        """The examples of split ``which`` ("train", "validation" or "eval")."""

    def messages(self, example: Example) -> list[dict[str, str]]:
        """Chat messages (system + user question) for ``example``."""
        return [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": example.question}]

    def prompt(self, example: Example, tokenizer) -> str:
        """Prompt text: :meth:`messages` rendered by ``tokenizer``'s chat template, ready for the reply."""
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("tokenizer has no chat_template; set tokenizer.chat_template first")
        return tokenizer.apply_chat_template(self.messages(example), add_generation_prompt=True, tokenize=False)

    def check_answer(self, completion: str, example: Example) -> bool:
        """True iff the completion's final answer (after ``####``) equals the gold one.

        Total: never raises for ``str`` inputs. An override may raise; the trainer counts that as
        a checker error and a wrong answer.
        """
        predicted = extract_final_answer(completion)
        return predicted is not None and predicted == extract_final_answer(example.answer)

    def check_steps(self, completion: str) -> tuple[int, int]:
        """``(n_steps, n_wrong_steps)`` of the completion's equations (see :func:`check_equations`).

        Total: never raises for a ``str`` input. An override may raise; the trainer counts that as
        a checker error and one wrong step.
        """
        return check_equations(completion)


# --------------------------------------------------------------------------- gsm8k


def _read_lines(path: Path) -> list[bytes]:
    """The raw lines of ``path`` (gunzipped if it ends in ``.gz``); errors name the file."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as lines:
            return list(lines)
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:  # not gzip, truncated, corrupt
        raise ValueError(f"path: {str(path)!r} is not a valid gzip file: {err}") from err
    except OSError as err:
        raise OSError(f"path: cannot read {str(path)!r}: {err}") from err


def _gsm8k_example(line: str) -> Example | str:
    """The example on a non-blank JSONL line, or why the line is malformed."""
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):  # bad JSON, an integer over the digit limit, deep nesting
        return "invalid JSON"
    question = record.get("question") if isinstance(record, dict) else None
    answer = record.get("answer") if isinstance(record, dict) else None
    if not (isinstance(question, str) and question.strip() and isinstance(answer, str)):
        return "needs string 'question' and 'answer'"
    if extract_final_answer(answer) is None:
        return "answer lacks a readable '#### <number>'"
    return Example(question, answer)


def read_gsm8k_jsonl(path: str | Path) -> list[Example]:
    """Read a UTF-8 JSONL file (``.gz`` allowed) of ``{"question": str, "answer": str}`` lines.

    An answer must end in GSM8K format (``#### <number>``, at most Python's int digit limit).
    Blank lines are ignored; malformed lines (bad JSON or UTF-8, missing fields, no final number)
    are skipped and reported in one warning naming their line numbers. Raises ValueError if no
    valid example remains or a ``.gz`` file is not valid gzip; OSError (naming the file) if it
    cannot be read.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no such file {str(path)!r}")
    examples: list[Example] = []
    bad: list[str] = []
    for number, raw in enumerate(_read_lines(path), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            bad.append(f"{number} (not UTF-8)")
            continue
        if line.strip():
            parsed = _gsm8k_example(line)
            if isinstance(parsed, Example):
                examples.append(parsed)
            else:
                bad.append(f"{number} ({parsed})")
    if bad:
        shown = ", ".join(bad[:20]) + (", ..." if len(bad) > 20 else "")
        warnings.warn(f"{path}: skipped {len(bad)} malformed line(s): line {shown}", UserWarning, stacklevel=2)
    if not examples:
        raise ValueError(f"path: {str(path)!r} holds no valid GSM8K example")
    return examples


class GSM8K(Task):
    """GSM8K word problems.

    ``train`` and ``validation`` come from ``train_path`` (default: the bundled OpenAI train
    split, 7473 problems): ``val_size`` problems are held out by a shuffle with ``seed``.
    ``eval`` reads ``eval_path`` (e.g. GSM8K's ``test.jsonl``, not bundled).
    """

    name = "gsm8k"

    def __init__(self, train_path: str | Path | None = None, eval_path: str | Path | None = None,
                 val_size: int = 1000, seed: int = 0):
        if val_size < 1:
            raise ValueError(f"val_size must be >= 1, got {val_size}")
        if train_path is None:
            resource = importlib.resources.files("ippo.train") / "data" / "gsm8k" / "train.jsonl.gz"
            with importlib.resources.as_file(resource) as bundled:
                examples = read_gsm8k_jsonl(bundled)
        else:
            examples = read_gsm8k_jsonl(train_path)
        if val_size >= len(examples):
            raise ValueError(f"val_size={val_size} must be smaller than the {len(examples)} training examples")
        order = list(range(len(examples)))
        random.Random(seed).shuffle(order)
        self._validation = [examples[i] for i in order[:val_size]]
        self._train = [examples[i] for i in sorted(order[val_size:])]
        self._eval = None if eval_path is None else read_gsm8k_jsonl(eval_path)

    def split(self, which: Split) -> list[Example]:
        if which == "train":
            return self._train
        if which == "validation":
            return self._validation
        if which == "eval":
            if self._eval is None:
                raise ValueError("eval_path: gsm8k has no bundled eval split; pass eval_path (e.g. GSM8K test.jsonl)")
            return self._eval
        raise ValueError(f"which must be one of {SPLITS}, got {which!r}")


# --------------------------------------------------------------------------- arith

_OPS = ("+", "-", "*")


class Arith(Task):
    """Multi-step integer arithmetic, generated from ``seed``.

    A problem applies ``n_steps`` operations (``+ - *``, operands of ``digits`` digits) left to
    right, e.g. ``((12 + 7) * 3) - 5``. The gold solution has one line per step, each a
    checkable equation on the previous result, then the final line::

        12 + 7 = 19
        19 * 3 = 57
        57 - 5 = 52
        #### 52

    Splits are disjoint: no validation or eval question also appears in train or in each other.
    """

    name = "arith"

    def __init__(self, n_steps: int = 3, digits: int = 2, seed: int = 0,
                 sizes: tuple[int, int, int] = (10000, 1000, 1000)):
        if n_steps < 1:
            raise ValueError(f"n_steps must be >= 1, got {n_steps}")
        if digits < 1:
            raise ValueError(f"digits must be >= 1, got {digits}")
        if len(sizes) != 3 or min(sizes) < 1:
            raise ValueError(f"sizes must be three positive (train, validation, eval) counts, got {sizes}")
        self.n_steps, self.digits, self.seed = n_steps, digits, seed
        seen: set[str] = set()
        self._splits = {which: self._generate(which, size, seen) for which, size in zip(SPLITS, sizes)}

    def _generate(self, which: str, size: int, seen: set[str]) -> list[Example]:
        """``size`` problems with questions not in ``seen`` (which is updated)."""
        rng = random.Random(f"arith:{self.seed}:{self.n_steps}:{self.digits}:{which}")
        examples: list[Example] = []
        for _ in range(20 * size + 1000):
            example = self._problem(rng)
            if example.question not in seen:
                seen.add(example.question)
                examples.append(example)
                if len(examples) == size:
                    return examples
        raise ValueError(f"sizes: cannot draw {size} distinct {which} problems with n_steps={self.n_steps}, "
                         f"digits={self.digits}; raise n_steps or digits, or lower sizes")

    def _problem(self, rng: random.Random) -> Example:
        low = 0 if self.digits == 1 else 10 ** (self.digits - 1)
        high = 10**self.digits - 1
        value = rng.randint(low, high)
        expression, lines = str(value), []
        for step in range(self.n_steps):
            op, operand = rng.choice(_OPS), rng.randint(low, high)
            result = {"+": value + operand, "-": value - operand, "*": value * operand}[op]
            lines.append(f"{value} {op} {operand} = {result}")
            expression = f"({expression}) {op} {operand}" if step else f"{expression} {op} {operand}"
            value = result
        lines.append(f"#### {value}")
        return Example(f"Compute {expression}.", "\n".join(lines))

    def split(self, which: Split) -> list[Example]:
        if which not in self._splits:
            raise ValueError(f"which must be one of {SPLITS}, got {which!r}")
        return self._splits[which]


TASKS: dict[str, type[Task]] = {"gsm8k": GSM8K, "arith": Arith}


def make_task(name: str, **kwargs) -> Task:
    """The task called ``name`` ("gsm8k" or "arith"), built with ``kwargs``."""
    if name not in TASKS:
        raise ValueError(f"name must be one of {sorted(TASKS)}, got {name!r}")
    return TASKS[name](**kwargs)
