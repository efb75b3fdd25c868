"""The run and checkpoint format: every file name of a training run's output directory, and the atomic
writes that keep it consistent. The driver writes the run; the engines write a checkpoint's model files
(`checkpoint_files`); `evaluate` reads checkpoints back (`checkpoint_run`). No other module spells one of
these file names (a Hugging Face model directory's own config.json aside, which is not one of them).

Layout (OUTPUT_DIR):
    config.json                  the resolved TrainConfig
    manifest.json                what ran: git revision, lockfile hashes, engine PEX identity, versions
                                 seen in the driver and inside the engines; one entry per session (resume)
    metrics.jsonl                one JSON object per line: {"kind": "train", "iteration": k, ...} after
                                 update k (0-based), {"kind": "eval", "updates": u, ...} after u updates
    samples.jsonl                a few completions per iteration
    reward.png                   the reward curve (`driver.reward_plot`)
    .driver.lock, .driver.json   the lock of the driver that runs it, and who holds it (`driver.run_lock`)
    tensorboard/                 the same scalars as TensorBoard event files (tensorboardX)
    base-model/                  the tiny default model, when no model was given
    checkpoints/iter-000004/     after 4 updates. A full checkpoint: model/ (Hugging Face, safetensors),
                                 master.safetensors (fp32 master, only when the weights are not fp32) and
                                 es_state.json; a compact one: es_state.json alone (its "kind"), which
                                 names the full checkpoint (or the base model) its updates replay onto

Checkpoints are written into a hidden temporary directory and renamed into place, so a directory named
iter-* is always complete; JSON files are replaced atomically. The engines write the model files, so
OUTPUT_DIR must be on storage that the driver and the first engine share (always true on one machine).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHECKPOINT_PATTERN = re.compile(r"^iter-(\d{6})$")
# Files of a run directory.
CONFIG = "config.json"
MANIFEST = "manifest.json"
METRICS = "metrics.jsonl"
SAMPLES = "samples.jsonl"
REWARD_PLOT = "reward.png"
DRIVER_LOCK, DRIVER_HOLDER = ".driver.lock", ".driver.json"
TENSORBOARD = "tensorboard"
BASE_MODEL = "base-model"
CHECKPOINTS = "checkpoints"
# Files of a checkpoint directory.
ES_STATE = "es_state.json"
MODEL = "model"
MASTER = "master.safetensors"
EVAL = "eval.json"
# es_state.json "kind": a full checkpoint holds the weights, a compact one only the ES state.
FULL, COMPACT = "full", "compact"


class RunDirError(RuntimeError):
    """The output directory is unusable: a run exists where a new one should start, or none to resume."""


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Writes `data` to `path` via a temporary file in the same directory (flushed to disk) and a rename,
    so `path` always holds the old or the new bytes; the temporary file is removed on any error."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Writes `text` (UTF-8) to `path` atomically (`write_bytes_atomic`)."""
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: Path, data: Any, sort_keys: bool = True) -> None:
    """Writes `data` as indented JSON to `path` atomically (`write_text_atomic`)."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=sort_keys) + "\n")


@contextlib.contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """Yields a temporary sibling directory of `out` to fill; on normal exit it replaces `out` (an existing
    `out` is moved aside first and deleted after), on an exception it is removed. So a directory named
    `out` is always complete."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old."))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@dataclass(frozen=True)
class CheckpointFiles:
    """The files of one checkpoint directory: `model` (a Hugging Face directory, safetensors), `master`
    (fp32 master weights, present only when the model's weights are not fp32 or not in the checkpoint's
    layout), `es_state` (the driver's ES state) and `eval` (written by `evaluate`)."""

    root: Path

    @property
    def model(self) -> Path:
        return self.root / MODEL

    @property
    def master(self) -> Path:
        return self.root / MASTER

    @property
    def es_state(self) -> Path:
        return self.root / ES_STATE

    @property
    def eval(self) -> Path:
        return self.root / EVAL

    def is_checkpoint(self) -> bool:
        """True when the directory holds a complete checkpoint: its ES state (written last), which for a
        full checkpoint comes with the model directory."""
        return self.es_state.is_file()


def checkpoint_files(path: str | Path) -> CheckpointFiles:
    """The files of the checkpoint directory `path`."""
    return CheckpointFiles(Path(path))


def checkpoint_run(path: str | Path) -> RunDir | None:
    """The run directory a checkpoint directory belongs to (OUTPUT_DIR for OUTPUT_DIR/checkpoints/iter-*),
    or None when `path` is not inside a run's checkpoints directory."""
    path = Path(path).absolute()
    if path.parent.name != CHECKPOINTS or not CHECKPOINT_PATTERN.match(path.name):
        return None
    run = RunDir(path.parent.parent)
    return run if run.has_run() else None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The objects of a JSON-lines file ([] if it does not exist). A torn last line (from a crash) is
    dropped; any other bad line raises ValueError naming the file and line."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number == len(lines):
                break
            raise ValueError(f"{path}: line {number}: not valid JSON: {e}") from e
    return rows


