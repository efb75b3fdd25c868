"""An example of a user's own task (`--task tasks.yes_no:YesNo`): answer yes/no questions with one word.

It reuses the conciseness data's format ({"question", "answer"} JSONL rows, `--dataset-path`) and scores
1.0 for a reply that is exactly the reference answer ("Yes" or "No", any case, a final "." allowed), 0.1
for one that contains it, else 0.
"""

from __future__ import annotations

from shared.conciseness import ConcisenessProblem, contains_answer, parse_row, response_text
from shared.tasks import Task, TaskReward


class YesNo(Task):
    """Yes/no questions answered in one word; `exact` is the share of replies that are the answer alone."""

    name = "yes-no"
    components = ("exact", "contains")
    accuracy = "exact"
    chat_template = True

    def reward(self, problem: ConcisenessProblem, completion: str, finished: bool) -> TaskReward:
        reply = response_text(completion).rstrip(".").lower()
        exact = float(reply == problem.answer.lower())
        contains = float(contains_answer(reply, problem.answer))
        return TaskReward(total=max(exact, 0.1 * contains), components={"exact": exact, "contains": contains})

    def problem(self, row: object, index: int, source: str) -> ConcisenessProblem:
        return parse_row(row, index, source)
