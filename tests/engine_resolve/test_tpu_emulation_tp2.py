"""Tensor parallelism 2 in the emulated-TPU mode (`engine.tpu_emulation`): tpu-inference shards the tiny
model over two CPU devices (`--xla_force_host_platform_device_count=2`; one worker, SPMD). Its own process
(a file of its own): the device count is fixed when JAX starts, and tpu-inference sizes each engine's KV
cache from all live arrays of the process, so the other file's engine would take the memory."""

from __future__ import annotations

import os

from engine_resolve.greedy import transformers_greedy_ids

from engine import tpu_emulation
from engine.tiny_model import make_tiny_model
from engine.vllm_backend import VLLMBackend, sampling_params
from shared.countdown import make_prompt

os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2"
tpu_emulation.install(hbm_gib=0.25)

PROMPTS = [make_prompt([3, 5, 7], 22), make_prompt([10, 2, 8, 4], 40), "Hello"]
MAX_NEW_TOKENS = 40


def test_tensor_parallelism_2_over_two_cpu_devices(tmp_path):
    """Completions equal transformers', and the sharded engine holds the unsharded engine's weights bit
    for bit, at start and after the same update. The model has 2 key/value heads: with 1, tpu-inference's
    loader does not replicate the k_proj bias over 2 devices (RuntimeError: shape '[2, 64]' is invalid
    for input of size 64)."""
    model_dir = make_tiny_model(tmp_path / "kv2", seed=0, num_kv_heads=2, warm_start_steps=55)
    expected = transformers_greedy_ids(model_dir, PROMPTS, MAX_NEW_TOKENS)
    options = {"dtype": "float32", "max_model_len": 256, "cpu_kv_cache_gib": 0.25, "emulate_tpu": True}
    pairs = [(31, 0.01), (32, -0.01)]
    # The first engine leaves the second room: each takes what the process has not used of the HBM.
    single = VLLMBackend(model_dir, gpu_memory_utilization=0.3, **options)
    try:
        sharded = VLLMBackend(model_dir, tensor_parallel_size=2, **options)
        try:
            assert single.workers[0]["devices"] == 1 and sharded.workers[0]["devices"] == 2
            assert sharded.fingerprint() == single.fingerprint()
            outputs = sharded.llm.generate(PROMPTS, sampling_params(MAX_NEW_TOKENS), use_tqdm=False)
            assert [list(o.outputs[0].token_ids) for o in outputs] == expected
            assert sharded.apply_update(pairs) == single.apply_update(pairs)
        finally:
            sharded.close()
    finally:
        single.close()
