"""The task interface (shared.tasks): the conciseness reward against hand-computed cases, its data and
their errors, loading tasks by name or class path, and the options that select them."""

from __future__ import annotations

import json

import pytest

from driver.datafiles import DatasetError
from driver.task_data import load_problems
from driver.train_config import ConfigError, TrainConfig
from shared import conciseness
from shared.countdown import CountdownProblem, make_prompt
from shared.countdown import reward as countdown_reward
from shared.tasks import ConcisenessTask, CountdownTask, Task, TaskError, TaskReward, load_task


@pytest.mark.parametrize(
    ("completion", "answer", "total", "contains"),
    [
        ("8", "8", 0.0, 1.0),
        ("The answer is 8.", "8", -15.0, 1.0),  # 16 characters against 1
        ("  Paris\n", "Paris", 0.0, 1.0),  # whitespace around the reply is not counted
        ("", "8", -1.0, 0.0),  # an empty reply is not an answer
        ("18", "8", -1.0, 0.0),  # "8" inside "18" is not the answer
        ("paris, of course", "Paris", -11.0, 1.0),  # case-insensitive containment
        ("Mexico City", "Mexico City", 0.0, 1.0),
    ],
)
def test_conciseness_reward_by_hand(completion, answer, total, contains):
    scored = conciseness.reward(completion, answer)
    assert scored.total == total and scored.length_diff == -total
    assert scored.contains_answer == contains


def test_the_prompt_is_not_counted():
    """The reference decodes prompt + completion; here only the completion is scored, so a one-character
    reply to a long question scores 0 against a one-character answer."""
    problem = conciseness.ConcisenessProblem(id=0, prompt="What is 3 + 5? Reply with the number.", answer="8")
    task = ConcisenessTask()
    assert task.reward(problem, "8", True).total == 0.0
    assert task.reward(problem, problem.prompt + "8", True).total == -float(len(problem.prompt))


def test_countdown_task_keeps_the_countdown_reward():
    numbers, target = (44, 19, 35), "98"
    response = " 44 + 19 + 35 = 98 </think>\n<answer> 44 + 19 + 35 </answer>"
    p = CountdownProblem(id=0, prompt=make_prompt(numbers, target), numbers=numbers, target=target)
    expected = countdown_reward(response, numbers, target)
    scored = CountdownTask().reward(p, response, True)
    assert scored.total == expected.total == 1.1
    assert scored.components == {"answer": expected.answer, "format": expected.format}


def test_default_conciseness_data_is_deterministic_and_large_enough():
    rows = conciseness.generate_rows(264, seed=0)
    assert rows == conciseness.generate_rows(264, seed=0)
    assert rows != conciseness.generate_rows(264, seed=1)
    assert len({r["question"] for r in rows}) == 264
    assert all(r["answer"] and len(r["answer"]) <= 12 for r in rows)
    with pytest.raises(ValueError, match="questions; asked for 100000"):
        conciseness.generate_rows(100_000)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"question": "Q?"}', r"rows\.jsonl: row 2: missing field 'answer'"),
        (
            '{"question": 3, "answer": "x"}',
            r"rows\.jsonl: row 2: field 'question' must be a non-empty string",
        ),
        ('["Q?", "A"]', r"rows\.jsonl: row 2: expected an object"),
        ("{not json", r"rows\.jsonl: line 2: not valid JSON"),
    ],
)
def test_bad_conciseness_rows_name_file_row_and_field(tmp_path, line, message):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"question": "What is 2 + 2?", "answer": "4"}\n' + line + "\n")
    config = TrainConfig(task="conciseness", dataset_path=str(path), eval_size=0, prompts_per_member=1)
    with pytest.raises(DatasetError, match=message):
        load_problems(config)


def test_conciseness_jsonl_and_generated_splits(tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [{"question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(20)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = TrainConfig(task="conciseness", dataset_path=str(path), eval_size=5, prompts_per_member=4)
    problems = load_problems(config)
    assert len(problems.train) == 15 and len(problems.eval) == 5
    assert {p.answer for p in problems.train + problems.eval} == {r["answer"] for r in rows}
    generated = load_problems(TrainConfig(task="conciseness"))
    assert len(generated.train) == 200 and len(generated.eval) == 64
    assert generated.digest() == load_problems(TrainConfig(task="conciseness")).digest()
    assert generated.digest() != problems.digest()


def test_task_options():
    assert TrainConfig().chat_template is False  # Countdown's reference prompt is raw
    assert TrainConfig(task="conciseness").chat_template is True
    assert TrainConfig(task="conciseness", chat_template=False).chat_template is False
    with pytest.raises(ConfigError, match="--task: expected one of countdown, conciseness"):
        TrainConfig(task="nonsense")
    with pytest.raises(ConfigError, match="--task: cannot import 'no_such_module:Task'"):
        TrainConfig(task="no_such_module:Task")
    with pytest.raises(ConfigError, match="--dataset: reference is a Countdown source"):
        TrainConfig(task="conciseness", dataset="reference", dataset_path="x.json")


class Exclaim(Task):
    """A user task: the reward is 1 when the completion ends with "!"."""

    name = "exclaim"
    components = ("exclaimed",)
    accuracy = "exclaimed"

    def reward(self, problem, completion, finished):
        value = float(completion.rstrip().endswith("!"))
        return TaskReward(total=value, components={"exclaimed": value})


class NotATask:
    name = "x"


def test_load_a_user_task_by_class_path():
    task = load_task("test_tasks:Exclaim")
    assert isinstance(task, Exclaim) and load_task("test_tasks:Exclaim") is task
    assert task.reward(None, "Hello!", True).total == 1.0
    with pytest.raises(TaskError, match="not a subclass of shared.tasks.Task"):
        load_task("test_tasks:NotATask")
    with pytest.raises(NotImplementedError, match="has no default data"):
        task.generate(1, 0)


def test_the_example_user_task_in_the_source_tree():
    """src/tasks/yes_no.py, the documented example: loaded by class path, scoring as its docstring says."""
    task = load_task("tasks.yes_no:YesNo")
    problem = task.problem({"question": "Is 7 an even number?", "answer": "No"}, 0, "rows.jsonl")
    assert task.reward(problem, " No.", True).total == 1.0
    assert task.reward(problem, "No, 7 is odd.", True).components == {"exact": 0.0, "contains": 1.0}
    assert task.reward(problem, "Yes", True).total == 0.0
