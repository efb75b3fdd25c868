"""The TPU engine's own vLLM (vllm-tpu + tpu-inference, as locked) on JAX's CPU backend, with only the chip
stood in (`engine.tpu_emulation`): the stand-ins against the locked packages, the attention stand-in
against tpu-inference's own reference, the RPA kernel in TPU interpret mode, and then `vllm.LLM` inside
`VLLMBackend`: greedy generation equal to transformers' on the same fp32 weights, and the ES operations
of `JaxWorkerExtension` on the real runner (perturbation reaches the logits, restore bit for bit, one
parameter set resident, nothing compiled again).

The emulation patches this process (vLLM's engine core runs in it: VLLM_ENABLE_V1_MULTIPROCESSING=0),
so it is installed once, by the first fixture, before vLLM is imported.
"""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from engine_resolve.greedy import transformers_greedy_ids
from jax.experimental.pallas import tpu as pltpu

from engine import tpu_emulation
from engine.tiny_model import make_tiny_model
from engine.vllm_backend import VLLMBackend, sampling_params
from shared.countdown import make_prompt

# Before anything imports vLLM or tpu-inference's sampler (and before JAX starts its backend).
tpu_emulation.install()
# tpu-inference arrives with vllm-tpu (not a direct requirement, so Pants cannot infer it).
kernel = importlib.import_module("tpu_inference.kernels.ragged_paged_attention.v3.kernel")
kernel_hd64 = importlib.import_module("tpu_inference.kernels.ragged_paged_attention.v3.kernel_hd64")
ForbidCompile = importlib.import_module("tpu_inference.runner.utils").ForbidCompile

PROMPTS = [
    make_prompt([3, 5, 7], 22),
    make_prompt([10, 2, 8, 4], 40),
    "Hello",
    make_prompt([1, 2], 3)[:40],
]
MAX_NEW_TOKENS = 40


def test_every_stand_in_is_installed_over_a_function_of_the_locked_packages():
    report = tpu_emulation.installed()
    assert report["chip"] == tpu_emulation.CHIP_NAME
    for stand_in in tpu_emulation.STAND_INS:
        module = importlib.import_module(stand_in.module)
        replacement = getattr(module, stand_in.attribute)
        assert replacement.__module__ == tpu_emulation.__name__, stand_in
        assert f"{stand_in.module}.{stand_in.attribute}" in report["replaced"]
    # The by-name imports of the chip queries were replaced too, and the kernels keep their own kernel.
    assert "tpu_inference.kernels.ragged_paged_attention.v3.kernel.get_tpu_version" in report["replaced"]
    assert kernel.ragged_paged_attention.__module__ != tpu_emulation.__name__
    assert kernel_hd64.ragged_paged_attention_hd64.__module__ != tpu_emulation.__name__
    # What tpu-inference now asks of the chip.
    utils = importlib.import_module("tpu_inference.utils")
    assert utils.get_device_name() == "TPU v6e"
    assert utils.get_device_hbm_limit() == int(tpu_emulation.DEFAULT_HBM_GIB * 2**30)
    assert pltpu.get_tpu_info().generation == tpu_emulation.CHIP_GENERATION
    compiler_options = importlib.import_module("tpu_inference.models.common.compiler_options")
    assert compiler_options.get_step_fn_compiler_options() == {}


def test_a_tpu_or_gpu_is_refused():
    tpu = SimpleNamespace(platform="tpu", device_kind="TPU v6 lite")
    gpu = SimpleNamespace(platform="gpu", device_kind="NVIDIA H100")
    cpu = SimpleNamespace(platform="cpu", device_kind="cpu")
    tpu_emulation.check_devices([cpu])
    with pytest.raises(tpu_emulation.EmulationError, match="JAX sees TPU devices"):
        tpu_emulation.check_devices([tpu])
    with pytest.raises(tpu_emulation.EmulationError, match="JAX_PLATFORMS=cpu"):
        tpu_emulation.check_devices([gpu])


