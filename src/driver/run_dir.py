"""The output directory of a training run: config, manifest, metrics, samples and checkpoints.

Layout (OUTPUT_DIR):
    config.json                  the resolved TrainConfig
    manifest.json                what ran: git revision, lockfile hashes, engine PEX identity, versions
                                 seen in the driver and inside the engines; one entry per session (resume)
    metrics.jsonl                one JSON object per line: {"kind": "train", "iteration": k, ...} after
                                 update k (0-based), {"kind": "eval", "updates": u, ...} after u updates
    samples.jsonl                a few completions per iteration
    tensorboard/                 the same scalars as TensorBoard event files (tensorboardX)
    base-model/                  the tiny default model, when no model was given
    checkpoints/iter-000004/     after 4 updates: model/ (Hugging Face, safetensors), master.safetensors
                                 (fp32 master, only when the weights are not fp32), es_state.json

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
from collections.abc import Iterable
from pathlib import Path
from typing import Any

CHECKPOINT_PATTERN = re.compile(r"^iter-(\d{6})$")
ES_STATE = "es_state.json"


class RunDirError(RuntimeError):
    """The output directory is unusable: a run exists where a new one should start, or none to resume."""


def write_json_atomic(path: Path, data: Any) -> None:
    """Writes `data` as indented JSON to `path` via a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
        self.config = self.root / "config.json"
        self.manifest = self.root / "manifest.json"
        self.metrics = self.root / "metrics.jsonl"
        self.samples = self.root / "samples.jsonl"
        self.tensorboard = self.root / "tensorboard"
        self.base_model = self.root / "base-model"
        self.checkpoints = self.root / "checkpoints"

    def has_run(self) -> bool:
        """True when a run was already started here (its config was written)."""
        return self.config.exists()

    def checkpoint_path(self, updates: int) -> Path:
        """Where the checkpoint after `updates` ES updates lives."""
        return self.checkpoints / f"iter-{updates:06d}"

    def latest_checkpoint(self) -> tuple[int, Path] | None:
        """(updates, path) of the complete checkpoint with the most updates, or None."""
        found = []
        if self.checkpoints.is_dir():
            for path in self.checkpoints.iterdir():
                match = CHECKPOINT_PATTERN.match(path.name)
                if match and (path / ES_STATE).exists():
                    found.append((int(match.group(1)), path))
        return max(found) if found else None

    @contextlib.contextmanager
    def new_checkpoint(self, updates: int):
        """Yields a temporary directory to fill; on normal exit it becomes `checkpoint_path(updates)`
        (replacing an older one of the same name), on an exception it is removed."""
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        final = self.checkpoint_path(updates)
        tmp = Path(tempfile.mkdtemp(dir=self.checkpoints, prefix=f".{final.name}."))
        try:
            yield tmp
            if final.exists():
                old = Path(tempfile.mkdtemp(dir=self.checkpoints, prefix=f".{final.name}.old."))
                os.replace(final, old / final.name)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def read_checkpoint_state(self, path: Path) -> dict[str, Any]:
        """The es_state.json of a checkpoint directory.

        Raises:
            RunDirError: missing or unreadable.
        """
        try:
            return json.loads((path / ES_STATE).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise RunDirError(f"{path / ES_STATE}: unreadable checkpoint state: {e}") from e

    def append_jsonl(self, path: Path, rows: Iterable[dict[str, Any]]) -> None:
        """Appends rows to a JSON-lines file and flushes them to disk."""
        with path.open("a") as f:
            for row in rows:
                f.write(json.dumps(row, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def truncate_to(self, updates: int) -> None:
        """Drops metrics and samples recorded after `updates` updates (work lost with an interrupted run
        beyond its last checkpoint), rewriting the files atomically."""
        for path in (self.metrics, self.samples):
            kept = [row for row in read_jsonl(path) if row_updates(row) <= updates]
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{path.name}.", suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                f.writelines(json.dumps(row, sort_keys=True) + "\n" for row in kept)
            os.replace(tmp, path)


def row_updates(row: dict[str, Any]) -> int:
    """The number of updates a metrics or samples row depends on: iteration + 1 for a train row (it
    records the update it produced), `updates` for an eval row."""
    return row["updates"] if "updates" in row else row["iteration"] + 1
