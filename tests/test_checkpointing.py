"""Checkpoint kinds, retention and replay planning (`driver.checkpointing`) on real run directories; the
end-to-end replay of a compact checkpoint is in test_train.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from run_fixtures import make_base_model, write_checkpoint

from driver import checkpointing, evaluate
from driver.checkpointing import (
    CheckpointError,
    full_due,
    load_plan,
    model_digest,
    prune,
    resume_point,
    verify,
)
from driver.train import EXIT_INVALID
from shared.run_layout import COMPACT, FULL, RunDir, write_json_atomic
from shared.seeds import NOISE_VERSION


@pytest.fixture
def base(tmp_path: Path) -> Path:
    return make_base_model(tmp_path / "base-model")


@pytest.fixture
def run(tmp_path, base) -> RunDir:
    """Full after 2 and 4 updates, compact after 3 (onto 2) and 5 (onto 4) and 1 (onto the base model)."""
    run = RunDir(tmp_path / "run")
    write_checkpoint(run, 1, COMPACT, 0, base)
    write_checkpoint(run, 2, FULL, 2, base)
    write_checkpoint(run, 3, COMPACT, 2, base)
    write_checkpoint(run, 4, FULL, 4, base)
    write_checkpoint(run, 5, COMPACT, 4, base)
    return run


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


def test_retention_keeps_the_newest_full_and_what_compact_checkpoints_need(run, base):
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
    plan = load_plan(run, 4, state, "cpu")
    assert plan.anchor.updates == 2 and plan.anchor.model_dir == str(run.checkpoint_path(2) / "model")
    assert plan.updates == [[(102, 0.5)], [(103, 0.5)]]
    assert plan.fingerprint == "fp4"
    onto_base = load_plan(run, 2, {**state, "anchor": 0, "updates": 2}, "cpu")
    assert onto_base.anchor.model_dir == str(base) and len(onto_base.updates) == 2


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"noise": {"version": NOISE_VERSION + 1, "device": "cpu"}}, "noise version"),
        (
            {
                "noise": {
                    "version": NOISE_VERSION,
                    "device": "cpu",
                    "perturbation": {"mode": "lowrank", "rank": 1},
                }
            },
            r"of perturbation \{'mode': 'lowrank', 'rank': 1\}, this run's engines apply \{'mode': 'full'\}",
        ),
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
        load_plan(run, 3, state, "cpu")


def test_a_checkpoint_written_before_low_rank_members_replays_as_full_rank(tmp_path, base):
    run = RunDir(tmp_path / "run")
    write_checkpoint(run, 3, COMPACT, 0, base)
    state = {
        **run.read_checkpoint_state(run.checkpoint_path(3)),
        "noise": {"version": NOISE_VERSION, "device": "cpu"},
    }
    assert len(load_plan(run, 3, state, "cpu").updates) == 3
    with pytest.raises(CheckpointError, match="of perturbation"):
        load_plan(run, 3, state, "cpu", {"mode": "lowrank", "rank": 1, "targets": ["q_proj"]})


def test_replay_is_refused_when_the_base_model_changed(tmp_path, base):
    run = RunDir(tmp_path / "run")
    write_checkpoint(run, 3, COMPACT, 0, base)
    (base / "model.safetensors").write_bytes(b"\1" * 64)
    state = json.loads((run.checkpoint_path(3) / "es_state.json").read_text())
    with pytest.raises(CheckpointError, match="base model .* changed since"):
        load_plan(run, 3, state, "cpu")


# ---- damaged checkpoints (issue 24, item 3) ----------------------------------------------------------


def truncate(path: Path, size: int) -> None:
    with path.open("r+b") as f:
        f.truncate(size)


def test_every_checkpoint_of_an_intact_run_verifies_and_resume_takes_the_newest(run):
    for updates, path in run.list_checkpoints():
        assert verify(path, run)["updates"] == updates
    point = resume_point(run)
    assert (point.updates, point.path.name, point.skipped) == (5, "iter-000005", [])
    assert resume_point(RunDir(run.root.parent / "empty")) is None


def damage_truncated_es_state(run: RunDir) -> tuple[int, str]:
    truncate(run.checkpoint_path(5) / "es_state.json", 100)
    return 4, "iter-000005/es_state.json: not valid JSON"


def damage_incomplete_es_state(run: RunDir) -> tuple[int, str]:
    state = run.read_checkpoint_state(run.checkpoint_path(5))
    del state["fingerprint"]
    write_json_atomic(run.checkpoint_path(5) / "es_state.json", state)
    return 4, "iter-000005/es_state.json: incomplete, no 'fingerprint'"


def damage_truncated_shard(run: RunDir) -> tuple[int, str]:
    truncate(run.checkpoint_path(4) / "model" / "model.safetensors", 700)
    # 5 replays onto 4, so both are skipped; 3 replays onto the intact 2.
    return 3, "iter-000004/model/model.safetensors has 700 bytes, recorded 1024"


def damage_missing_shard(run: RunDir) -> tuple[int, str]:
    (run.checkpoint_path(4) / "model" / "model.safetensors").unlink()
    return 3, "iter-000004/model/model.safetensors is missing"


def damage_rewritten_shard(run: RunDir) -> tuple[int, str]:
    shard = run.checkpoint_path(4) / "model" / "model.safetensors"
    shard.write_bytes(bytes(reversed(shard.read_bytes())))
    return 3, "model.safetensors: sha256 differs from the recorded one"


def damage_deleted_anchor(run: RunDir) -> tuple[int, str]:
    import shutil

    shutil.rmtree(run.checkpoint_path(4))
    return 3, "iter-000005: its anchor iter-000004 does not verify"


@pytest.mark.parametrize(
    "damage",
    [
        damage_truncated_es_state,
        damage_incomplete_es_state,
        damage_truncated_shard,
        damage_missing_shard,
        damage_rewritten_shard,
        damage_deleted_anchor,
    ],
)
def test_resume_falls_back_past_damaged_checkpoints_naming_the_file_and_deletes_nothing(run, damage):
    expected, why = damage(run)
    damaged = snapshot(run.root)
    point = resume_point(run)
    assert point.updates == expected
    assert point.skipped and why in point.skipped[0][1], point.skipped
    assert [path.name for path, _ in point.skipped] == [
        path.name for updates, path in reversed(run.list_checkpoints()) if updates > expected
    ]
    assert snapshot(run.root) == damaged, "verification changes nothing"


def test_a_size_only_resume_point_reads_no_shard_and_the_full_one_catches_what_it_misses(run, monkeypatch):
    """`train` looks for the resume point twice: before its lock by sizes (so that --resume reads a
    multi-GB checkpoint once), then under the lock with every sha256. A rewritten shard of the same size
    passes the first and not the second."""
    expected, why = damage_rewritten_shard(run)
    read = []
    real = checkpointing.sha256_file
    monkeypatch.setattr(checkpointing, "sha256_file", lambda path: read.append(path) or real(path))
    assert resume_point(run, read_bytes=False).updates == 5 and not read
    point = resume_point(run)
    assert point.updates == expected and why in point.skipped[0][1] and read


@pytest.mark.parametrize("damage", [damage_truncated_es_state, damage_truncated_shard, damage_missing_shard])
def test_retention_deletes_no_damaged_checkpoint_and_keeps_the_fallback(run, damage):
    """Retention checks sizes, not digests (it runs after every checkpoint): a partial file is seen."""
    expected, _ = damage(run)
    skipped = [path for path, _ in resume_point(run).skipped]
    prune(run, keep_full=1)
    assert all(path.exists() for path in skipped)
    assert resume_point(run).updates == expected


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_compact_checkpoint_onto_a_changed_base_model_is_skipped(run, base):
    (base / "model.safetensors").write_bytes(b"\1" * 64)
    with pytest.raises(CheckpointError, match="iter-000001: its base model .* changed since"):
        verify(run.checkpoint_path(1), run)
    assert resume_point(run).updates == 5


def test_when_no_checkpoint_verifies_resume_refuses_naming_each(run):
    for _, path in run.list_checkpoints():
        truncate(path / "es_state.json", 10)
    with pytest.raises(CheckpointError, match="no checkpoint of .* verifies") as raised:
        resume_point(run)
    assert str(raised.value).count("not valid JSON") == 5


def test_a_damaged_checkpoint_is_set_aside_under_another_name(run):
    path = run.checkpoint_path(5)
    assert run.set_aside(path).name == "iter-000005.damaged"
    write_checkpoint(run, 5, COMPACT, 4, run.root)
    assert run.set_aside(path).name == "iter-000005.damaged-2"
    assert [u for u, _ in run.list_checkpoints()] == [1, 2, 3, 4]


def test_a_full_checkpoint_without_recorded_files_is_checked_for_its_files(run):
    """Checkpoints written before the file table was recorded verify by the files being there."""
    path = run.checkpoint_path(4)
    state = run.read_checkpoint_state(path)
    del state["files"]
    write_json_atomic(path / "es_state.json", state)
    assert verify(path, run)["updates"] == 4
    (path / "model" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="iter-000004/model holds no .*safetensors file"):
        verify(path, run)


@pytest.mark.parametrize(
    ("damage", "checkpoint"),
    [(damage_truncated_es_state, 5), (damage_truncated_shard, 4), (damage_deleted_anchor, 5)],
)
def test_evaluate_of_a_damaged_checkpoint_is_a_clear_error_naming_the_file(run, capsys, damage, checkpoint):
    _, why = damage(run)
    write_json_atomic(run.config, {})  # the checkpoints belong to a run
    assert evaluate.main([str(run.checkpoint_path(checkpoint))]) == EXIT_INVALID
    err = capsys.readouterr().err
    assert err.startswith("evaluate: ") and why in err, err
    assert "Traceback" not in err
