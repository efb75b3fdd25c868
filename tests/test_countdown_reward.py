"""The Countdown prompt and reward equal the reference's on every input we can think of, and the
ast-based evaluator never raises or hangs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.countdown import (
    CountdownReward,
    answer_reward,
    evaluate_expression,
    make_prompt,
    reward,
)

REFERENCE_SPLIT = Path("tests/data/countdown-train-200.json")
NUMBERS = [44, 19, 35]
TARGET = "98"
EOS = "<|endoftext|>"


# --- The reference implementation (GRPO-Zero / ES paper), used only as an oracle on fixed inputs. ---
def _reference_format(response, end_token=None):
    if end_token and response.endswith(end_token):
        response = response[: -len(end_token)]
    if re.match(r"^<think>.*?<\/think>\n<answer>.*?<\/answer>$", response, re.DOTALL):
        return 1.0
    r = 0.0
    if re.search(r"<think>.*?<\/think>", response, re.DOTALL):
        r += 0.1
    if re.search(r"<answer>.*?<\/answer>", response, re.DOTALL):
        r += 0.5
    return r


def _reference_answer(response, numbers, target):
    matches = re.findall(r"<answer>(.*?)<\/answer>", response, re.DOTALL)
    if not matches:
        return 0.0
    content = matches[-1]
    if not content or not re.match(r"^[0-9+\-*/() ]+$", content):
        return 0.0
    if sorted(int(n) for n in re.findall(r"\d+", content)) != sorted(numbers):
        return 0.0
    try:
        result = eval(content, {"__builtins__": None}, {})  # noqa: S307 - the oracle, fixed inputs only
        if abs(float(result) - float(target)) < 1e-5:
            return 1.0
    except Exception:  # noqa: BLE001 - the reference swallows everything
        pass
    return 0.0


def _reference_reward(response, numbers, target, end_token=None):
    fmt = _reference_format("<think>" + response, end_token)
    ans = _reference_answer(response, numbers, target)
    return fmt * 0.1 + ans, fmt, ans


def ok(expr: str) -> str:
    return f"reasoning</think>\n<answer>{expr}</answer>"


# (response, numbers, target, end_token, expected format, expected answer)
CASES = {
    "exact format, correct": (ok("(44 + 19) + 35"), NUMBERS, TARGET, None, 1.0, 1.0),
    "exact format, wrong value": (ok("44 + 19 - 35"), NUMBERS, TARGET, None, 1.0, 0.0),
    "end token stripped": (ok("44 + 19 + 35") + EOS, NUMBERS, TARGET, EOS, 1.0, 1.0),
    "end token not given": (ok("44 + 19 + 35") + EOS, NUMBERS, TARGET, None, 0.6, 1.0),
    "trailing newline after answer": (ok("44 + 19 + 35") + "\n", NUMBERS, TARGET, None, 1.0, 1.0),
    "two trailing newlines": (ok("44 + 19 + 35") + "\n\n", NUMBERS, TARGET, None, 0.6, 1.0),
    "trailing newline inside answer": (ok("44 + 19 + 35\n"), NUMBERS, TARGET, None, 1.0, 1.0),
    "leading spaces in answer": (ok("  44 + 19 + 35 "), NUMBERS, TARGET, None, 1.0, 1.0),
    "no newline between blocks": ("x</think><answer>44+19+35</answer>", NUMBERS, TARGET, None, 0.6, 1.0),
    "think block only": ("x</think> and no answer", NUMBERS, TARGET, None, 0.1, 0.0),
    "answer block only, no think end": ("x <answer>44+19+35</answer>", NUMBERS, TARGET, None, 0.5, 1.0),
    "nothing": ("I don't know", NUMBERS, TARGET, None, 0.0, 0.0),
    "unclosed answer": ("x</think>\n<answer>44+19+35", NUMBERS, TARGET, None, 0.1, 0.0),
    "text after answer": (ok("44+19+35") + " done", NUMBERS, TARGET, None, 0.6, 1.0),
    "several answers, last counts (right)": (
        "x</think>\n<answer>1+2</answer><answer>44+19+35</answer>",
        NUMBERS,
        TARGET,
        None,
        1.0,
        1.0,
    ),
    "several answers, last counts (wrong)": (
        "x</think>\n<answer>44+19+35</answer><answer>1+2</answer>",
        NUMBERS,
        TARGET,
        None,
        1.0,
        0.0,
    ),
    "empty answer": (ok(""), NUMBERS, TARGET, None, 1.0, 0.0),
    "spaces-only answer": (ok("   "), NUMBERS, TARGET, None, 1.0, 0.0),
    "wrong numbers": (ok("44 + 19 + 36"), NUMBERS, "99", None, 1.0, 0.0),
    "number repeated": (ok("44 + 44 + 10"), NUMBERS, TARGET, None, 1.0, 0.0),
    "extra number": (ok("44 + 19 + 35 + 0"), NUMBERS, TARGET, None, 1.0, 0.0),
    "missing number": (ok("44 + 54"), NUMBERS, TARGET, None, 1.0, 0.0),
    "repeated given number used twice": (ok("(8 + 8) * 4 - 1"), [8, 8, 4, 1], "63", None, 1.0, 1.0),
    "disallowed character x": (ok("44 x 19 + 35"), NUMBERS, TARGET, None, 1.0, 0.0),
    "disallowed equals sign": (ok("44 + 19 + 35 = 98"), NUMBERS, TARGET, None, 1.0, 0.0),
    "disallowed decimal point": (ok("44.0 + 19 + 35"), NUMBERS, TARGET, None, 1.0, 0.0),
    "nested parentheses": (ok("((44 - (19 - 35)) + 38)"), [44, 19, 35, 38], TARGET, None, 1.0, 1.0),
    "non-integer intermediate": (ok("(83 - (78 / 39)) + 1"), [83, 78, 39, 1], "82", None, 1.0, 1.0),
    "fractional intermediate": (ok("(1 / 3) * 3 * 98"), [1, 3, 3, 98], TARGET, None, 1.0, 1.0),
    "non-integer target": (ok("5 / 2"), [5, 2], "2.5", None, 1.0, 1.0),
    "division by zero": (ok("44 / (19 - 19) + 35"), [44, 19, 19, 35], TARGET, None, 1.0, 0.0),
    "floor division": (ok("99 // 2 + 49"), [99, 2, 49], TARGET, None, 1.0, 1.0),
    "floor division by zero": (ok("99 // (2 - 2)"), [99, 2, 2], TARGET, None, 1.0, 0.0),
    "power": (ok("2 ** 5 * 3 + 2"), [2, 5, 3, 2], TARGET, None, 1.0, 1.0),
    "power to a fraction": (ok("9604 ** (1 / 2)"), [9604, 1, 2], TARGET, None, 1.0, 1.0),
    "negative base fractional power is complex": (
        ok("(1 - 9) ** (1 / 3)"),
        [1, 9, 1, 3],
        "2",
        None,
        1.0,
        0.0,
    ),
    "huge power overflows float": (ok("99 ** 99 ** 2"), [99, 99, 2], TARGET, None, 1.0, 0.0),
    "huge intermediate power cancels": (
        ok("99 ** 99 - 99 ** 99 + 98"),
        [99] * 4 + [98],
        TARGET,
        None,
        1.0,
        1.0,
    ),
    "unary minus": (ok("-(-98)"), [98], TARGET, None, 1.0, 1.0),
    "implicit multiplication is a call": (ok("2(49)"), [2, 49], TARGET, None, 1.0, 0.0),
    "empty parentheses": (ok("()"), [], TARGET, None, 1.0, 0.0),
    "leading zero is a syntax error": (ok("098"), [98], TARGET, None, 1.0, 0.0),
    "zeros only literal": (ok("00 + 98"), [0, 98], TARGET, None, 1.0, 1.0),
    "unbalanced parentheses": (ok("(44 + 19 + 35"), NUMBERS, TARGET, None, 1.0, 0.0),
    "unparsable target": (ok("44 + 19 + 35"), NUMBERS, "ninety-eight", None, 1.0, 0.0),
    "think tag inside answer": (
        "x</think>\n<answer><think>98</think></answer>",
        [98],
        TARGET,
        None,
        1.0,
        0.0,
    ),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_reward_table(case):
    response, numbers, target, end_token, want_format, want_answer = CASES[case]
    got = reward(response, numbers, target, end_token)
    assert got == CountdownReward(
        format=want_format, answer=want_answer, total=want_format * 0.1 + want_answer
    )
    total, fmt, ans = _reference_reward(response, numbers, target, end_token)
    assert (got.total, got.format, got.answer) == (total, fmt, ans), "differs from the reference"


def test_huge_exponent_is_bounded_not_evaluated():
    # The reference's eval would compute 9**387420489 (~1.2e9 bits): ours refuses at once.
    assert evaluate_expression("9**9**9") is None
    assert answer_reward(ok("9**9**9"), [9, 9, 9], "98") == 0.0
    assert evaluate_expression("2**10") == 1024.0


def test_reference_split_prompts_and_solutions():
    rows = json.loads(REFERENCE_SPLIT.read_text())
    assert len(rows) == 200
    for row in rows:
        assert make_prompt(row["numbers"], row["target"]) == row["context"], f"row {row['id']}"
        solved = answer_reward(f"<answer>{row['solution']}</answer>", row["numbers"], row["target"])
        assert solved == 1.0, f"row {row['id']}: solution {row['solution']!r} does not score"


def test_prompt_renders_numbers_like_numpy():
    assert "Using the numbers [41 36  8  4], create an equation that equals 17." in make_prompt(
        [41, 36, 8, 4], 17
    )
    assert make_prompt([1, 2, 3], "6").endswith("Let me solve this step by step.\n<think>")


ALLOWED = st.text(alphabet="0123456789+-*/() ", max_size=40)


@settings(max_examples=400, deadline=2000)
@given(ALLOWED)
def test_evaluator_never_raises_on_allowed_characters(expression):
    value = evaluate_expression(expression)
    assert value is None or isinstance(value, float)


@settings(max_examples=300, deadline=2000)
@given(st.text(alphabet="0123456789+-*/() ", max_size=30).filter(lambda s: "**" not in s))
def test_evaluator_equals_eval_without_powers(expression):
    # Without `**`, eval cannot hang, so the reference itself is a safe oracle.
    try:
        expected = float(eval(expression, {"__builtins__": None}, {}))  # noqa: S307
    except Exception:  # noqa: BLE001
        expected = None
    assert evaluate_expression(expression) == expected


@settings(max_examples=200, deadline=2000)
@given(st.lists(st.sampled_from(["9", "99", "**", "(", ")", "*", "-"]), max_size=12).map(" ".join))
def test_evaluator_never_hangs_on_powers(expression):
    value = evaluate_expression(expression)
    assert value is None or isinstance(value, float)


@settings(max_examples=300, deadline=2000)
@given(st.text(max_size=80), st.lists(st.integers(1, 99), min_size=3, max_size=4))
def test_reward_never_raises(response, numbers):
    got = reward(response, numbers, "50", EOS)
    assert got.format in (0.0, 0.1, 0.5, 0.6, 1.0) and got.answer in (0.0, 1.0)
