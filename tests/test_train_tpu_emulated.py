"""`train --backend vllm --emulate-tpu` end to end: a real local Ray cluster, two engines from the real TPU
engine PEX (src/engine:engine, built by Pants) running its own vLLM (vllm-tpu + tpu-inference) on JAX's
CPU backend with the chip stood in (`engine.tpu_emulation`), the tiny model. Every iteration's update
must give both engines the same weights (the trainer compares their fingerprints), the checkpoint must
load in transformers with the trained weights, and a run stopped by Ctrl-C and resumed must end exactly
as the uninterrupted one."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from engine_pex_root import ENGINE_PEX_ROOT, run_engine_pex
from train_scenarios import assert_weights_follow_the_updates, ctrl_c_then_resume, uninterrupted_run

from shared.run_layout import read_jsonl

ENGINE_PEX = Path("src.engine/engine.pex")
ITERATIONS = 3
COMMON = [
    "--backend", "vllm", "--emulate-tpu", "--engine-pex", str(ENGINE_PEX), "--no-build-engine",
    "--engine-python", sys.executable, "--pex-root", ENGINE_PEX_ROOT, "--engine-start-timeout", "300",
    "--num-engines", "2", "--cpu-kv-cache-gib", "0.05", "--max-model-len", "256",
    "--population", "4", "--prompts-per-member", "4", "--max-new-tokens", "16", "--batch-size", "4",
    "--eval-size", "4", "--eval-every", "2", "--checkpoint-every", "2",
    "--sigma", "0.01", "--alpha", "0.005", "--no-progress",
]  # fmt: skip


@pytest.fixture(scope="module")
def reference_run(ray_cluster, tmp_path_factory):
    """The uninterrupted run: tiny default model, ITERATIONS iterations."""
    return uninterrupted_run(COMMON, ITERATIONS, tmp_path_factory.mktemp("reference") / "run")


def test_two_emulated_tpu_engines_train_and_the_checkpoint_loads_in_transformers(reference_run):
    out = reference_run
    rows = read_jsonl(out / "metrics.jsonl")
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [r["iteration"] for r in train_rows] == list(range(ITERATIONS))
    for row in train_rows:
        assert math.isfinite(row["reward_mean"]) and row["tokens"] > 0
    assert_weights_follow_the_updates(out)

    (session,) = json.loads((out / "manifest.json").read_text())["sessions"]
    assert len(session["engines"]) == 2
    for engine in session["engines"]:
        assert engine["packages"]["vllm-tpu"] and engine["packages"]["tpu-inference"]

    checkpoint = out / "checkpoints" / f"iter-{ITERATIONS:06d}"
    state = json.loads((checkpoint / "es_state.json").read_text())
    assert state["fingerprint"] == train_rows[-1]["fingerprint"]
    model, base = checkpoint / "model", out / "base-model"
    # transformers loads the checkpoint's model/ with every parameter, and the trained weights differ
    # from the base model's.
    code = (
        "import torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"trained = AutoModelForCausalLM.from_pretrained({str(model)!r}, local_files_only=True)\n"
        f"base = AutoModelForCausalLM.from_pretrained({str(base)!r}, local_files_only=True)\n"
        "moved = sum(not torch.equal(p, q) for p, q in zip(trained.parameters(), base.parameters()))\n"
        "count = lambda model: sum(p.numel() for p in model.parameters())\n"
        "print('RESULT', count(trained), count(base), moved)\n"
    )
    proc = run_engine_pex(ENGINE_PEX, ["-c", code], 900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = (x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    parameters, base_parameters, moved = map(int, line.split()[1:])
    assert parameters == base_parameters > 0 and moved > 0


def test_ctrl_c_then_resume_reproduces_the_uninterrupted_run(reference_run, tmp_path, capsys):
    ctrl_c_then_resume(COMMON, reference_run, ITERATIONS, tmp_path / "run", capsys)