class RunDir:
    """Paths and atomic writes under one run's output directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).absolute()
        self.config = self.root / CONFIG
        self.manifest = self.root / MANIFEST
        self.metrics = self.root / METRICS
        self.samples = self.root / SAMPLES
        self.reward_plot = self.root / REWARD_PLOT
        self.tensorboard = self.root / TENSORBOARD
        self.base_model = self.root / BASE_MODEL
        self.checkpoints = self.root / CHECKPOINTS

    def has_run(self) -> bool:
        """True when a run was already started here (its config was written)."""
        return self.config.exists()

    def read_config(self) -> dict[str, Any]:
        """The run's saved configuration (config.json), as written.

        Raises:
            RunDirError: missing, unreadable or not a JSON object (the file named).
        """
        try:
            saved = json.loads(self.config.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RunDirError(f"{self.config} is unreadable: {e}") from e
        if not isinstance(saved, dict):
            raise RunDirError(f"{self.config}: expected a JSON object, found {type(saved).__name__}")
        return saved

    def checkpoint_path(self, updates: int) -> Path:
        """Where the checkpoint after `updates` ES updates lives."""
        return self.checkpoints / f"iter-{updates:06d}"

    def checkpoint_updates(self, path: Path) -> int | None:
        """The updates of the checkpoint directory `path` of this run (from its name), or None when `path`
        is not one."""
        match = CHECKPOINT_PATTERN.match(Path(path).name)
        if match is None or Path(path).absolute().parent != self.checkpoints:
            return None
        return int(match.group(1))

    def set_aside(self, path: Path) -> Path:
        """Renames the checkpoint directory `path` to `<name>.damaged` (`.damaged-2`, ... if taken), out of
        `list_checkpoints`' sight, and returns the new path. Nothing is deleted."""
        for number in range(1, 1000):
            target = path.with_name(f"{path.name}.damaged" + (f"-{number}" if number > 1 else ""))
            if not target.exists():
                os.rename(path, target)
                return target
        raise FileExistsError(f"{path}: too many checkpoints set aside under this name")

    def list_checkpoints(self) -> list[tuple[int, Path]]:
        """(updates, path) of every complete checkpoint, by updates."""
        found = []
        if self.checkpoints.is_dir():
            for path in self.checkpoints.iterdir():
                match = CHECKPOINT_PATTERN.match(path.name)
                if match and checkpoint_files(path).is_checkpoint():
                    found.append((int(match.group(1)), path))
        return sorted(found)

    def latest_checkpoint(self) -> tuple[int, Path] | None:
        """(updates, path) of the complete checkpoint with the most updates, or None."""
        found = self.list_checkpoints()
        return found[-1] if found else None

    def remove_checkpoint(self, updates: int) -> None:
        """Deletes a checkpoint: renamed to a hidden name first (so it is never seen half deleted), then
        removed."""
        path = self.checkpoint_path(updates)
        doomed = Path(tempfile.mkdtemp(dir=self.checkpoints, prefix=f".{path.name}.removed."))
        os.replace(path, doomed / path.name)
        shutil.rmtree(doomed, ignore_errors=True)

    def new_checkpoint(self, updates: int) -> contextlib.AbstractContextManager[Path]:
        """Yields a temporary directory to fill; on normal exit it becomes `checkpoint_path(updates)`
        (replacing an older one of the same name), on an exception it is removed (`atomic_dir`)."""
        return atomic_dir(self.checkpoint_path(updates))

    def read_checkpoint_state(self, path: Path) -> dict[str, Any]:
        """The es_state.json of a checkpoint directory.

        Raises:
            RunDirError: missing or unreadable.
        """
        state = checkpoint_files(path).es_state
        try:
            return json.loads(state.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise RunDirError(f"{state}: unreadable checkpoint state: {e}") from e

    def append_jsonl(self, path: Path, rows: Iterable[dict[str, Any]]) -> None:
        """Appends rows to a JSON-lines file and flushes them to disk."""
        with path.open("a") as f:
            for row in rows:
                f.write(json.dumps(row, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def truncate_to(self, updates: int | None) -> None:
        """Drops metrics and samples recorded after `updates` updates (work lost with an interrupted run
        beyond its last checkpoint; None: every row, a run that starts over), rewriting the files
        atomically."""
        for path in (self.metrics, self.samples):
            kept = [row for row in read_jsonl(path) if updates is not None and row_updates(row) <= updates]
            write_text_atomic(path, "".join(json.dumps(row, sort_keys=True) + "\n" for row in kept))


def row_updates(row: dict[str, Any]) -> int:
    """The number of updates a metrics or samples row depends on: iteration + 1 for a train row (it
    records the update it produced), `updates` for an eval row."""
    return row["updates"] if "updates" in row else row["iteration"] + 1
