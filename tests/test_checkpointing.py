"""Checkpoint kinds, retention and replay planning (`driver.checkpointing`) on real run directories; the
end-to-end replay of a compact checkpoint is in test_train.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from driver.checkpointing import CheckpointError, es_state, full_due, model_digest, prune, restore_plan
from shared.run_layout import COMPACT, FULL, RunDir, write_json_atomic
from shared.seeds import NOISE_VERSION


@pytest.fixture
def base(tmp_path: Path) -> Path:
    model = tmp_path / "base-model"
    model.mkdir()
    (model / "config.json").write_text('{"hidden_size": 8}\n')
    (model / "model.safetensors").write_bytes(b"\0" * 64)
    return model


def write_checkpoint(run: RunDir, updates: int, kind: str, anchor: int, base: Path) -> Path:
    """A checkpoint directory as the trainer writes it (a full one gets an empty model/ directory)."""
    history = [{"iteration": k, "update": [[100 + k, 0.5]], "reward_mean": 0.0} for k in range(updates)]
    state = es_state(
        kind=kind,
        updates=updates,
        anchor=anchor,
        fingerprint=f"fp{updates}",
        strategy={"iteration": updates, "history": history},
        problems_digest="d",
        has_master=False,
        base_model={"path": str(base), "digest": model_digest(base)},
        device="cpu",
    )
    path = run.checkpoint_path(updates)
    if kind == FULL:
        (path / "model").mkdir(parents=True)
    write_json_atomic(path / "es_state.json", state)
    return path


def names(run: RunDir) -> list[str]:
    return [path.name for _, path in run.list_checkpoints()]


def test_model_digest_changes_with_any_file_and_ignores_hidden_ones(base):
    digest = model_digest(base)
    (base / ".lock").write_text("x")
    assert model_digest(base) == digest
    (base / "config.json").write_text('{"hidden_size": 9}\n')
    assert model_digest(base) != digest
    with pytest.raises(OSError, match="not a model directory"):
        model_digest(base / "missing")


def test_full_checkpoints_are_due_every_k_and_at_the_end():
    assert [u for u in range(1, 11) if full_due(u, 10, 4)] == [4, 8, 10]
    assert [u for u in range(1, 11) if full_due(u, 10, 0)] == [10]


def test_retention_keeps_the_newest_full_and_what_compact_checkpoints_need(tmp_path, base):
    run = RunDir(tmp_path / "run")
    write_checkpoint(run, 1, COMPACT, 0, base)
    write_checkpoint(run, 2, FULL, 2, base)
    write_checkpoint(run, 3, COMPACT, 2, base)
    write_checkpoint(run, 4, FULL, 4, base)
    write_checkpoint(run, 5, COMPACT, 4, base)
    write_checkpoint(run, 6, FULL, 6, base)
    assert prune(run, keep_full=0) == []
    assert prune(run, keep_full=2) == [2, 3]
    # The compact checkpoint onto the base model stays; so does the one whose anchor (4) is kept.
    assert names(run) == ["iter-000001", "iter-000004", "iter-000005", "iter-000006"]
    assert prune(run, keep_full=1) == [4, 5]
    assert names(run) == ["iter-000001", "iter-000006"]
    assert not [p for p in run.checkpoints.iterdir() if p.name.startswith(".")]


def test_a_compact_checkpoint_replays_the_updates_since_its_anchor(tmp_path, base):
    run = RunDir(tmp_path / "run")
    write_checkpoint(run, 2, FULL, 2, base)
    write_checkpoint(run, 4, COMPACT, 2, base)
    state = run.read_checkpoint_state(run.checkpoint_path(4))
    plan = restore_plan(run, 4, state, "cpu")
    assert plan.anchor.updates == 2 and plan.anchor.model_dir == str(run.checkpoint_path(2) / "model")
    assert plan.updates == [[(102, 0.5)], [(103, 0.5)]]
    assert plan.fingerprint == "fp4"
    onto_base = restore_plan(run, 2, {**state, "anchor": 0, "updates": 2}, "cpu")
    assert onto_base.anchor.model_dir == str(base) and len(onto_base.updates) == 2


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"noise": {"version": NOISE_VERSION + 1, "device": "cpu"}}, "noise version"),
        (
            {"noise": {"version": NOISE_VERSION, "device": "cuda"}},
            "engines on cuda, this run's engines use cpu",
        ),
        ({"anchor": 2}, "iter-000002, which is missing"),
    ],
)
def test_replay_is_refused_naming_why(tmp_path, base, change, why):
    run = RunDir(tmp_path / "run")
    write_checkpoint(run, 3, COMPACT, 0, base)
    state = {**run.read_checkpoint_state(run.checkpoint_path(3)), **change}
    with pytest.raises(CheckpointError, match=why):
        restore_plan(run, 3, state, "cpu")


def test_replay_is_refused_when_the_base_model_changed(tmp_path, base):
    run = RunDir(tmp_path / "run")
    write_checkpoint(run, 3, COMPACT, 0, base)
    (base / "model.safetensors").write_bytes(b"\1" * 64)
    state = json.loads((run.checkpoint_path(3) / "es_state.json").read_text())
    with pytest.raises(CheckpointError, match="base model .* changed since"):
        restore_plan(run, 3, state, "cpu")
