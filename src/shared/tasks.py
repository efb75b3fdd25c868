"""Tasks: what a rollout is asked and how its completion is scored, one interface for the driver and engines.

A task crosses the driver/engine boundary. The driver reads or generates its problems, picks each
iteration's batch and sends the problem records; each engine renders the prompts (raw, or through the
model's chat template when the run says so), generates, and scores every completion with the task's
reward. Both sides find the task by the same name (`load_task`), so both PEX files must hold its code:

  - "countdown": Qiu et al. 2025's Countdown (`shared.countdown`), the default;
  - "conciseness": the paper's conciseness task (`shared.conciseness`);
  - "package.module:Class": a `Task` subclass in the source tree (for example under src/tasks/, which both
    the driver and every engine PEX include). It is imported from the PEX, never from outside it: a task's
    code is locked and shipped like the rest.

A reward is a `TaskReward`: the `total` that ES maximises, plus named components (metrics.jsonl and
TensorBoard get each component's mean). `Task.accuracy` names the component reported as the run's accuracy.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any, ClassVar

from shared import conciseness, countdown


@dataclass(frozen=True)
class TaskReward:
    """The score of one completion: `total` (what ES maximises; the task's units) and `components`,
    component name -> value (the names are the task's `components`, in that order)."""

    total: float
    components: dict[str, float]


class TaskError(ValueError):
    """A task name that cannot be loaded, or a task class that breaks the interface; names `--task`."""


class Task:
    """The interface of a task; subclass it and set the class attributes.

    Class attributes:
        name: the task's name (recorded in the run's config).
        components: names of the reward's components, in the order they are reported.
        accuracy: the component whose mean is the run's `accuracy` (eval rows, `evaluate`).
        chat_template: whether prompts go through the model's chat template by default (instruct
            models); a run's `--chat-template/--no-chat-template` overrides it.

    Problems are frozen dataclasses with at least `id` (int or str, unique) and `prompt` (str): they are
    pickled to the engines, so both PEX files must hold their class.
    """

    name: ClassVar[str] = ""
    components: ClassVar[tuple[str, ...]] = ()
    accuracy: ClassVar[str] = ""
    chat_template: ClassVar[bool] = False

    def prompt(self, problem: Any) -> str:
        """The text the model continues (before any chat template): `problem.prompt` by default."""
        return problem.prompt

    def reward(self, problem: Any, completion: str, finished: bool) -> TaskReward:
        """The reward of `completion`: the generated text after the prompt, without the end-of-sequence
        token; `finished` is True when that token ended it (False: cut at max_new_tokens)."""
        raise NotImplementedError

    def problem(self, row: Any, index: int, source: str) -> Any:
        """A problem from row `index` (0-based) of a JSONL data file `source` (`--dataset-path`).

        Raises:
            ValueError: a malformed row (the message names `source`, the 1-based row and the field).
        """
        raise NotImplementedError(f"task {self.name!r} reads no JSONL data")

    def generate(self, size: int, seed: int) -> list[Any]:
        """`size` problems of the task's default data, the same for the same `seed` on every machine."""
        raise NotImplementedError(f"task {self.name!r} has no default data; pass --dataset-path")

    def digest_row(self, problem: Any) -> list[Any]:
        """What identifies a problem in the run's problems digest (resume checks the data is the same):
        by default every field."""
        return list(dataclasses.astuple(problem))


class CountdownTask(Task):
    """Countdown (Qiu et al. 2025, Sec. 4.1; `shared.countdown`): total = 0.1 * format + answer; its data
    sources (generated, the reference JSON, Hugging Face rows) live in `driver.countdown_data`."""

    name = "countdown"
    components = ("answer", "format")
    accuracy = "answer"
    chat_template = False  # the reference prompt is raw text that ends in "<think>"

    def reward(self, problem: countdown.CountdownProblem, completion: str, finished: bool) -> TaskReward:
        scored = countdown.reward(completion, problem.numbers, problem.target)
        return TaskReward(total=scored.total, components={"answer": scored.answer, "format": scored.format})

    def digest_row(self, problem: countdown.CountdownProblem) -> list[Any]:
        return [problem.id, problem.prompt, list(problem.numbers), problem.target]


class ConcisenessTask(Task):
    """Conciseness (Qiu et al. 2025, Sec. 4.3; `shared.conciseness`): total = -|len(response) -
    len(answer)| in characters, with `contains_answer` (the check that a short reply still answers)."""

    name = "conciseness"
    components = ("length_diff", "contains_answer")
    accuracy = "contains_answer"
    chat_template = True  # questions for instruct models

    def reward(self, problem: conciseness.ConcisenessProblem, completion: str, finished: bool) -> TaskReward:
        scored = conciseness.reward(completion, problem.answer)
        return TaskReward(
            total=scored.total,
            components={"length_diff": scored.length_diff, "contains_answer": scored.contains_answer},
        )

    def problem(self, row: Any, index: int, source: str) -> conciseness.ConcisenessProblem:
        return conciseness.parse_row(row, index, source)

    def generate(self, size: int, seed: int) -> list[conciseness.ConcisenessProblem]:
        return [
            conciseness.parse_row(row, i, "generated data")
            for i, row in enumerate(conciseness.generate_rows(size, seed))
        ]


TASKS: dict[str, type[Task]] = {CountdownTask.name: CountdownTask, ConcisenessTask.name: ConcisenessTask}


@cache
def load_task(spec: str) -> Task:
    """The task `spec` names: a key of `TASKS`, or "package.module:Class" for a `Task` subclass importable
    from this process's environment (the PEX). One instance per spec and process.

    Raises:
        TaskError: unknown name, a module or class that cannot be imported, not a `Task` subclass, or
            components that do not include its `accuracy`.
    """
    if spec in TASKS:
        return TASKS[spec]()
    module_name, sep, class_name = spec.partition(":")
    if not sep or not module_name or not class_name:
        raise TaskError(f"--task: expected one of {', '.join(TASKS)} or package.module:Class, got {spec!r}")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as e:
        raise TaskError(
            f"--task: cannot import {spec!r} ({e}); a task's module must be in the source tree that the "
            "driver and engine PEX files are built from (e.g. src/tasks/)"
        ) from e
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise TaskError(f"--task: {spec!r} is not a subclass of shared.tasks.Task")
    if not cls.name or cls.accuracy not in cls.components:
        raise TaskError(
            f"--task: {spec!r} must set `name` and list its `accuracy` component ({cls.accuracy!r}) in "
            f"`components` {cls.components!r}"
        )
    return cls()


def mean_components(task: Task, scores: Sequence[dict[str, Sequence[float]]]) -> dict[str, float]:
    """Each component's mean over the per-problem values of several rollouts (`RolloutResult.components`),
    plus "accuracy": the mean of `task.accuracy`."""
    means = {}
    for name in task.components:
        values = [v for s in scores for v in s[name]]
        means[name] = float(sum(values) / len(values)) if values else 0.0
    means["accuracy"] = means[task.accuracy]
    return means