def attention_case(head_dim: int, dtype, num_q_heads: int = 4, num_kv_heads: int = 2):
    """RPA inputs: 4 sequences (two decodes, a prefill, a chunk continuing a prefix), 27 of 32 tokens
    used, pages shuffled, the cache's other rows random."""
    rng = np.random.default_rng(0)
    page_size, pages_per_seq, tokens = 16, 4, 32
    q_lens, kv_lens = [1, 1, 20, 5], [30, 17, 20, 40]
    cu_q_lens = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    pages = rng.permutation(20)[: 4 * pages_per_seq].astype(np.int32)
    module = kernel_hd64 if head_dim == 64 else kernel
    shape = module.get_kv_cache_shape(20, page_size, num_kv_heads, head_dim, dtype)

    def normal(*s):
        return jnp.asarray(rng.standard_normal(s), dtype)

    args = (
        normal(tokens, num_q_heads, head_dim),
        normal(tokens, num_kv_heads, head_dim),
        normal(tokens, num_kv_heads, head_dim),
        normal(*shape),
        jnp.asarray(kv_lens, jnp.int32),
        jnp.asarray(pages),
        jnp.asarray(cu_q_lens),
        jnp.asarray([2, 3, 4], jnp.int32),
    )
    return args, int(cu_q_lens[-1])


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_paged_attention_equals_tpu_inference_reference(head_dim, dtype):
    args, used = attention_case(head_dim, dtype)
    if head_dim == 64:
        expected, expected_cache = kernel_hd64.ref_ragged_paged_attention_hd64(*args, sm_scale=0.125)
        stand_in = tpu_emulation.paged_attention_hd64
    else:
        expected, expected_cache = kernel.ref_ragged_paged_attention(*args, sm_scale=0.125)
        stand_in = tpu_emulation.paged_attention
    output, cache = jax.jit(lambda *a: stand_in(*a, sm_scale=0.125))(*args)
    assert output.dtype == expected.dtype
    assert bool(jnp.array_equal(cache, expected_cache))
    # The reference rounds the attention weights to the KV dtype before the value product; the
    # stand-in keeps them in float32 (as the kernel does): bf16 differs by its resolution.
    tolerance = 1e-5 if dtype == jnp.float32 else 2e-2
    difference = jnp.abs(output[:used].astype(jnp.float32) - expected.astype(jnp.float32))
    assert float(jnp.max(difference)) < tolerance
    assert float(jnp.max(jnp.abs(output[used:]))) == 0.0


@pytest.mark.parametrize("head_dim", [64, 128])
def test_rpa_kernels_still_cannot_run_in_tpu_interpret_mode(head_dim):
    """The real kernels in JAX's TPU interpret mode fail on their ref views (bitcast, reshape), which the
    locked jax's interpreter does not handle. When this test fails, the kernel runs: make it the
    emulation's attention instead of `paged_attention`."""
    args, _ = attention_case(head_dim, jnp.float32)
    function = kernel_hd64.ragged_paged_attention_hd64 if head_dim == 64 else kernel.ragged_paged_attention
    interpreter_gap = r"'(Bitcast|Reshape)Transform' object has no attribute 'indices'"
    with pytest.raises(Exception, match=interpreter_gap), pltpu.force_tpu_interpret_mode():
        output, _ = function(*args, sm_scale=0.125)
        output.block_until_ready()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # Warm-started, so that greedy completions are varied text rather than one repeated token.
    return make_tiny_model(tmp_path_factory.mktemp("tiny"), seed=0, warm_start_steps=55)


@pytest.fixture(scope="module")
def backend(model_dir):
    backend = VLLMBackend(
        model_dir, dtype="float32", max_model_len=256, cpu_kv_cache_gib=0.05, emulate_tpu=True
    )
    yield backend
    backend.close()


