"""Run directories as the trainer leaves them, made without a run: a base model directory and
checkpoints with their es_state.json (shared by the checkpoint and evaluate tests)."""

from __future__ import annotations

from pathlib import Path

from driver.checkpointing import es_state, model_digest, weight_files
from shared.run_layout import FULL, RunDir, write_json_atomic


def make_base_model(path: Path) -> Path:
    """A stand-in model directory (config.json and one shard) at `path`, which checkpoints record as
    their base model; returns `path`."""
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"hidden_size": 8}\n')
    (path / "model.safetensors").write_bytes(b"\0" * 64)
    return path


def write_checkpoint(run: RunDir, updates: int, kind: str, anchor: int, base: Path) -> Path:
    """A checkpoint directory as the trainer writes it (a full one gets a model/ directory of two files,
    whose sizes and digests es_state.json records)."""
    history = [{"iteration": k, "update": [[100 + k, 0.5]], "reward_mean": 0.0} for k in range(updates)]
    path = run.checkpoint_path(updates)
    if kind == FULL:
        (path / "model").mkdir(parents=True)
        (path / "model" / "config.json").write_text('{"hidden_size": 8}\n')
        (path / "model" / "model.safetensors").write_bytes(bytes(range(256)) * updates)
    state = es_state(
        kind=kind,
        updates=updates,
        anchor=anchor,
        fingerprint=f"fp{updates}",
        strategy={"config": {}, "root_seed": 0, "iteration": updates, "history": history},
        problems_digest="d",
        has_master=False,
        base_model={"path": str(base), "digest": model_digest(base)},
        device="cpu",
        files=weight_files(path) if kind == FULL else None,
    )
    write_json_atomic(path / "es_state.json", state)
    return path
