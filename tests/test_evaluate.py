"""What `evaluate` scores, resolved before any engine starts (`driver.evaluate.prepare`). The engines'
side (loading, replaying, scoring) is tested end to end in test_train.py and test_train_vllm_cpu.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from run_fixtures import make_base_model, write_checkpoint

from driver import held_out
from driver.config_sources import build_parser
from driver.evaluate import prepare
from driver.task_data import load_problems
from driver.train_config import ConfigError, TrainConfig
from shared.run_layout import COMPACT, FULL, RunDir, write_json_atomic


def options(*argv: str):
    return build_parser(prog="evaluate").parse_args(list(argv))


def questions(path: Path, rows: int) -> Path:
    """A conciseness JSONL file of `rows` questions."""
    lines = [json.dumps({"question": f"What is {i} plus 1?", "answer": str(i + 1)}) for i in range(rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def packaged_model_run(tmp_path) -> RunDir:
    """A conciseness run of the packaged SmolLM2 (`--model`, its base model imported into the run): the
    config it saved, a full checkpoint after 2 updates and a compact one after 3."""
    run = RunDir(tmp_path / "run")
    base = make_base_model(tmp_path / "run" / "base-model")
    config = TrainConfig(
        model="smollm2-135m-instruct",
        backend="vllm",
        task="conciseness",
        train_size=16,
        eval_size=8,
        prompts_per_member=4,
        batch_size=3,
        output_dir=str(run.root),
    )
    write_json_atomic(run.config, config.to_dict())
    write_checkpoint(run, 2, FULL, 2, base)
    write_checkpoint(run, 3, COMPACT, 2, base)
    return run


@pytest.mark.parametrize("updates", [2, 3])
def test_a_checkpoint_of_a_packaged_model_run_is_evaluated_with_the_runs_settings(
    packaged_model_run, updates
):
    """Before: "--model: give either --model or --model-dir, not both" for every such checkpoint."""
    checkpoint = packaged_model_run.checkpoint_path(updates)
    evaluation = prepare(checkpoint, options())
    config = evaluation.config
    assert config.model == "smollm2-135m-instruct" and config.model_dir is None
    assert config.engine_target == "src/engine:engine-cpu"  # the engine that ships the model
    assert config.task == "conciseness" and config.chat_template is True
    assert evaluation.plan.anchor.model_dir == str(packaged_model_run.checkpoint_path(2) / "model")
    assert len(evaluation.problems.eval) == 8 and evaluation.saved["task"] == "conciseness"
    if updates == 3:  # compact: its last update replayed onto the full checkpoint after 2
        assert [len(u) for u in evaluation.plan.updates] == [1]


def test_options_are_checked_after_merging_with_the_runs_config(packaged_model_run, tmp_path):
    """`--dataset-path OTHER.jsonl` of a conciseness run: before, it was checked against the command
    line's default task (Countdown) and refused ("--dataset-path: only with --dataset reference or
    hf")."""
    other = questions(tmp_path / "other.jsonl", 40)
    checkpoint = packaged_model_run.checkpoint_path(2)
    whole = prepare(checkpoint, options("--dataset-path", str(other)))  # without --eval-size: every row
    assert [p.id for p in whole.problems.eval] == list(range(40)) and whole.problems.train == []
    held = prepare(checkpoint, options("--dataset-path", str(other), "--eval-size", "12"))
    assert held.config.task == "conciseness" and held.config.dataset_path == str(other)
    assert len(held.problems.eval) == 12 and {p.answer for p in held.problems.eval} <= {
        str(i + 1) for i in range(40)
    }
    # A merged value that is invalid together with the run's settings is still refused, naming it.
    with pytest.raises(ConfigError, match="--dataset: reference is a Countdown source"):
        prepare(checkpoint, options("--dataset", "reference", "--dataset-path", str(other)))


def test_a_model_directory_is_scored_without_training_problems(tmp_path):
    """Before: "--prompts-per-member: 16 exceeds the 8 training problems left after holding out
    --eval-size 32"; an evaluation needs no training split."""
    model = make_base_model(tmp_path / "model")
    data = questions(tmp_path / "questions.jsonl", 40)
    evaluation = prepare(
        model, options("--task", "conciseness", "--dataset-path", str(data), "--eval-size", "32")
    )
    assert len(evaluation.problems.eval) == 32 and evaluation.config.model_dir == str(model)
    assert evaluation.run is None and evaluation.saved is None
    # The same 32 a run with that seed holds out.
    run_split = load_problems(evaluation.config.model_copy(update={"prompts_per_member": 8}))
    assert evaluation.problems.eval == run_split.eval
    whole = prepare(model, options("--task", "conciseness", "--dataset-path", str(data)))
    assert len(whole.problems.eval) == 40


class Recorded(Exception):
    """Raised by `RecordingScheduler.map` once it has recorded the tasks."""


class RecordingScheduler:
    """Stands in for `driver.rollout_scheduler.RolloutScheduler`: records the (problems, request) tasks."""

    def __init__(self) -> None:
        self.tasks: list = []

    def map(self, tasks, on_done, finish_on_stop=False):
        self.tasks = list(tasks)
        raise Recorded


def test_held_out_rollouts_use_the_runs_batch_size_and_settings(packaged_model_run):
    """Before: held-out evaluation built its own request without `batch_size` (always 16 on the
    transformers backend); now training and evaluation take theirs from `TrainConfig.rollout_request`."""
    evaluation = prepare(packaged_model_run.checkpoint_path(2), options())
    scheduler = RecordingScheduler()
    with pytest.raises(Recorded):
        held_out.evaluate(scheduler, evaluation.config, evaluation.problems)
    assert [len(problems) for problems, _ in scheduler.tasks] == [3, 3, 2]  # 8 problems, batches of 3
    for _, request in scheduler.tasks:
        assert request == evaluation.config.rollout_request()
        assert request.batch_size == 3 and request.member is None and request.task == "conciseness"
        assert request.chat_template is True
