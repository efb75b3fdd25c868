"""`bench:vllm_check`, the first check a user runs on a TPU VM, run here in the emulated-TPU mode
(`--emulate-tpu`: the TPU engine's own vLLM on JAX's CPU backend, `engine.tpu_emulation`), so that the
script itself has run before it meets a TPU."""

from __future__ import annotations

import json

import vllm_check


def test_vllm_check_passes_on_the_emulated_tpu(tmp_path):
    report = tmp_path / "check.json"
    status = vllm_check.main(
        ["--emulate-tpu", "--prompts", "4", "--max-new-tokens", "16", "--json", str(report)]
    )
    data = json.loads(report.read_text())
    assert status == 0, data["checks"]
    assert data["results"]["accelerator"] == "tpu-emulated"
    names = [name for name, ok, _ in data["checks"] if ok]
    assert names == ["exact restore", "same noise", "perturbs logprobs", "no recompilation", "update"]
    # A perturbation moves the next-token log-probabilities on every CPU; whether it also flips a greedy
    # token of the 4 completions depends on the CPU's kernels, so that count is information only.
    assert data["results"]["logprob_change_max"] > 0
    changed, prompts = map(int, data["results"]["completions_changed"].split("/"))
    assert prompts == 4 and 0 <= changed <= 4
