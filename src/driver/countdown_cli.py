"""`./pants run src/driver:countdown -- generate|score ...`: Countdown datasets and scoring.

generate --count N [--seed S] --out FILE.json
    writes N generated solvable problems in the reference JSON format.
score --responses FILE.jsonl [--end-token TOKEN]
    scores (problem, response) pairs, one JSON object per line: {"response": str} plus either
    {"problem": {...}} or the problem's fields at top level, with "numbers" (or "nums") and "target".
    Prints the count, accuracy (share of answer reward 1) and mean rewards.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from driver.countdown_data import CountdownDataError, generate, parse_numbers, parse_target, write_reference
from shared.countdown import reward


def _score(path: Path, end_token: str | None) -> dict[str, float]:
    totals = {"count": 0, "answer": 0.0, "format": 0.0, "reward": 0.0}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}: line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise CountdownDataError(f"{where}: not valid JSON: {e}") from e
        if not isinstance(row, dict) or not isinstance(row.get("response"), str):
            raise CountdownDataError(f"{where}: field 'response': expected a string")
        problem = row.get("problem", row)
        if not isinstance(problem, dict):
            raise CountdownDataError(f"{where}: field 'problem': expected an object")
        field = "numbers" if "numbers" in problem else "nums"
        if field not in problem or "target" not in problem:
            raise CountdownDataError(f"{where}: missing field 'numbers' (or 'nums') or 'target'")
        got = reward(
            row["response"],
            parse_numbers(problem[field], where, field),
            parse_target(problem["target"], where),
            end_token,
        )
        totals["count"] += 1
        totals["answer"] += got.answer
        totals["format"] += got.format
        totals["reward"] += got.total
    n = max(totals["count"], 1)
    return {
        "count": totals["count"],
        "accuracy": totals["answer"] / n,
        "mean_format": totals["format"] / n,
        "mean_reward": totals["reward"] / n,
    }


def main(argv: list[str] | None = None) -> int:
    """Runs the command; returns the exit status (0 ok, 2 bad input)."""
    parser = argparse.ArgumentParser(prog="countdown", description="Countdown datasets and scoring.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="write generated problems in the reference JSON format")
    gen.add_argument("--count", type=int, required=True, help="number of problems")
    gen.add_argument("--seed", type=int, default=0, help="generator seed (default: %(default)s)")
    gen.add_argument("--out", type=Path, required=True, help="output JSON file")
    score = sub.add_parser("score", help="score a JSONL file of (problem, response) pairs")
    score.add_argument("--responses", type=Path, required=True, help="input JSONL file")
    score.add_argument("--end-token", default=None, help="end token stripped before the format check")
    args = parser.parse_args(argv)
    try:
        if args.command == "generate":
            problems = generate(args.count, seed=args.seed)
            write_reference(problems, args.out)
            print(f"wrote {len(problems)} problems (seed {args.seed}) to {args.out}")
        else:
            result = _score(args.responses, args.end_token)
            print(
                f"{result['count']} responses: accuracy {result['accuracy']:.4f}, "
                f"mean reward {result['mean_reward']:.4f}, mean format {result['mean_format']:.4f}"
            )
    except (CountdownDataError, ValueError, OSError) as e:
        print(f"countdown: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