def greedy_ids(backend: VLLMBackend, prompts: list[str]) -> list[list[int]]:
    outputs = backend.llm.generate(prompts, sampling_params(MAX_NEW_TOKENS), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def test_the_tpu_platform_runs_on_cpu_devices(backend):
    from vllm.platforms import current_platform

    assert current_platform.is_tpu()
    assert {d.platform for d in jax.devices()} == {"cpu"}
    assert backend.workers[0]["layout"] == "checkpoint" and backend.checkpoint_layout
    assert backend.workers[0]["devices"] == 1


def test_greedy_completions_equal_transformers(backend, model_dir):
    expected = transformers_greedy_ids(model_dir, PROMPTS, MAX_NEW_TOKENS)
    got = greedy_ids(backend, PROMPTS)
    assert sum(map(len, got)) > 60
    assert got == expected


def test_perturb_restore_update_in_the_runner_without_compiling_again(backend):
    """Perturbation reaches the logits and restore is exact (checked when the backend started, and
    again here by fingerprint and completions); an update moves the weights; the live arrays stay the
    same in number and bytes (the old buffers donated or freed); and after one warm-up of each operation
    nothing compiles again (tpu-inference's own `ForbidCompile`), for the weight operations and for the
    model function, which reads the new arrays as arguments."""
    backend.check_perturbation_reaches_logits(seed=3)
    memory = backend.llm.collective_rpc("es_device_memory")
    pairs = [(11, 0.002), (12, -0.002)]
    # Warm-up: one of each operation (the update's compiled function depends on the number of pairs).
    backend.perturb(5, 0.01)
    backend.restore()
    backend.update(pairs)
    greedy_ids(backend, PROMPTS)
    with ForbidCompile():
        before, before_ids = backend.fingerprint(), greedy_ids(backend, PROMPTS)
        backend.perturb(7, 0.05)
        perturbed, perturbed_ids = backend.fingerprint(), greedy_ids(backend, PROMPTS)
        assert backend.llm.collective_rpc("es_device_memory") == memory
        backend.restore()
        assert backend.fingerprint() == before
        assert greedy_ids(backend, PROMPTS) == before_ids
        backend.update(pairs)
        updated = backend.fingerprint()
        assert backend.llm.collective_rpc("es_device_memory") == memory
    assert perturbed not in (before, updated) and updated != before
    # At sigma 0.05 (2.5x the tiny model's weight scale) greedy ids change on any CPU's kernels; the
    # continuous check is check_perturbation_reaches_logits above.
    assert perturbed_ids != before_ids
    assert backend.llm.collective_rpc("es_compilations") == [1]


def test_the_master_is_the_checkpoint_and_a_saved_checkpoint_loads_in_transformers(
    backend, model_dir, tmp_path
):
    """`JaxLayout` maps the runner's leaves onto the checkpoint's tensors (checked bit for bit at start);
    after an update the checkpoint `save_checkpoint` writes loads in transformers, which then completes
    greedily as the engine does, and loading its master back reproduces the fingerprint."""
    from safetensors.torch import load_file

    from shared.run_layout import checkpoint_files

    # Back to the checkpoint (earlier tests updated the weights): the fingerprint the engine started with.
    start = backend.load_master_file(model_dir / "model.safetensors")
    assert start == backend.workers[0]["fingerprint"]
    master = backend.master()
    checkpoint = load_file(str(model_dir / "model.safetensors"))
    assert sorted(master) == sorted(n for n in checkpoint if n != "lm_head.weight")
    assert all(torch.equal(master[n], checkpoint[n].float()) for n in master)
    backend.update([(21, 0.01), (22, -0.01)])
    updated, updated_ids = backend.fingerprint(), greedy_ids(backend, PROMPTS)
    result = backend.save_checkpoint(checkpoint_files(tmp_path / "iter-1"))
    assert result.master is None  # float32: the model directory holds the master's values
    assert updated_ids == transformers_greedy_ids(result.model, PROMPTS, MAX_NEW_TOKENS)
    assert backend.load_master(master) == start
    assert backend.load_master_file(f"{result.model}/model.safetensors") == updated
