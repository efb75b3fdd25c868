"""`./pants run src/driver:evaluate -- CHECKPOINT [options]`: greedy held-out accuracy of a saved model.

CHECKPOINT is a checkpoint directory of a run (OUTPUT_DIR/checkpoints/iter-NNNNNN; a compact one is
loaded by replaying its updates, see driver.checkpointing) or any Hugging Face model directory. For a
checkpoint, the run's config.json supplies the task, the dataset, the held-out split and the generation
settings, so the figure is comparable with the run's own eval rows; the options (the same as `train`'s,
`--task` and `--dataset-path` among them) override them, merged with the saved config before they are
checked together, so any checkpoint can be scored on any split. `--dataset-path FILE` without
`--eval-size` scores every row of FILE; with `--eval-size N`, the N rows a run with that seed holds out.
An evaluation needs no training problems.
The result is printed and, for a checkpoint, written to CHECKPOINT/eval.json; for a checkpoint of a run,
the run's reward curve (OUTPUT_DIR/reward.png, `driver.reward_plot`) is redrawn with it.

Exit status: 0 evaluated, 1 failed (engines, Ray), 2 invalid configuration, data or checkpoint (also: a
checkpoint that cannot be replayed here, an empty held-out split).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from driver.checkpointing import Anchor, CheckpointError, LoadPlan, is_full, load_plan, verify
from driver.config_sources import build_parser, given_values
from driver.datafiles import DatasetError
from driver.engine_build import EngineBuildError
from driver.engine_fleet import EngineSyncError
from driver.engine_pool import EngineStartError
from driver.engine_preflight import EnginePreflightError
from driver.held_out import evaluate_model
from driver.task_data import Problems, load_dataset, load_problems
from driver.train import EXIT_FAILED, EXIT_INVALID, EXIT_OK, init_ray, plot_run, prepare_engines
from driver.train_config import ConfigError, TrainConfig
from shared.run_layout import (
    ES_STATE,
    MODEL,
    RunDir,
    RunDirError,
    checkpoint_files,
    checkpoint_run,
    write_json_atomic,
)


def locate(path: Path) -> tuple[LoadPlan | dict, RunDir | None, dict | None]:
    """What CHECKPOINT is: (how to plan a full checkpoint or model directory, or for a compact
    checkpoint its es_state.json, loaded with `load_plan` once the device type is known; the run it
    belongs to or None; the run's saved config or None).

    Raises:
        ConfigError: `path` is neither a checkpoint nor a model directory, or a compact checkpoint
            outside its run directory.
        CheckpointError: the checkpoint does not verify (`checkpointing.verify`: a truncated or missing
            file, named).
    """
    files = checkpoint_files(path)
    if files.is_checkpoint():
        run = checkpoint_run(path)
        saved = run.read_config() if run is not None else None
        state = verify(path, run)
        if is_full(state):
            master = str(files.master) if files.master.is_file() else None
            return LoadPlan(Anchor(0, str(files.model), master), [], state["fingerprint"]), run, saved
        if run is None:
            raise ConfigError(
                f"CHECKPOINT: {path} is a compact checkpoint; it replays onto checkpoints of its run "
                "directory, so evaluate it where the run wrote it"
            )
        return state, run, saved
    if (path / "config.json").is_file():  # a Hugging Face model directory
        return LoadPlan(Anchor(0, str(path)), [], None), None, None
    raise ConfigError(
        f"CHECKPOINT: {path} is neither a checkpoint ({ES_STATE}, with {MODEL}/ when full) nor a model "
        "directory"
    )


@dataclass(frozen=True)
class Evaluation:
    """What `evaluate` scores: the config (the run's saved one with the options given merged in), how to
    load the weights, the held-out problems, and the run the checkpoint belongs to (None for a model
    directory or a checkpoint outside its run) with its saved config."""

    config: TrainConfig
    plan: LoadPlan
    problems: Problems
    run: RunDir | None
    saved: dict[str, Any] | None


def prepare(checkpoint: Path, args: argparse.Namespace) -> Evaluation:
    """Resolves CHECKPOINT and the options into an `Evaluation` (see the module docstring), before any
    engine starts.

    Raises:
        ConfigError: invalid options (of the merged config), an unusable CHECKPOINT, no
            held-out problems. DatasetError: a bad dataset file. CheckpointError: a checkpoint that
            does not verify or cannot be replayed here. RunDirError: an unreadable run directory.
    """
    plan, run, saved = locate(checkpoint)
    given = given_values(args)
    values = dict(saved or {})
    values.update(given)
    compact = isinstance(plan, dict)
    # The weights come from `plan`. The config names the model for what depends on it (the engine PEX:
    # a packaged --model ships in the CPU engine), so a run's packaged model stays named; otherwise it
    # names the directory evaluated (a compact checkpoint's: the run's base model).
    if values.get("model") is None:
        model_dir = values.get("model_dir") if compact else plan.anchor.model_dir
        values["model_dir"] = model_dir or str(run.base_model)
    values.update(resume=False, output_dir=str(checkpoint))
    config = TrainConfig(**values)
    if compact:
        plan = load_plan(run, plan["updates"], plan, config.device_type, config.perturbation_spec().record())
    if "dataset_path" in given and "eval_size" not in given:
        task, rows = load_dataset(config)
        problems = Problems(train=[], eval=rows, task=task)
    else:
        problems = load_problems(config, training=False)
    if not problems.eval:
        raise ConfigError(
            f"--eval-size: {config.eval_size} leaves no held-out problems to evaluate; pass "
            "--eval-size N with N > 0"
        )
    return Evaluation(config, plan, problems, run, saved)


def main(argv: list[str] | None = None) -> int:
    """Runs the command; returns the exit status (see the module docstring)."""
    parser = build_parser(prog="evaluate", description=__doc__.split("\n\n")[1])
    parser.add_argument("checkpoint", type=Path, help="checkpoint directory or Hugging Face model directory")
    args = parser.parse_args(argv)
    checkpoint = args.checkpoint.absolute()
    del args.checkpoint
    try:
        evaluation = prepare(checkpoint, args)
    except (ConfigError, DatasetError, CheckpointError, RunDirError, OSError, ValueError) as e:
        print(f"evaluate: {e}", file=sys.stderr)
        return EXIT_INVALID
    config, plan, problems = evaluation.config, evaluation.plan, evaluation.problems
    run, saved = evaluation.run, evaluation.saved
    try:
        spec = prepare_engines(config)
    except (EngineBuildError, EnginePreflightError) as e:
        print(f"evaluate: {e}", file=sys.stderr)
        return EXIT_FAILED
    import ray

    started_ray = init_ray(config.address)
    try:
        result = evaluate_model(config, spec, problems, plan, str(checkpoint))
    except (EngineStartError, EngineSyncError, CheckpointError) as e:
        print(f"evaluate: {e}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        if started_ray:
            ray.shutdown()
    print(
        f"{checkpoint}: accuracy {result['accuracy']:.4f} on {result['problems']} held-out problems, "
        f"mean reward {result['reward_mean']:.4f}, "
        + "".join(f"{name} {result[name]:.4f}, " for name in problems.task.components)
        + f"(weights {result['fingerprint'][:16]})"
    )
    if saved is not None:
        out = checkpoint_files(checkpoint).eval
        write_json_atomic(out, dict(result))
        print(f"wrote {out}")
        if run is not None:
            plot = plot_run(run.root, "evaluate")
            if plot:
                print(f"wrote {plot}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
