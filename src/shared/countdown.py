"""The Countdown task of the ES paper: problem record, prompt template and reward.

Identical to the reference (Qiu et al. 2025, "Evolution Strategies at Scale", whose Countdown task comes
from the TinyZero / GRPO-Zero code) in every value it produces, except that answers are evaluated by
walking their `ast` instead of `eval`, with a bound on `**` so that no answer can hang or exhaust memory.

Reward (reference `reward_function`): total = 0.1 * format + answer, where
  format  = 1.0 if "<think>" + response (an optional end token stripped) matches
            ^<think>.*?</think>\\n<answer>.*?</answer>$ (re.DOTALL); otherwise 0.1 if it contains a
            <think>...</think> block, plus 0.5 if it contains an <answer>...</answer> block;
  answer  = 1.0 if the content of the LAST <answer> block of the response is non-empty, matches
            ^[0-9+\\-*/() ]+$, uses exactly the given numbers (as a multiset of integers), and evaluates
            to within 1e-5 of float(target); otherwise 0.0.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from collections.abc import Sequence
from dataclasses import dataclass

# The reference prompt, character for character (see the `context` field of the reference split).
PROMPT_TEMPLATE = (
    "You are a helpful assistant. You first think about the reasoning process in your mind and then "
    "provide the user with the answer.Using the numbers {numbers}, create an equation that equals "
    "{target}. You can use basic arithmetic operations (+, -, *, /) and each number can only be used "
    "once. Show your work in <think> </think> tags. And return the final answer in <answer> </answer> "
    "tags, for example <answer> (1 + 2) / 3 </answer>.Let me solve this step by step.\n<think>"
)

# The reference's regular expressions, unchanged (their `$` also matches before a final newline).
_THINK = re.compile(r"<think>.*?<\/think>", re.DOTALL)
_ANSWER_BLOCK = re.compile(r"<answer>.*?<\/answer>", re.DOTALL)
_FULL_FORMAT = re.compile(r"^<think>.*?<\/think>\n<answer>.*?<\/answer>$", re.DOTALL)
_ANSWER_CONTENT = re.compile(r"<answer>(.*?)<\/answer>", re.DOTALL)
_ALLOWED = re.compile(r"^[0-9+\-*/() ]+$")
_INTEGER = re.compile(r"\d+")

TOLERANCE = 1e-5
# `**` results above this many bits are not computed (the reference's `eval` would run for hours or
# exhaust memory on e.g. 9**9**9); such answers score 0. 99**99 has 657 bits.
MAX_POWER_BITS = 1 << 16


@dataclass(frozen=True)
class CountdownProblem:
    """One Countdown problem.

    Attributes:
        id: the row's id (int in the reference split, or str).
        prompt: the full prompt given to the model (ends with "<think>").
        numbers: the numbers to use, each exactly once.
        target: the value to reach, as a string (the reference stores strings; not every target is an
            integer).
        solution: a known solution expression, or None.
    """

    id: int | str
    prompt: str
    numbers: tuple[int, ...]
    target: str
    solution: str | None = None


@dataclass(frozen=True)
class CountdownReward:
    """The reward of one response: `format` in {0, 0.1, 0.5, 0.6, 1}, `answer` in {0, 1},
    `total` = 0.1 * format + answer."""

    format: float
    answer: float
    total: float


def render_numbers(numbers: Sequence[int]) -> str:
    """Renders numbers as the reference does: numpy's str of an integer array, e.g. "[41 36  8  4]"."""
    import numpy as np  # imported when a prompt is made, not when an engine actor starts

    return str(np.array(list(numbers), dtype=np.int64))


def make_prompt(numbers: Sequence[int], target: int | str) -> str:
    """The reference prompt for `numbers` and `target` (target rendered with str())."""
    return PROMPT_TEMPLATE.format(numbers=render_numbers(numbers), target=target)


def format_reward(response: str, end_token: str | None = None) -> float:
    """The reference's format reward of a response (without the "<think>" the prompt ends with).

    Returns 1.0, or 0.1 (think block) + 0.5 (answer block), or 0.0. `end_token` (e.g. "<|endoftext|>")
    is stripped from the end first if present.
    """
    text = "<think>" + response
    if end_token and text.endswith(end_token):
        text = text[: -len(end_token)]
    if _FULL_FORMAT.match(text):
        return 1.0
    return (0.1 if _THINK.search(text) else 0.0) + (0.5 if _ANSWER_BLOCK.search(text) else 0.0)


