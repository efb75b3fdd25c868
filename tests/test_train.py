"""`train` end to end: a real local Ray cluster, engines from the real engine PEX (built by Pants), the
tiny model. One uninterrupted run is the reference; runs stopped by Ctrl-C or SIGTERM and resumed (from
compact checkpoints, by replay), and runs whose engines are killed or diverge mid-iteration, must all end
with its weights and metrics exactly. A checkpoint that cannot be written stops the run and loses nothing
already checkpointed."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path

import pytest
import ray
from engine_pex_root import ENGINE_PEX_ROOT, run_engine_pex
from locked import locked
from train_scenarios import (
    assert_same_metrics,
    assert_weights_follow_the_updates,
    checkpoint_kinds,
    ctrl_c_then_resume,
    held_run_refused_then_resume,
    killed_engine_restarts,
    sigterm_then_resume,
    train_iterations,
    uninterrupted_run,
)

import driver.checkpointer
from driver import evaluate, train
from shared.run_layout import read_jsonl
from shared.seeds import NOISE_VERSION

# engine.machine.KERNEL_ISA_ENV (an engine module: not importable from the driver's resolve).
KERNEL_ISA_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "XLA_FLAGS")
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
    return uninterrupted_run(COMMON, ITERATIONS, tmp_path_factory.mktemp("reference") / "run")


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
        assert row["tokens_per_s"] == pytest.approx(row["tokens"] / row["seconds"]["rollout"])
        assert time.strptime(row["time"], "%Y-%m-%dT%H:%M:%SZ")  # UTC, ISO 8601
        # Every phase of bench/iteration_phases.py is measured inside the engines, and fits the iteration.
        phases = [f"engine_{p}" for p in ("perturb", "generate", "score", "restore", "update", "fingerprint")]
        assert all(row["seconds"][p] > 0 for p in phases), row["seconds"]
        engines = config["num_engines"]
        assert sum(row["seconds"][p] for p in phases) / engines < row["seconds"]["iteration"]
    assert_weights_follow_the_updates(out)
    assert read_jsonl(out / "samples.jsonl")
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / "reward.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n"), "the run's reward curve"

    manifest = json.loads((out / "manifest.json").read_text())
    (session,) = manifest["sessions"]
    assert session["engine_pex"]["distributions"] > 100
    assert session["noise_version"] == NOISE_VERSION
    assert len(session["engines"]) == 2
    for engine in session["engines"]:
        assert engine["packages"]["vllm-tpu"] == locked("engine", "vllm-tpu")
        assert engine["modules"]["torch"].startswith("2.")
        # What decides bit-identity across machines is recorded.
        machine = engine["machine"]
        assert machine["torch"]["cpu_capability"] and machine["torch"]["threads"] >= 1
        assert machine["cpu"]["model"] and machine["device"] == "cpu"
        # The caller's caps on the CPU kernels reach the engines (CI runs this test forced to AVX2 too).
        forced = {k: os.environ[k] for k in KERNEL_ISA_ENV if k in os.environ}
        assert machine["kernel_env"] == forced
        if "ATEN_CPU_CAPABILITY" in forced:
            assert machine["torch"]["cpu_capability"] == forced["ATEN_CPU_CAPABILITY"].upper()

    # After 2 updates a compact checkpoint (ES state only), at the end a full one.
    assert checkpoint_kinds(out) == {"iter-000002": "compact", "iter-000004": "full"}
    assert not (out / "checkpoints" / "iter-000002" / "model").exists()
    checkpoint = out / "checkpoints" / f"iter-{ITERATIONS:06d}"
    state = json.loads((checkpoint / "es_state.json").read_text())
    assert state["updates"] == ITERATIONS
    assert state["fingerprint"] == train_rows[-1]["fingerprint"]
    assert state["noise"] == {"version": NOISE_VERSION, "device": "cpu", "perturbation": {"mode": "full"}}
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


def test_resume_skips_a_damaged_newest_checkpoint_and_ends_as_the_uninterrupted_run(
    reference_run, tmp_path, capsys
):
    """A copy of the reference run whose newest checkpoint (full, after 4 updates) lost half its weights
    file: `--resume` says it skips it, naming the file, keeps it as iter-000004.damaged, replays the
    compact checkpoint after 2 updates and ends with the reference's metrics and weights."""
    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    shard = out / "checkpoints" / "iter-000004" / "model" / "model.safetensors"
    size = shard.stat().st_size
    with shard.open("r+b") as f:
        f.truncate(size // 2)
    status = train.main([*COMMON, "--iterations", str(ITERATIONS), "--output-dir", str(out), "--resume"])
    assert status == train.EXIT_OK
    printed = capsys.readouterr().out
    assert "warning: skipped a checkpoint that does not verify: " in printed
    assert f"{shard} has {size // 2} bytes, recorded {size} (truncated or replaced)" in printed
    assert "resuming from iter-000002" in printed and "replaying 2 updates onto" in printed
    assert (out / "checkpoints" / "iter-000004.damaged" / "model" / "model.safetensors").stat().st_size == (
        size // 2
    )
    assert_same_metrics(out, reference_run)
    assert checkpoint_kinds(out)["iter-000004"] == "full"
    resumed, reference = (
        json.loads((run / "checkpoints" / "iter-000004" / "es_state.json").read_text())["fingerprint"]
        for run in (out, reference_run)
    )
    assert resumed == reference


def test_a_second_driver_is_refused_and_resume_takes_over_a_killed_drivers_lock(
    reference_run, tmp_path, capsys
):
    held_run_refused_then_resume(COMMON, reference_run, ITERATIONS, tmp_path / "run", capsys)


def test_sigterm_finishes_the_iteration_and_resume_reproduces_the_run(reference_run, tmp_path, capsys):
    sigterm_then_resume(COMMON, reference_run, ITERATIONS, tmp_path / "run", capsys)


def test_a_compact_checkpoint_replays_to_the_weights_the_run_had(reference_run, capsys):
    """`evaluate` restores the compact checkpoint after 2 updates by replaying them onto the base model:
    the weights are bit-identical to the run's after 2 updates, and the accuracy to the run's eval row."""
    checkpoint = reference_run / "checkpoints" / "iter-000002"
    common = ["--engine-pex", str(ENGINE_PEX), "--no-build-engine", "--engine-python", sys.executable]
    assert evaluate.main([str(checkpoint), *common, "--pex-root", PEX_ROOT, "--no-progress"]) == 0
    rows = read_jsonl(reference_run / "metrics.jsonl")
    after_2 = next(r for r in rows if r["kind"] == "train" and r["iteration"] == 1)
    printed = capsys.readouterr().out
    assert f"(weights {after_2['fingerprint'][:16]})" in printed
    assert f"wrote {reference_run / 'reward.png'}" in printed, "evaluate redraws the run's curve with it"
    result = json.loads((checkpoint / "eval.json").read_text())
    assert result["fingerprint"] == after_2["fingerprint"]
    eval_2 = next(r for r in rows if r["kind"] == "eval" and r["updates"] == 2)
    assert result["accuracy"] == eval_2["accuracy"]


def test_evaluate_with_no_held_out_problems_is_a_clear_error(reference_run, capsys):
    status = evaluate.main([str(reference_run / "base-model"), "--eval-size", "0"])
    assert status == train.EXIT_INVALID
    assert "--eval-size: 0 leaves no held-out problems to evaluate" in capsys.readouterr().err


def test_a_checkpoint_that_cannot_be_written_stops_the_run_and_loses_nothing(
    reference_run, tmp_path, capsys, monkeypatch
):
    """The disk fills while the checkpoint after 2 updates is written: the run stops with exit 1 and an
    error naming the checkpoint; nothing of it is left, the checkpoint after 1 update is intact, and
    `--resume` from it ends exactly as the uninterrupted run."""
    out = tmp_path / "run"
    args = [*COMMON, "--model-dir", str(reference_run / "base-model"), "--iterations", str(ITERATIONS)]
    args += ["--output-dir", str(out), "--checkpoint-every", "1"]
    real_write = driver.checkpointer.write_json_atomic

    def disk_full(path, data, sort_keys=True):
        if path.name == "es_state.json" and ".iter-000002." in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_write(path, data, sort_keys=sort_keys)

    def fill_the_disk_in_iteration_1(trainer, iteration, member, engine):
        if iteration == 1:
            monkeypatch.setattr(driver.checkpointer, "write_json_atomic", disk_full)

    assert train.main(args, on_member_done=fill_the_disk_in_iteration_1) == train.EXIT_FAILED
    err = capsys.readouterr().err
    assert f"cannot write the checkpoint {out / 'checkpoints' / 'iter-000002'}" in err
    assert "No space left on device" in err and "iter-000001" in err
    assert checkpoint_kinds(out) == {"iter-000001": "compact"}
    monkeypatch.setattr(driver.checkpointer, "write_json_atomic", real_write)
    assert train.main([*args, "--resume"]) == train.EXIT_OK
    assert train_iterations(out) == list(range(ITERATIONS))
    assert_same_metrics(out, reference_run)


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


def test_low_rank_members_train_and_a_resumed_run_ends_exactly_as_the_uninterrupted_one(
    ray_cluster, tmp_path, capsys
):
    """`--perturbation lowrank --rank 2` on the transformers engines: each update follows the members'
    rewards, checkpoints record the perturbation, and Ctrl-C then `--resume` (the compact checkpoint's
    updates replayed in low rank) ends exactly as the uninterrupted run."""
    common = [*COMMON, "--perturbation", "lowrank", "--rank", "2"]
    reference = uninterrupted_run(common, ITERATIONS, tmp_path / "reference")
    assert_weights_follow_the_updates(reference)
    state = json.loads((reference / "checkpoints" / "iter-000002" / "es_state.json").read_text())
    assert state["kind"] == "compact"
    assert state["noise"]["perturbation"] == {
        "mode": "lowrank",
        "rank": 2,
        "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    }
    ctrl_c_then_resume(common, reference, ITERATIONS, tmp_path / "run", capsys)


def test_a_run_whose_members_all_tie_says_so_once_and_keeps_its_weights(reference_run, tmp_path, capsys):
    """At sigma 1e-12 a perturbation is below the fp32 rounding of every weight of the tiny model, so all
    members score alike in every iteration: each update is zero, the weights stay, the first tie is
    warned about once and the summary counts them (before: not a word)."""
    out = tmp_path / "run"
    args = [
        *COMMON,
        "--model-dir",
        str(reference_run / "base-model"),
        "--iterations",
        "2",
        "--sigma",
        "1e-12",
    ]
    assert train.main([*args, "--output-dir", str(out), "--progress"]) == train.EXIT_OK
    captured = capsys.readouterr()
    printed = captured.out
    # --progress draws bars on a terminal only; captured output (a log file, a pipe) gets none.
    assert not re.search(r"(iteration \d+|eval): +\d+%\|", captured.err), captured.err[-2000:]
    assert printed.count("so the update is zero") == 1, printed
    assert "(2 iterations had every member tie: zero updates)" in printed
    # The summary says how long it took and how the held-out reward moved (here: not at all).
    assert "wall time: " in printed and " for 2 iterations (" in printed
    evals = [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "eval"]
    assert f"held-out:    reward {evals[0]['reward_mean']:.4f} -> {evals[-1]['reward_mean']:.4f}" in printed
    state = json.loads((out / "checkpoints" / "iter-000002" / "es_state.json").read_text())
    assert [c for record in state["strategy"]["history"] for _, c in record["update"]] == [0.0] * 12
    (session,) = json.loads((out / "manifest.json").read_text())["sessions"]
    assert {r["fingerprint"] for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"} == {
        session["start"]["fingerprint"]
    }
