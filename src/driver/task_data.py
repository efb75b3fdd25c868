"""A run's problems: read or generated for its task, split into train and held-out, batched per iteration.

Countdown's sources (generated, the reference JSON, Hugging Face rows) are `driver.countdown_data`'s.
Every other task (`shared.tasks`) reads JSONL rows through its `Task.problem` (`--dataset-path
FILE.jsonl`) or generates its default data (`Task.generate`). Both are split by `countdown_data.split`
(by id, seeded), and each iteration's batch is the problems with the smallest `shared.seeds.prompt_rank`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from driver.countdown_data import generate, load_hf, load_reference, split
from driver.datafiles import DatasetError, read_jsonl
from driver.train_config import ConfigError, TrainConfig
from shared.seeds import prompt_rank
from shared.tasks import CountdownTask, Task, load_task


@dataclass(frozen=True)
class Problems:
    """The run's problems of `task`: `train` for member rewards, `eval` held out for evaluation."""

    train: list[Any]
    eval: list[Any]
    task: Task = field(default_factory=CountdownTask)

    def digest(self) -> str:
        """SHA-256 over the problems of both splits, in order (each as `Task.digest_row`)."""
        rows = [[self.task.digest_row(p) for p in part] for part in (self.train, self.eval)]
        return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def _task_problems(task: Task, config: TrainConfig) -> list[Any]:
    """The problems of a task other than Countdown: its JSONL file's rows, or its default data."""
    if config.dataset_path is None:
        try:
            return task.generate(config.train_size + config.eval_size, config.seed)
        except NotImplementedError as e:
            raise ConfigError(f"--dataset-path: {e}") from e
        except ValueError as e:  # more problems than the default data has
            raise ConfigError(
                f"--train-size/--eval-size: {config.train_size} + {config.eval_size} problems of task "
                f"{task.name}: {e}"
            ) from e
    path = Path(config.dataset_path)
    if path.suffix.lower() != ".jsonl":
        raise DatasetError(f"--dataset-path: {path}: expected a .jsonl file of {task.name} rows")
    rows = read_jsonl(path)
    try:
        return [task.problem(row, i, str(path)) for i, row in enumerate(rows)]
    except NotImplementedError as e:
        raise ConfigError(f"--dataset-path: {e}") from e
    except DatasetError:
        raise
    except ValueError as e:
        raise DatasetError(str(e)) from e


def load_dataset(config: TrainConfig) -> tuple[Task, list[Any]]:
    """The configured task and every problem of its dataset (file rows in order, or generated:
    --train-size + --eval-size of them), before any split.

    Raises:
        DatasetError: the dataset file is missing or malformed (naming file, row and field).
        ConfigError: a task without default data and no --dataset-path.
        shared.tasks.TaskError: --task cannot be loaded.
    """
    task = load_task(config.task)
    if config.dataset_path is not None and not Path(config.dataset_path).is_file():
        raise DatasetError(f"--dataset-path: {config.dataset_path}: no such file")
    if task.name != CountdownTask.name:
        return task, _task_problems(task, config)
    if config.dataset == "generated":
        return task, generate(config.train_size + config.eval_size, seed=config.seed)
    path = Path(config.dataset_path)
    return task, load_reference(path) if config.dataset == "reference" else load_hf(path)


def load_problems(config: TrainConfig, training: bool = True) -> Problems:
    """The configured task's dataset (`load_dataset`), split into train and eval
    (`countdown_data.split`, seeded by config.seed: the same --eval-size problems are held out whether
    or not a run trains on the rest).

    Args:
        training: the split must leave --prompts-per-member training problems (False for an
            evaluation, which needs none).

    Raises:
        DatasetError: the dataset file is missing or malformed (naming file, row and field).
        ConfigError: --eval-size exceeds the dataset; with `training`, the split leaves fewer training
            problems than --prompts-per-member; a task without default data and no --dataset-path.
        shared.tasks.TaskError: --task cannot be loaded.
    """
    task, problems = load_dataset(config)
    if config.eval_size > len(problems):
        raise ConfigError(
            f"--eval-size: {config.eval_size} exceeds the {len(problems)} problems of the dataset"
        )
    try:
        train, held_out = split(problems, config.eval_size, seed=config.seed)
    except ValueError as e:
        raise DatasetError(f"{config.dataset_path or 'generated data'}: {e}") from e
    if training and len(train) < config.prompts_per_member:
        raise ConfigError(
            f"--prompts-per-member: {config.prompts_per_member} exceeds the {len(train)} training problems "
            f"left after holding out --eval-size {config.eval_size}"
        )
    return Problems(train=train, eval=held_out, task=task)


def prompt_batch(train: list[Any], root_seed: int, iteration: int, size: int) -> list[Any]:
    """The `size` training problems of `iteration`: those with the smallest `prompt_rank`, in rank order."""
    return sorted(train, key=lambda p: prompt_rank(root_seed, iteration, p.id))[:size]
