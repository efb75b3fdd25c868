"""The conciseness task of the ES paper: answer a question in as few characters as its reference answer.

Qiu et al. 2025, "Evolution Strategies at Scale", Sec. 4.3 (the reference repo's
`es_fine-tuning_conciseness.py`): prompts are questions with short reference answers, decoding is greedy
(100 new tokens), and the reward of a completion is

    reward = -abs(len(response) - len(answer))          (characters)

where `response` is the model's completion ONLY, without the prompt, the end-of-sequence token or the
whitespace around it. The reference decodes `model.generate`'s whole output, prompt included, so its
reward is -(len(prompt) + len(completion) - len(answer)) whenever the prompt is longer than the answer:
that rewards shortness alone and cannot tell "8" from an empty reply. This module scores the completion
only. Since a length reward can be gamed by any reply of the right length, every score also carries
`contains_answer`: 1.0 when the reference answer appears in the response as a whole word or number
(case-insensitive), the check that answers stay answers.

Data: JSONL rows {"question": str, "answer": str} (the reference repo's format), or the default split
`generate_rows`: arithmetic and short factual and yes/no questions with one-word or number answers,
generated deterministically without a random generator.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ConcisenessProblem:
    """One question: `id` (its row number in the file, or a generated id), `prompt` (the question as the
    model sees it before any chat template), and the short reference `answer`."""

    id: int | str
    prompt: str
    answer: str


@dataclass(frozen=True)
class ConcisenessReward:
    """The score of one response: `total` = -`length_diff` (characters), and `contains_answer` in {0, 1}."""

    total: float
    length_diff: float
    contains_answer: float


def response_text(completion: str) -> str:
    """The part of a completion that is scored: the completion (already without the prompt and the
    end-of-sequence token) with surrounding whitespace removed."""
    return completion.strip()


def contains_answer(response: str, answer: str) -> bool:
    """True when `answer` occurs in `response` case-insensitively and not inside a longer word or number
    ("8" is in "It is 8." but not in "18")."""
    pattern = r"(?<![0-9A-Za-z])" + re.escape(answer.strip()) + r"(?![0-9A-Za-z])"
    return bool(answer.strip()) and re.search(pattern, response, re.IGNORECASE) is not None


def reward(completion: str, answer: str) -> ConcisenessReward:
    """The conciseness reward of `completion` (the model's output after the prompt, no EOS) for the
    reference `answer`: -abs(len(response) - len(answer)) in characters, response = `response_text`."""
    response = response_text(completion)
    diff = float(abs(len(response) - len(answer)))
    return ConcisenessReward(
        total=-diff, length_diff=diff, contains_answer=float(contains_answer(response, answer))
    )


class ConcisenessDataError(ValueError):
    """A malformed conciseness row; the message names the source, the row and the field."""


def parse_row(row: Any, index: int, source: str) -> ConcisenessProblem:
    """A JSONL row {"question": str, "answer": str} (other keys ignored) as a problem with id `index`.

    Raises:
        ConcisenessDataError: not an object, or a field missing, not a string or empty (named with
            `source` and the 1-based row number).
    """
    where = f"{source}: row {index + 1}"
    if not isinstance(row, dict):
        raise ConcisenessDataError(f"{where}: expected an object with 'question' and 'answer', got {row!r}")
    for key in ("question", "answer"):
        if key not in row:
            raise ConcisenessDataError(f"{where}: missing field '{key}'")
        if not isinstance(row[key], str) or not row[key].strip():
            raise ConcisenessDataError(f"{where}: field '{key}' must be a non-empty string, got {row[key]!r}")
    return ConcisenessProblem(id=index, prompt=row["question"], answer=row["answer"])


# Facts with one-word answers for the default split (general knowledge; answers as a reply would give them).
_CAPITALS = (
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Japan", "Tokyo"), ("Canada", "Ottawa"), ("Egypt", "Cairo"), ("Russia", "Moscow"),
    ("Greece", "Athens"), ("Portugal", "Lisbon"), ("Norway", "Oslo"), ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Poland", "Warsaw"), ("Austria", "Vienna"),
    ("Ireland", "Dublin"), ("China", "Beijing"), ("India", "Delhi"), ("Kenya", "Nairobi"),
    ("Peru", "Lima"), ("Chile", "Santiago"), ("Cuba", "Havana"), ("Thailand", "Bangkok"),
    ("Belgium", "Brussels"), ("Hungary", "Budapest"), ("Turkey", "Ankara"), ("Argentina", "Buenos Aires"),
    ("Australia", "Canberra"), ("Mexico", "Mexico City"),
)  # fmt: skip
_FACTS = (
    ("What color is the sky on a clear day?", "Blue"),
    ("What color is grass?", "Green"),
    ("What color is snow?", "White"),
    ("How many days are in a week?", "7"),
    ("How many months are in a year?", "12"),
    ("How many hours are in a day?", "24"),
    ("How many minutes are in an hour?", "60"),
    ("How many legs does a spider have?", "8"),
    ("How many legs does a dog have?", "4"),
    ("How many sides does a triangle have?", "3"),
    ("How many sides does a square have?", "4"),
    ("What is the largest planet in the solar system?", "Jupiter"),
    ("Which planet is known as the red planet?", "Mars"),
    ("What is the chemical symbol of gold?", "Au"),
    ("What is the chemical symbol of water?", "H2O"),
    ("What gas do plants take in from the air?", "CO2"),
    ("What is the freezing point of water in degrees Celsius?", "0"),
    ("What is the boiling point of water in degrees Celsius?", "100"),
    ("Which animal is known as the king of the jungle?", "Lion"),
    ("What is the opposite of hot?", "Cold"),
    ("What is the opposite of up?", "Down"),
    ("What is the opposite of day?", "Night"),
    ("Which ocean is the largest?", "Pacific"),
    ("What is the first letter of the English alphabet?", "A"),
    ("Who wrote Romeo and Juliet?", "Shakespeare"),
)
_WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def _candidates() -> list[tuple[str, str]]:
    """Every question of the default split with its answer, in a fixed order (ids are positions here)."""
    rows: list[tuple[str, str]] = []
    rows += [(f"What is the capital of {country}?", city) for country, city in _CAPITALS]
    rows += list(_FACTS)
    for a in range(2, 20):
        for b in range(2, 10):
            rows.append((f"Solve: {a} + {b} =", str(a + b)))
            rows.append((f"What is {a} times {b}?", str(a * b)))
            if a > b:
                rows.append((f"Solve: {a} - {b} =", str(a - b)))
            rows.append((f"Is {a} greater than {b}? Answer yes or no.", "Yes" if a > b else "No"))
    for n in range(2, 40):
        rows.append((f"Is {n} an even number? Answer yes or no.", "Yes" if n % 2 == 0 else "No"))
    rows += [(f"Write the number {word} as a digit.", str(i + 1)) for i, word in enumerate(_WORDS)]
    return rows


def generate_rows(size: int, seed: int = 0) -> list[dict[str, str]]:
    """The default conciseness data: `size` distinct {"question", "answer"} rows, chosen and ordered by
    sha256(seed, question) from a fixed pool (`_candidates`, about 900 questions), so the same on every
    machine and Python version.

    Raises:
        ValueError: `size` is negative or larger than the pool.
    """
    pool = _candidates()
    if not 0 <= size <= len(pool):
        raise ValueError(f"the default conciseness data has {len(pool)} questions; asked for {size}")

    def rank(row: tuple[str, str]) -> str:
        return hashlib.sha256(f"{seed}:{row[0]}".encode()).hexdigest()

    return [{"question": q, "answer": a} for q, a in sorted(pool, key=rank)[:size]]
