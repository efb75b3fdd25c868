"""`train` end to end: a real local Ray cluster, engines from the real engine PEX (built by Pants), the
tiny model. One uninterrupted run is the reference; a run stopped by Ctrl-C and resumed, and a run
whose engine process is killed mid-iteration, must both end with its weights and metrics exactly."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import ray
from engine_pex_root import ENGINE_PEX_ROOT, run_engine_pex
from train_scenarios import assert_same_metrics, ctrl_c_then_resume, killed_engine_restarts

from driver import train
from shared.run_layout import read_jsonl

ENGINE_PEX = Path("src.engine/engine.pex")
PEX_ROOT = ENGINE_PEX_ROOT
ITERATIONS = 4
COMMON = [
    "--engine-pex", str(ENGINE_PEX), "--no-build-engine", "--engine-python", sys.executable,
    "--pex-root", PEX_ROOT, "--num-engines", "2", "--population", "6", "--prompts-per-member", "4",
    "--max-new-tokens", "24", "--batch-size", "4", "--eval-size", "8", "--eval-every", "2",
    "--checkpoint-every", "2", "--sigma", "0.01", "--alpha", "0.005", "--no-progress",
]  # fmt: skip


def engine_python_code(code: str) -> str:
    """Runs `code` with the engine PEX's interpreter (the engine resolve: torch, transformers)."""
    proc = run_engine_pex(ENGINE_PEX, ["-c", code], 600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip()


@pytest.fixture(scope="module")
def reference_run(ray_cluster, tmp_path_factory):
    """The uninterrupted run: tiny default model, ITERATIONS iterations."""
    out = tmp_path_factory.mktemp("reference") / "run"
    status = train.main(
        [*COMMON, "--model-dir", "none", "--iterations", str(ITERATIONS), "--output-dir", str(out)]
    )
    assert status == train.EXIT_OK
    return out


def test_outputs_exist_parse_and_the_checkpoint_loads(reference_run, capsys):
    out = reference_run
    config = json.loads((out / "config.json").read_text())
    assert config["population"] == 6 and config["iterations"] == ITERATIONS
    rows = read_jsonl(out / "metrics.jsonl")
    train_rows = [r for r in rows if r["kind"] == "train"]
    eval_rows = [r for r in rows if r["kind"] == "eval"]
    assert [r["iteration"] for r in train_rows] == list(range(ITERATIONS))
    assert [r["updates"] for r in eval_rows] == [0, 2, 4]
    for row in train_rows:
        for key in ("reward_mean", "reward_std", "reward_max", "accuracy", "format"):
            assert math.isfinite(row[key]), (key, row)
        assert row["tokens"] > 0 and row["seconds"]["rollout"] > 0
    # The members' rewards differ, so the weights move.
    assert any(r["reward_std"] > 0 for r in train_rows)
    assert len({r["fingerprint"] for r in train_rows}) > 1
    assert read_jsonl(out / "samples.jsonl")
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))

    manifest = json.loads((out / "manifest.json").read_text())
    (session,) = manifest["sessions"]
    assert session["engine_pex"]["distributions"] > 100
    assert len(session["engines"]) == 2
    for engine in session["engines"]:
        assert engine["packages"]["vllm-tpu"] == "0.32.0"
        assert engine["modules"]["torch"].startswith("2.")

    checkpoint = out / "checkpoints" / f"iter-{ITERATIONS:06d}"
    state = json.loads((checkpoint / "es_state.json").read_text())
    assert state["updates"] == ITERATIONS
    assert state["fingerprint"] == train_rows[-1]["fingerprint"]
    assert (out / "checkpoints" / "iter-000002" / "model" / "model.safetensors").exists()
    # The checkpoint is a Hugging Face model directory holding exactly the trained weights.
    fingerprint = engine_python_code(
        "from transformers import AutoModelForCausalLM\n"
        "from engine.torch_weights import TorchWeights\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(checkpoint / 'model')!r}, "
        "local_files_only=True)\n"
        "print(TorchWeights(model).fingerprint())"
    )
    assert fingerprint == state["fingerprint"]


def test_ctrl_c_then_resume_reproduces_the_uninterrupted_run(reference_run, tmp_path, capsys):
    ctrl_c_then_resume(COMMON, reference_run, ITERATIONS, tmp_path / "run", capsys)


def test_a_killed_engine_is_restarted_and_the_result_is_unchanged(reference_run, tmp_path, capsys):
    killed_engine_restarts(COMMON, reference_run, ITERATIONS, tmp_path / "run", capsys)


def test_a_diverged_engine_is_resynced_from_a_healthy_one(reference_run, tmp_path):
    out = tmp_path / "run"
    model = str(reference_run / "base-model")
    done = []

    def diverge_engine_1_after_iteration_1(trainer, iteration, member, engine):
        done.append(iteration)
        if iteration == 1 and done.count(1) == trainer.config.population:
            # Every member of iteration 1 has its reward: an extra update makes engine 1 differ.
            ray.get(trainer.pool.handles[1].call.remote("apply_update", [[12345, 1e-3]]))

    with pytest.warns(RuntimeWarning, match=r"engines \[1\] diverged"):
        status = train.main(
            [*COMMON, "--model-dir", model, "--iterations", str(ITERATIONS), "--output-dir", str(out)],
            on_member_done=diverge_engine_1_after_iteration_1,
        )
    assert status == train.EXIT_OK
    assert_same_metrics(out, reference_run)


def test_a_resync_copies_from_a_live_engine_holding_the_run_weights(reference_run, tmp_path):
    """Engine 0 dies and engine 2 diverges in the same iteration: the resync of engine 2 must copy from
    engine 1 (alive, with the run's weights), never from the dead engine 0, which is then restarted."""
    out = tmp_path / "run"
    done = []

    def kill_0_and_diverge_2_after_iteration_1(trainer, iteration, member, engine):
        done.append(iteration)
        if iteration == 1 and done.count(1) == trainer.config.population:
            ray.kill(trainer.pool.handles[0], no_restart=True)
            ray.get(trainer.pool.handles[2].call.remote("apply_update", [[12345, 1e-3]]))

    args = [*COMMON, "--num-engines", "3", "--model-dir", str(reference_run / "base-model")]
    with pytest.warns(RuntimeWarning, match=r"engines \[2\] diverged .* from engine 1"):
        status = train.main(
            [*args, "--iterations", str(ITERATIONS), "--output-dir", str(out)],
            on_member_done=kill_0_and_diverge_2_after_iteration_1,
        )
    assert status == train.EXIT_OK
    assert_same_metrics(out, reference_run)


def test_vllm_engines_asking_for_tpus_a_cluster_lacks_fail_at_once(ray_cluster, tmp_path, capsys):
    argv = [*COMMON, "--backend", "vllm", "--engine-resources", "TPU=4", "--tensor-parallel-size", "4"]
    status = train.main([*argv, "--iterations", "1", "--output-dir", str(tmp_path / "run")])
    assert status == train.EXIT_FAILED
    assert "each engine asks for TPU=4, but the Ray cluster has TPU=0" in capsys.readouterr().err
