"""Countdown data sources, all yielding `shared.countdown.CountdownProblem`, and deterministic splits.

Sources:
  reference  the ES paper's JSON format: a list of {"id", "context" (the full prompt), "numbers",
             "target" (a string), "solution" (a string or null)};
  hf         rows of the Hugging Face `Countdown-Tasks-3to4` format ({"nums", "target"}) from a local JSON
             (a list of rows), JSONL or Parquet file; prompts are built with the reference template;
  generated  a seeded generator of solvable problems, so the project runs with no files at all.
Malformed input raises CountdownDataError naming the file, the row and the field.
"""

from __future__ import annotations

import hashlib
import operator
import random
from collections.abc import Iterable, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

from driver.datafiles import DatasetError, read_json, read_jsonl
from shared.countdown import CountdownProblem, make_prompt
from shared.run_layout import write_json_atomic

# The reference split's ranges: 3 or 4 numbers in 1..99, integer targets in 10..100.
NUMBER_RANGE = (1, 99)
TARGET_RANGE = (10, 100)
SIZES = (3, 4)
_OPERATORS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}


class CountdownDataError(DatasetError):
    """A Countdown data file or row is malformed; the message names the file, row and field."""


def _integer(value: Any) -> int | None:
    """`value` as an int if it is an integer (Python or numpy/pyarrow scalar, not bool), else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def parse_numbers(value: Any, where: str, field: str) -> tuple[int, ...]:
    """A non-empty list of integers that fit a signed 64-bit integer (the reference renders them as a
    numpy int64 array), or CountdownDataError naming `where` (file and row) and `field`."""
    if not isinstance(value, list | tuple) or not value:
        raise CountdownDataError(
            f"{where}: field '{field}': expected a non-empty list of integers, got {value!r}"
        )
    numbers = tuple(_integer(item) for item in value)
    if None in numbers:
        raise CountdownDataError(f"{where}: field '{field}': expected integers, got {value!r}")
    if any(not -(2**63) <= n < 2**63 for n in numbers):
        raise CountdownDataError(
            f"{where}: field '{field}': expected integers within a signed 64-bit range, got {value!r}"
        )
    return numbers


def parse_target(value: Any, where: str) -> str:
    """A target as its string (a numeric string or an integer), or CountdownDataError naming `where`."""
    if isinstance(value, str) and value.strip():
        try:
            float(value)
        except ValueError:
            raise CountdownDataError(f"{where}: field 'target': expected a number, got {value!r}") from None
        return value
    if _integer(value) is not None:
        return str(_integer(value))
    raise CountdownDataError(f"{where}: field 'target': expected a string or an integer, got {value!r}")


def _require(row: Any, where: str, *fields: str) -> dict:
    if not isinstance(row, dict):
        raise CountdownDataError(f"{where}: expected an object, got {type(row).__name__}")
    missing = [f for f in fields if f not in row]
    if missing:
        raise CountdownDataError(f"{where}: missing field(s) {missing}")
    return row


def parse_reference_rows(rows: Any, source: str) -> list[CountdownProblem]:
    """Parses rows of the reference format (see module docstring). `source` names the origin in errors."""
    if not isinstance(rows, list):
        raise CountdownDataError(f"{source}: expected a JSON list of rows, got {type(rows).__name__}")
    problems = []
    first_row: dict[int | str, int] = {}
    for i, row in enumerate(rows):
        where = f"{source}: row {i}"
        row = _require(row, where, "id", "context", "numbers", "target")
        if not isinstance(row["context"], str) or not row["context"]:
            raise CountdownDataError(f"{where}: field 'context': expected the prompt string")
        if not isinstance(row["id"], int | str) or isinstance(row["id"], bool):
            raise CountdownDataError(
                f"{where}: field 'id': expected an integer or a string, got {row['id']!r}"
            )
        if row["id"] in first_row:
            raise CountdownDataError(
                f"{where}: field 'id': {row['id']!r} is the id of row {first_row[row['id']]} too; ids must "
                "be unique (the held-out split is chosen by id)"
            )
        first_row[row["id"]] = i
        solution = row.get("solution")
        if solution is not None and not isinstance(solution, str):
            raise CountdownDataError(
                f"{where}: field 'solution': expected a string or null, got {solution!r}"
            )
        problems.append(
            CountdownProblem(
                id=row["id"],
                prompt=row["context"],
                numbers=parse_numbers(row["numbers"], where, "numbers"),
                target=parse_target(row["target"], where),
                solution=solution,
            )
        )
    return problems


def _countdown_error(read: Any, path: Path) -> Any:
    """`read(path)`, its DatasetError raised as CountdownDataError (same message)."""
    try:
        return read(path)
    except CountdownDataError:
        raise
    except DatasetError as e:
        raise CountdownDataError(str(e)) from e


def load_reference(path: str | Path) -> list[CountdownProblem]:
    """Loads a reference-format JSON file (e.g. the ES paper's countdown training split)."""
    path = Path(path)
    return parse_reference_rows(_countdown_error(read_json, path), str(path))


def _hf_rows(path: Path) -> Iterable[Any]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several unrelated types for a bad file
            raise CountdownDataError(f"{path}: not a readable Parquet file: {e}") from e
    if suffix == ".jsonl":
        return _countdown_error(read_jsonl, path)
    if suffix == ".json":
        rows = _countdown_error(read_json, path)
        if not isinstance(rows, list):
            raise CountdownDataError(f"{path}: expected a JSON list of rows, got {type(rows).__name__}")
        return rows
    raise CountdownDataError(f"{path}: unknown file type {suffix!r}; expected .json, .jsonl or .parquet")


def load_hf(path: str | Path) -> list[CountdownProblem]:
    """Loads `Countdown-Tasks-3to4` rows ({"nums": [...], "target": int}) from .json, .jsonl or .parquet.

    Ids are the row indices; prompts are built with the reference template; solutions are None.
    """
    path = Path(path)
    problems = []
    for i, row in enumerate(_hf_rows(path)):
        where = f"{path}: row {i}"
        row = _require(row, where, "nums", "target")
        numbers = parse_numbers(row["nums"], where, "nums")
        target = parse_target(row["target"], where)
        problems.append(
            CountdownProblem(id=i, prompt=make_prompt(numbers, target), numbers=numbers, target=target)
        )
    return problems


class _Draws:
    """Uniform draws from Python's Mersenne Twister via `random()`, whose sequence for a given seed is
    guaranteed stable across Python versions and machines (unlike randrange/choice)."""

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(f"hermetic-es/countdown/{seed}")

    def below(self, n: int) -> int:
        return min(int(self._rng.random() * n), n - 1)


def _random_solution(numbers: Sequence[int], draws: _Draws) -> tuple[str, Fraction] | None:
    items = [(str(n), Fraction(n)) for n in numbers]
    while len(items) > 1:
        a = items.pop(draws.below(len(items)))
        b = items.pop(draws.below(len(items)))
        symbol = list(_OPERATORS)[draws.below(len(_OPERATORS))]
        if symbol == "/" and b[1] == 0:
            return None
        items.append((f"({a[0]} {symbol} {b[0]})", _OPERATORS[symbol](a[1], b[1])))
    return items[0]


def generate(
    count: int,
    seed: int = 0,
    sizes: Sequence[int] = SIZES,
    number_range: tuple[int, int] = NUMBER_RANGE,
    target_range: tuple[int, int] = TARGET_RANGE,
) -> list[CountdownProblem]:
    """Generates `count` solvable problems, the same for the same arguments on any machine.

    Each problem draws 3 or 4 numbers (`sizes`) in `number_range`, combines all of them in a random order
    with random + - * / into a fully parenthesised expression (like the reference's solutions), and keeps
    it when the exact value is an integer in `target_range`. Ids are "gen-<seed>-<index>".

    Raises:
        ValueError: count < 0, or empty/inverted ranges.
    """
    if count < 0 or not sizes or number_range[0] > number_range[1] or target_range[0] > target_range[1]:
        raise ValueError("count must be >= 0 and sizes/ranges non-empty")
    draws = _Draws(seed)
    low, high = number_range
    problems = []
    while len(problems) < count:
        size = sizes[draws.below(len(sizes))]
        numbers = [low + draws.below(high - low + 1) for _ in range(size)]
        solved = _random_solution(numbers, draws)
        if solved is None:
            continue
        expression, value = solved
        if value.denominator != 1 or not target_range[0] <= value <= target_range[1]:
            continue
        target = str(value.numerator)
        problems.append(
            CountdownProblem(
                id=f"gen-{seed}-{len(problems)}",
                prompt=make_prompt(numbers, target),
                numbers=tuple(numbers),
                target=target,
                solution=expression,
            )
        )
    return problems


def split(
    problems: Sequence[CountdownProblem], eval_size: int, seed: int = 0
) -> tuple[list[CountdownProblem], list[CountdownProblem]]:
    """Splits into (train, eval) deterministically: the `eval_size` problems with the smallest
    sha256(seed, id) go to eval. Both keep the input order. Depends only on ids and seed.

    Raises:
        ValueError: eval_size < 0 or larger than the number of problems, or duplicate ids.
    """
    if not 0 <= eval_size <= len(problems):
        raise ValueError(f"eval_size must be in [0, {len(problems)}], got {eval_size}")
    if len({p.id for p in problems}) != len(problems):
        raise ValueError("problem ids must be unique to split deterministically")

    def key(p: CountdownProblem) -> str:
        return hashlib.sha256(f"{seed}:{type(p.id).__name__}:{p.id}".encode()).hexdigest()

    eval_ids = {p.id for p in sorted(problems, key=key)[:eval_size]}
    return [p for p in problems if p.id not in eval_ids], [p for p in problems if p.id in eval_ids]


def to_reference_rows(problems: Iterable[CountdownProblem]) -> list[dict[str, Any]]:
    """The problems as reference-format rows (id, context, numbers, target, solution)."""
    return [
        {
            "id": p.id,
            "context": p.prompt,
            "numbers": list(p.numbers),
            "target": p.target,
            "solution": p.solution,
        }
        for p in problems
    ]


def write_reference(problems: Iterable[CountdownProblem], path: str | Path) -> None:
    """Writes problems in the reference JSON format, atomically (temporary file, then rename)."""
    write_json_atomic(Path(path), to_reference_rows(problems), sort_keys=False)
