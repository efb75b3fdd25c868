"""The run's reward curve: a PNG drawn from metrics.jsonl (and checkpoints' eval.json), atomically."""

from __future__ import annotations

import json

import pytest

from driver.reward_plot import _checkpoint_evals, write_reward_plot
from shared.run_layout import RunDir, write_json_atomic

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(tmp_path, rows) -> RunDir:
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    write_json_atomic(run.config, {"task": "conciseness"})
    run.append_jsonl(run.metrics, rows)
    return run


def test_the_curve_is_a_png_of_train_and_eval_rows(tmp_path):
    rows = [{"kind": "eval", "updates": 0, "reward_mean": -300.0, "accuracy": 0.5, "seconds": {"eval": 1}}]
    rows += [
        {"kind": "train", "iteration": k, "reward_mean": -300.0 + 20 * k, "reward_max": -250.0 + 20 * k}
        for k in range(4)
    ]
    rows += [{"kind": "eval", "updates": 4, "reward_mean": -200.0, "accuracy": 0.6, "seconds": {"eval": 1}}]
    run = _run(tmp_path, rows)
    out = write_reward_plot(run.root)
    assert out == run.root / "reward.png" == run.reward_plot
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5000
    assert not list(run.root.glob(".*.tmp")), "the PNG is written through a temporary file"


def test_checkpoint_evaluations_are_drawn_and_a_run_without_rows_gets_none(tmp_path):
    run = _run(tmp_path, [])
    assert write_reward_plot(run.root) is None and not run.reward_plot.exists()
    checkpoint = run.checkpoint_path(3)
    checkpoint.mkdir(parents=True)
    write_json_atomic(checkpoint / "es_state.json", {"kind": "compact"})
    write_json_atomic(checkpoint / "eval.json", {"reward_mean": -12.5})
    assert _checkpoint_evals(run) == [(3, -12.5)]
    assert write_reward_plot(run.root).read_bytes().startswith(PNG_MAGIC)


def test_a_malformed_metrics_file_names_the_file_and_line(tmp_path):
    run = _run(tmp_path, [{"kind": "train", "iteration": 0, "reward_mean": 0.0, "reward_max": 0.0}])
    with run.metrics.open("a") as f:
        f.write("{not json\n" + json.dumps({"kind": "eval"}) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 2"):
        write_reward_plot(run.root)
