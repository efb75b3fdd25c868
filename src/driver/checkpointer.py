"""Writing a run's checkpoints and going on from one (what a checkpoint holds: `driver.checkpointing`).

A compact checkpoint needs no engine and is written by the driver in milliseconds; a full one asks engine
0 to save the model directory first. Either is assembled in a temporary directory and renamed into place
(`shared.run_layout.RunDir.new_checkpoint`), so a failed write leaves nothing of it and the earlier
checkpoints intact. A signal handler may write one only while `safe` (not between an update and the
engines' confirmation of it, nor during another write).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray
from tqdm import tqdm

from driver.checkpointing import (
    Anchor,
    CheckpointError,
    LoadPlan,
    ResumePoint,
    es_state,
    load_plan,
    model_digest,
    prune,
    weight_files,
)
from driver.engine_fleet import EngineFleet, EngineSyncError
from driver.strategy import Strategy
from shared.run_layout import COMPACT, FULL, RunDir, checkpoint_files, write_json_atomic


class Checkpointer:
    """The checkpoints of one run.

    Args:
        run_dir: the run directory.
        fleet: the engines (engine 0 saves full checkpoints; the fleet's anchor moves to each new one).
        problems_digest: `driver.task_data.Problems.digest()` of the run's dataset.
        keep_full: the retention policy (--keep-full; `driver.checkpointing.prune`).
        device: the run's device type ("cpu", "cuda", "tpu"), recorded for replay.
        perturbation: how members perturb (`shared.protocol.Perturbation.record()`; default full),
            recorded for replay.

    Attributes:
        base_model: {"path", "digest"} of the base model, None when the driver cannot read it (every
            checkpoint is then full).
        saved_updates: updates of the newest checkpoint written or resumed from; None before the first.
        safe: whether a checkpoint may be written now (see the module docstring).
    """

    def __init__(
        self,
        run_dir: RunDir,
        fleet: EngineFleet,
        problems_digest: str,
        keep_full: int,
        device: str,
        perturbation: dict[str, Any] | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.fleet = fleet
        self.problems_digest = problems_digest
        self.keep_full = keep_full
        self.device = device
        self.perturbation = perturbation
        self.base_model: dict[str, str] | None = None
        self.saved_updates: int | None = None
        self.safe = True

    @contextlib.contextmanager
    def unsafe(self) -> Iterator[None]:
        """While active, `safe` is False (then restored)."""
        safe, self.safe = self.safe, False
        try:
            yield
        finally:
            self.safe = safe

    def unsaved(self, updates: int) -> bool:
        """Whether `updates` (the strategy's count) goes beyond the newest checkpoint (or, without one,
        the start)."""
        return updates > (self.saved_updates or 0)

    def set_base(self, base: str) -> None:
        """Records the base model's identity (`base_model`), which compact checkpoints replay onto; when
        the driver cannot read it, warns that every checkpoint will be a full one."""
        try:
            self.base_model = {"path": str(Path(base).absolute()), "digest": model_digest(base)}
        except OSError as e:
            self.base_model = None
            tqdm.write(
                f"warning: the base model {base} is not readable on the driver ({e}); every checkpoint "
                "will be a full one"
            )

    def resume_from(self, resume: ResumePoint) -> tuple[Strategy, LoadPlan]:
        """Sets aside the newer checkpoints that did not verify (with a warning each), and returns the
        strategy and the load plan of `resume`'s checkpoint.

        Raises:
            CheckpointError: the checkpoint cannot be replayed here (`driver.checkpointing.load_plan`).
        """
        for path, why in resume.skipped:
            tqdm.write(f"warning: skipped a checkpoint that does not verify: {why}")
            tqdm.write(f"  kept as {self.run_dir.set_aside(path)}; resuming from {resume.path.name}")
        self.saved_updates = resume.updates
        plan = load_plan(self.run_dir, resume.updates, resume.state, self.device, self.perturbation)
        return Strategy.from_state_dict(resume.state["strategy"]), plan

    def write(self, strategy: Strategy, full: bool) -> Path:
        """Writes the checkpoint of the current weights after `strategy.iteration` updates: full (engine 0
        writes the model directory) or compact (ES state only, no engine involved); compact only when the
        base model's identity is known. Then applies the retention policy. Returns its directory.

        Raises:
            CheckpointError: it could not be written completely (disk full, permissions); nothing of it
                is left and the earlier checkpoints are intact.
            EngineSyncError: engine 0 saved other weights than the run's.
        """
        fleet = self.fleet
        updates = strategy.iteration
        full = full or self.base_model is None
        path = self.run_dir.checkpoint_path(updates)
        try:
            with self.unsafe(), self.run_dir.new_checkpoint(updates) as tmp:
                has_master = False
                if full:
                    saved = fleet.call_one(0, "save_checkpoint", str(tmp))
                    if saved.fingerprint != fleet.fingerprint:
                        raise EngineSyncError(
                            f"engine 0 saved {saved.fingerprint[:12]}, expected {fleet.fingerprint[:12]}"
                        )
                    has_master = saved.master is not None
                state = es_state(
                    files=weight_files(tmp) if full else None,
                    kind=FULL if full else COMPACT,
                    updates=updates,
                    anchor=updates if full else fleet.anchor.updates,
                    fingerprint=fleet.fingerprint,
                    strategy=strategy.state_dict(),
                    problems_digest=self.problems_digest,
                    has_master=has_master,
                    base_model=self.base_model,
                    device=self.device,
                    perturbation=self.perturbation,
                )
                write_json_atomic(checkpoint_files(tmp).es_state, state, sort_keys=False)
        except (OSError, ray.exceptions.RayTaskError) as e:
            latest = self.run_dir.latest_checkpoint()
            raise CheckpointError(
                f"cannot write the checkpoint {path}: {e}. Nothing of it was kept; the earlier checkpoints "
                f"are intact (latest: {latest[1] if latest else 'none'})"
            ) from e
        files = checkpoint_files(path)
        if full:
            fleet.anchor = Anchor(updates, str(files.model), str(files.master) if has_master else None)
        self.saved_updates = updates
        for removed in prune(self.run_dir, self.keep_full):
            tqdm.write(f"removed checkpoint {self.run_dir.checkpoint_path(removed).name} (--keep-full)")
        return files.root