class _Unsupported(Exception):
    """The expression contains something the evaluator does not compute (the answer scores 0)."""


_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def _power(base: int | float, exponent: int | float) -> int | float:
    exact = isinstance(base, int) and isinstance(exponent, int)
    if exact and exponent > 0 and abs(base) > 1 and exponent * math.log2(abs(base)) > MAX_POWER_BITS:
        raise _Unsupported("power too large")
    return base**exponent


def _evaluate(node: ast.AST) -> int | float:
    # Iterative post-order walk: deep nesting cannot overflow the Python stack.
    stack: list[tuple[ast.AST, bool]] = [(node, False)]
    values: list[int | float | complex] = []
    while stack:
        current, visited = stack.pop()
        if isinstance(current, ast.Expression):
            stack.append((current.body, False))
        elif (
            isinstance(current, ast.Constant)
            and isinstance(current.value, int)
            and not isinstance(current.value, bool)
        ):
            values.append(current.value)
        elif isinstance(current, ast.BinOp) and type(current.op) in _BINARY:
            if visited:
                right, left = values.pop(), values.pop()
                op = type(current.op)
                values.append(_power(left, right) if op is ast.Pow else _BINARY[op](left, right))
            else:
                stack.extend([(current, True), (current.right, False), (current.left, False)])
        elif isinstance(current, ast.UnaryOp) and type(current.op) in _UNARY:
            if visited:
                values.append(_UNARY[type(current.op)](values.pop()))
            else:
                stack.extend([(current, True), (current.operand, False)])
        else:
            raise _Unsupported(type(current).__name__)
    return values.pop()


def evaluate_expression(expression: str) -> float | None:
    """Evaluates an arithmetic expression as Python's `eval` would, without `eval`.

    Supports integer literals, parentheses, unary + and -, and binary + - * / // ** with Python's own
    semantics (exact integers, true division to float). Returns float(value), or None where `eval`
    followed by float() would raise (syntax error, division by zero, overflow, complex result, a tuple,
    a call) or where a `**` result would exceed MAX_POWER_BITS bits.
    """
    try:
        # eval() of a str strips leading spaces and tabs, then parses and compiles; so do we (compiling the
        # tree raises what eval's compile stage would, e.g. RecursionError), but never execute it.
        tree = ast.parse(expression.lstrip(" \t"), mode="eval")
        compile(tree, "<answer>", "eval")
        return float(_evaluate(tree))
    except (SyntaxError, ValueError, TypeError, ArithmeticError, MemoryError, RecursionError, _Unsupported):
        return None


def answer_reward(response: str, numbers: Sequence[int], target: int | float | str) -> float:
    """The reference's answer reward: 1.0 if the LAST <answer> block's content is a correct solution.

    Correct: non-empty; only digits, + - * / ( ) and spaces; the integers in it equal `numbers` as a
    multiset; its value is within TOLERANCE of float(target).
    """
    answers = _ANSWER_CONTENT.findall(response)
    if not answers:
        return 0.0
    content = answers[-1]
    if not content or not _ALLOWED.match(content):
        return 0.0
    if sorted(int(n) for n in _INTEGER.findall(content)) != sorted(numbers):
        return 0.0
    value = evaluate_expression(content)
    if value is None:
        return 0.0
    try:
        return 1.0 if abs(value - float(target)) < TOLERANCE else 0.0
    except (ValueError, OverflowError):
        return 0.0


def reward(
    response: str, numbers: Sequence[int], target: int | float | str, end_token: str | None = None
) -> CountdownReward:
    """The reference's total reward of `response` (the model's completion after the prompt's "<think>").

    Returns CountdownReward(format, answer, total = 0.1 * format + answer).
    """
    fmt = format_reward(response, end_token)
    ans = answer_reward(response, numbers, target)
    return CountdownReward(format=fmt, answer=ans, total=fmt * 0.1 + ans)
