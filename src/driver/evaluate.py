"""`./pants run src/driver:evaluate -- CHECKPOINT [options]`: greedy held-out accuracy of a saved model.

CHECKPOINT is a checkpoint directory of a run (OUTPUT_DIR/checkpoints/iter-NNNNNN) or any Hugging Face
model directory. For a checkpoint, the run's config.json supplies the dataset, the held-out split and the
generation settings, so the figure is comparable with the run's own eval rows; the options (the same as
`train`'s) override them. The result is printed and, for a checkpoint, written to CHECKPOINT/eval.json.

Exit status: 0 evaluated, 1 failed (engines, Ray), 2 invalid configuration, data or checkpoint.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from driver.countdown_data import CountdownDataError
from driver.engine_build import EngineBuildError
from driver.engine_pool import EnginePreflightError, EngineStartError
from driver.train import EXIT_FAILED, EXIT_INVALID, EXIT_OK, init_ray, prepare_engines
from driver.train_config import ConfigError, TrainConfig, build_parser, config_from_args
from driver.trainer import EngineSyncError, Trainer, load_problems
from shared.run_layout import ES_STATE, MODEL, checkpoint_files, checkpoint_run, write_json_atomic


def locate(path: Path) -> tuple[Path, Path | None, dict | None]:
    """(model dir, fp32 master or None, the run's saved config or None) of a checkpoint or model dir.

    Raises:
        ConfigError: `path` is neither a checkpoint nor a model directory.
    """
    files = checkpoint_files(path)
    if files.is_checkpoint():
        run = checkpoint_run(path)
        saved = json.loads(run.config.read_text()) if run is not None else None
        return files.model, files.master if files.master.is_file() else None, saved
    if (path / "config.json").is_file():  # a Hugging Face model directory
        return path, None, None
    raise ConfigError(
        f"CHECKPOINT: {path} is neither a checkpoint ({MODEL}/ + {ES_STATE}) nor a model directory"
    )


def main(argv: list[str] | None = None) -> int:
    """Runs the command; returns the exit status (see the module docstring)."""
    parser = build_parser(prog="evaluate", description=__doc__.split("\n\n")[1])
    parser.add_argument("checkpoint", type=Path, help="checkpoint directory or Hugging Face model directory")
    args = parser.parse_args(argv)
    checkpoint = args.checkpoint.absolute()
    del args.checkpoint
    try:
        model_dir, master, saved = locate(checkpoint)
        given_config, given = config_from_args(args)
        values = dict(saved or {})
        values.update({name: getattr(given_config, name) for name in given})
        values.update(model_dir=str(model_dir), resume=False, output_dir=str(checkpoint))
        config = TrainConfig(**values)
        problems = load_problems(config)
    except (ConfigError, CountdownDataError, OSError, json.JSONDecodeError) as e:
        print(f"evaluate: {e}", file=sys.stderr)
        return EXIT_INVALID
    try:
        spec = prepare_engines(config)
    except (EngineBuildError, EnginePreflightError) as e:
        print(f"evaluate: {e}", file=sys.stderr)
        return EXIT_FAILED
    import ray

    started_ray = init_ray(config.address)
    try:
        result = Trainer(config, spec, problems).evaluate_model(
            str(model_dir), str(master) if master else None
        )
    except (EngineStartError, EngineSyncError) as e:
        print(f"evaluate: {e}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        if started_ray:
            ray.shutdown()
    print(
        f"{checkpoint}: accuracy {result['accuracy']:.4f} on {result['problems']} held-out problems, "
        f"mean reward {result['reward_mean']:.4f}, format {result['format']:.4f} "
        f"(weights {result['fingerprint'][:16]})"
    )
    if saved is not None:
        out = checkpoint_files(checkpoint).eval
        write_json_atomic(out, dict(result))
        print(f"wrote {out}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
