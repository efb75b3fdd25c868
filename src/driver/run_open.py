"""Opening a run directory before anything starts: a new run, or a resumed one with its saved config, its
problems and the checkpoint it goes on from."""

from __future__ import annotations

from driver.checkpointing import CheckpointError, ResumePoint, resume_point
from driver.config_sources import merge_for_resume
from driver.task_data import Problems, load_problems
from driver.train_config import TrainConfig
from shared.run_layout import RunDir, RunDirError


def open_run(
    config: TrainConfig, given: set[str] | None = None, read_bytes: bool = True
) -> tuple[TrainConfig, Problems, ResumePoint | None]:
    """Checks the output directory for a new or resumed run and loads the run's problems
    (`driver.task_data.load_problems`), before anything starts. A resumed run's problems come from its
    saved config (task, dataset, split), so a plain `--resume --output-dir DIR` finds them. Without
    `read_bytes`, checkpoint files are checked by size only (`checkpointing.verify`).

    Returns:
        (config, problems, resume): for --resume the saved config merged with the allowed overrides
        (`merge_for_resume`) and the newest checkpoint that verifies (`checkpointing.resume_point`; None
        if the run has none yet).

    Raises:
        RunDirError: a new run where one exists, or --resume where none exists, or another dataset, or
            checkpoints none of which verifies.
        ConfigError: --resume with options that differ from the saved run's.
        DatasetError: the dataset is missing or malformed.
    """
    run_dir = RunDir(config.output_dir)
    if not config.resume:
        if run_dir.has_run():
            raise RunDirError(
                f"--output-dir: {run_dir.root} already holds a run; pass --resume to continue it "
                "or choose another --output-dir"
            )
        return config, load_problems(config), None
    if not run_dir.has_run():
        raise RunDirError(f"--resume: {run_dir.root} holds no run (no config.json)")
    try:
        saved = run_dir.read_config()
    except RunDirError as e:
        raise RunDirError(f"--resume: {e}") from e
    config = merge_for_resume(saved, config, given or set(), str(run_dir.config))
    problems = load_problems(config)
    try:
        resume = resume_point(run_dir, read_bytes)
    except CheckpointError as e:
        raise RunDirError(f"--resume: {e}") from e
    if resume is None:
        return config, problems, None
    if resume.state["problems_digest"] != problems.digest():
        raise RunDirError(
            f"--resume: the dataset differs from the one {resume.path} was trained on (problems digest "
            "mismatch); resume with the same dataset file"
        )
    return config, problems, resume
