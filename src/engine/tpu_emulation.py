"""Emulated-TPU mode: the TPU engine's own vLLM (vllm-tpu + tpu-inference) on JAX's CPU backend, for tests
and development only. Every stand-in for the chip is in this module.

vLLM selects `TpuPlatform` whenever `import libtpu` succeeds, so inside the engine PEX on a CPU machine
vLLM already is the TPU platform, and tpu-inference accepts `JAX_PLATFORMS=cpu`. What still needs a chip
is replaced here, each by the smallest change, all at one call (`install`), before vLLM is imported:

- chip name: `tpu_inference.utils.get_device_name`, which raises "Expected TPU devices" unless JAX's
  `device_kind` names a TPU; it answers `CHIP_NAME`.
- chip generation: `kernels.ragged_paged_attention.v3.util.get_tpu_version`, -1 off TPU, where the RPA
  block-size fallback raises "TPU version must be 4 or higher"; it answers `CHIP_GENERATION`.
- HBM size: `tpu_inference.utils.get_device_hbm_limit`, derived from the chip name (16-144 GiB); the KV
  cache is sized from it, so it is `hbm_gib` here.
- XLA options: `models.common.compiler_options.get_step_fn_compiler_options` and
  `get_sampling_compiler_options` return `xla_tpu_*` options, which XLA:CPU refuses ("No such compile
  option"); they return none.
- attention: `layers.common.attention_interface.ragged_paged_attention` and
  `ragged_paged_attention_hd64`, the RPA v3 Pallas kernels, cannot run here (below); `paged_attention`
  computes the same on RPA's own KV cache layout in plain JAX.
- Pallas chip info: `jax._src.tpu_info.registry["cpu"]`, JAX's own hook for `pltpu.get_tpu_info()`,
  which raises for the device kind "cpu" otherwise.

Not stood in: the mesh (`additional_config.sharding.sharding_strategy.device_indexes` avoids the
`.coords` sort of `make_optimized_mesh`, see `llm_kwargs`), `device.memory_stats()` (tpu-inference
itself falls back to counting `jax.live_arrays()` against the HBM size), the weights, the model code, the
scheduler, the KV cache manager, the sampler and the runner: those are the locked packages' own.

Why not the real RPA kernel in TPU interpret mode (`jax.experimental.pallas.tpu.force_tpu_interpret_mode`):
with the locked jax 0.11.2 the interpreter handles only indexing transforms of refs
(`jax._src.pallas.mosaic.interpret.utils.to_range`: "For now, assume only NDIndexer transforms"), and both
RPA v3 kernels (`kernel.py`, `kernel_hd64.py`) view their buffers through `ref.bitcast(...)` and
`ref.reshape(...)`: the first such `swap` fails with `AttributeError: 'BitcastTransform' (or
'ReshapeTransform') object has no attribute 'indices'`. (`kernel.py` did run once, for a single sequence
with one KV head in float32, a path without those views; any mixed batch reaches them.)
`tests/engine_resolve/test_tpu_emulation.py` runs the kernel that way and fails once it succeeds, so that
the real kernel replaces `paged_attention` when the locked JAX learns to interpret it.

Never reached on a TPU: `install` raises `EmulationError` when JAX sees any TPU device, or when JAX's
platform is not the CPU.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# The chip the emulation reports: TPU v6e (Trillium), one TensorCore per chip, the JAX device kind
# "TPU v6 lite" as `get_device_name` spells it.
CHIP_NAME = "TPU v6e"
CHIP_GENERATION = 6
# Emulated HBM per device, GiB: tpu-inference sizes the KV cache as hbm * gpu_memory_utilization - used.
DEFAULT_HBM_GIB = 0.25

# Environment of a process that runs the TPU engine's vLLM emulated (set before JAX or vLLM is imported):
# JAX on the CPU; vLLM's engine core in this process (the stand-ins are installed here, not in a child);
# no ahead-of-time compilation of every padding bucket (minutes on CPU, nothing to gain); the TPU VM
# identity tpu-inference otherwise asks the GCE metadata server for.
ENVIRONMENT = {
    "JAX_PLATFORMS": "cpu",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "SKIP_JAX_PRECOMPILE": "1",
    "TPU_ACCELERATOR_TYPE": "v6e-1",
    "TPU_NAME": "hermetic-es-emulated",
    "TPU_WORKER_ID": "0",
}


class EmulationError(RuntimeError):
    """The emulated-TPU mode cannot start here: a real TPU is present, JAX is not on the CPU, or the
    locked tpu-inference no longer has a function the emulation replaces (named)."""


@dataclass(frozen=True)
class StandIn:
    """One replaced function: `module`.`attribute` of the locked packages, and why (see the module table).
    With `everywhere`, every tpu-inference module's binding of the same function object is replaced too
    (modules that imported it by name); otherwise only `module`'s (the kernels keep their own)."""

    module: str
    attribute: str
    why: str
    everywhere: bool = True


STAND_INS = (
    StandIn("tpu_inference.utils", "get_device_name", "raises 'Expected TPU devices' off TPU"),
    StandIn(
        "tpu_inference.kernels.ragged_paged_attention.v3.util",
        "get_tpu_version",
        "-1 off TPU: RPA block sizes raise 'TPU version must be 4 or higher'",
    ),
    StandIn("tpu_inference.utils", "get_device_hbm_limit", "HBM size from the chip name sizes the KV cache"),
    StandIn(
        "tpu_inference.models.common.compiler_options",
        "get_step_fn_compiler_options",
        "xla_tpu_* options: XLA:CPU has no such compile option",
    ),
    StandIn(
        "tpu_inference.models.common.compiler_options",
        "get_sampling_compiler_options",
        "xla_tpu_* options: XLA:CPU has no such compile option",
    ),
    StandIn(
        "tpu_inference.layers.common.attention_interface",
        "ragged_paged_attention",
        "RPA v3 Pallas kernel: needs a TPU, and TPU interpret mode cannot run its ref bitcasts",
        everywhere=False,
    ),
    StandIn(
        "tpu_inference.layers.common.attention_interface",
        "ragged_paged_attention_hd64",
        "RPA v3 head_dim-64 Pallas kernel: as above",
        everywhere=False,
    ),
)
# Modules that bind a compiler-options function at import (`@jax.jit(compiler_options=...)`): they must be
# imported after the stand-in is in place.
_BIND_AT_IMPORT = ("tpu_inference.layers.jax.sample.sampling", "tpu_inference.runner.decode_loop")

_installed: dict[str, Any] | None = None


def llm_kwargs(tensor_parallel_size: int = 1) -> dict[str, Any]:
    """`vllm.LLM` arguments the emulation needs:
    - the mesh on CPU devices 0 .. tensor_parallel_size - 1 by index (`make_optimized_mesh` sorts
      devices by their TPU `.coords`, which CPU devices lack); more than one CPU device needs
      `XLA_FLAGS=--xla_force_host_platform_device_count=N` before JAX starts;
    - synchronous scheduling (`async_scheduling=False`). With vLLM's default asynchronous scheduling the
      greedy completions of a batch of 3-4 prompts departed from transformers' at one decode step in 4 of 15
      runs on the 2-core development machine (log-probability differences jumping from 1e-6 to 0.1-2;
      the same command rerun agreed), one of them with JAX's CPU async dispatch off; with synchronous
      scheduling 14 of 14 runs agreed to 3e-6, all with both cores kept busy. A race between the
      overlapped steps on the CPU backend; not seen, and not checked, on a TPU."""
    devices = list(range(tensor_parallel_size))
    return {
        "additional_config": {"sharding": {"sharding_strategy": {"device_indexes": devices}}},
        "async_scheduling": False,
    }


def is_active() -> bool:
    """True once `install` has run in this process."""
    return _installed is not None


def installed() -> dict[str, Any]:
    """What `install` set up: {"chip": str, "hbm_gib": float, "replaced": ["module.attribute", ...]}.

    Raises:
        EmulationError: `install` has not run.
    """
    if _installed is None:
        raise EmulationError("the emulated-TPU mode is not installed in this process")
    return dict(_installed)


def check_devices(devices: list[Any]) -> None:
    """Refuses to emulate a TPU on anything but CPU devices (JAX `Device` objects: `.platform`,
    `.device_kind`).

    Raises:
        EmulationError: a TPU among `devices` (the emulation never runs on one), or a non-CPU device.
    """
    if any(d.platform == "tpu" or "TPU" in d.device_kind for d in devices):
        raise EmulationError(
            f"JAX sees TPU devices ({devices}): the emulated-TPU mode is for machines without one; run "
            "the TPU engine without it"
        )
    if any(d.platform != "cpu" for d in devices):
        raise EmulationError(
            f"the emulated-TPU mode needs JAX on the CPU (JAX_PLATFORMS=cpu), but JAX's devices are {devices}"
        )


def install(hbm_gib: float = DEFAULT_HBM_GIB) -> dict[str, Any]:
    """Sets `ENVIRONMENT` (keeping values already set) and installs every stand-in of `STAND_INS` in this
    process, before vLLM is imported. Idempotent; returns `installed()`.

    Args:
        hbm_gib: the emulated HBM per device, GiB (> 0): the KV cache takes
            `hbm_gib * gpu_memory_utilization` minus the weights.

    Raises:
        EmulationError: JAX sees a TPU device (the emulation never runs on one), JAX's backend is not the
            CPU, a module that binds compiler options at import was imported first, or a replaced function
            is missing from the locked tpu-inference (named: the contract moved).
        ValueError: hbm_gib <= 0.
    """
    global _installed
    if _installed is not None:
        return installed()
    if hbm_gib <= 0:
        raise ValueError(f"hbm_gib must be > 0, got {hbm_gib}")
    if importlib.util.find_spec("tpu_inference") is None:
        raise EmulationError(
            "the emulated-TPU mode runs the TPU engine's vLLM, but tpu_inference is not installed: use the "
            "TPU engine PEX (src/engine:engine)"
        )
    for name, value in ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    import jax

    check_devices(jax.devices())
    early = [m for m in _BIND_AT_IMPORT if m in sys.modules]
    if early:
        raise EmulationError(
            f"{early[0]} was imported before the emulation was installed: it bound the TPU compiler "
            "options already; install the emulation before importing vLLM"
        )
    originals = {}
    for stand_in in STAND_INS:
        module = importlib.import_module(stand_in.module)
        if not callable(getattr(module, stand_in.attribute, None)):
            raise EmulationError(
                f"{stand_in.module}.{stand_in.attribute} is gone from the installed tpu-inference: the "
                f"emulation replaces it ({stand_in.why}); update engine.tpu_emulation"
            )
        originals[id(getattr(module, stand_in.attribute))] = stand_in
    replacements = _replacements(hbm_gib)
    replaced = []
    for stand_in in STAND_INS:
        if not stand_in.everywhere:
            setattr(sys.modules[stand_in.module], stand_in.attribute, replacements[stand_in.attribute])
            replaced.append(f"{stand_in.module}.{stand_in.attribute}")
    # Modules that imported a function by name hold their own binding: replace every binding of the
    # original objects in tpu-inference's loaded modules.
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "tpu_inference" or name.startswith("tpu_inference.")):
            continue
        for attribute, value in list(vars(module).items()):
            stand_in = originals.get(id(value))
            if stand_in is not None and stand_in.everywhere:
                setattr(module, attribute, replacements[stand_in.attribute])
                replaced.append(f"{name}.{attribute}")
    _register_chip_info()
    _installed = {"chip": CHIP_NAME, "hbm_gib": float(hbm_gib), "replaced": sorted(replaced)}
    return installed()


def _register_chip_info() -> None:
    from jax._src import tpu_info

    tpu_info.registry["cpu"] = lambda: tpu_info.get_tpu_info_for_chip(tpu_info.ChipVersion.TPU_V6E, 1)


def _replacements(hbm_gib: float) -> dict[str, Callable[..., Any]]:
    def get_device_name(num_devices: int | None = None) -> str:
        return CHIP_NAME if num_devices is None else f"{CHIP_NAME}-{num_devices}"

    def no_options() -> dict[str, str]:
        return {}

    return {
        "get_device_name": get_device_name,
        "get_tpu_version": lambda: CHIP_GENERATION,
        "get_device_hbm_limit": lambda: int(hbm_gib * 2**30),
        "get_step_fn_compiler_options": no_options,
        "get_sampling_compiler_options": no_options,
        "ragged_paged_attention": paged_attention,
        "ragged_paged_attention_hd64": paged_attention_hd64,
    }


def _split_kv(rows: Any, num_kv_heads: int, head_dim: int, hd64: bool) -> tuple[Any, Any]:
    """Keys and values, each [N, num_kv_heads, head_dim], from N rows of the KV cache in RPA's layout
    (the inverse of the kernels' `merge_kv`): [N, heads_x2 / packing, packing, 128-aligned dim] with
    each head's key and value rows adjacent; for head_dim 64 [N, heads / packing, packing, 128] with the
    key and value of a head side by side."""
    n = rows.shape[0]
    if hd64:
        kv = rows.reshape(n, -1, 2 * head_dim)[:, :num_kv_heads]
        return kv[..., :head_dim], kv[..., head_dim:]
    kv = rows.reshape(n, -1, rows.shape[-1])[:, : 2 * num_kv_heads, :head_dim]
    kv = kv.reshape(n, num_kv_heads, 2, head_dim)
    return kv[:, :, 0], kv[:, :, 1]


def paged_attention(
    queries: Any,
    keys: Any,
    values: Any,
    kv_cache: Any,
    kv_lens: Any,
    page_indices: Any,
    cu_q_lens: Any,
    distribution: Any,
    *,
    use_causal_mask: bool = True,
    update_kv_cache: bool = True,
    sm_scale: float = 1.0,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    out_dtype: Any = None,
    mask_value: float | None = None,
    q_scale: float | None = None,
    k_scale: float | None = None,
    v_scale: float | None = None,
    hd64: bool = False,
    **tuning: Any,
) -> tuple[Any, Any]:
    """Ragged paged attention in plain JAX with the signature and KV cache layout of tpu-inference's RPA
    v3 kernel (`kernels.ragged_paged_attention.v3.kernel.ragged_paged_attention`; the kernel's tuning
    and debug arguments are accepted and ignored), or with `hd64` the head_dim-64 kernel's layout
    (`paged_attention_hd64`). Jittable: every shape is static.

    Each query token t of sequence s (cu_q_lens[s] <= t < cu_q_lens[s + 1], s < distribution[2]) sits
    at position kv_lens[s] - q_len(s) + (t - cu_q_lens[s]); its key and value are written into the
    cache page `page_indices[s * pages_per_seq + position // page_size]`, and it attends (softmax in
    float32, scaled by sm_scale) to the positions <= its own (causal) below kv_lens[s].

    Args:
        queries: [max_num_tokens, num_q_heads, head_dim]; keys, values: [max_num_tokens, num_kv_heads,
            head_dim]; kv_cache: [total_num_pages, page_size, num_kv_heads_x2 // packing, packing,
            align(head_dim, 128)]; kv_lens: int32[max_num_seqs]; page_indices: int32[max_num_seqs *
            pages_per_seq]; cu_q_lens: int32[max_num_seqs + 1]; distribution: int32[3] (decode,
            prefill+decode, all sequences: cumulative counts).

    Returns:
        (output [max_num_tokens, num_q_heads, head_dim] in out_dtype (float32 for float32 queries, else
        bfloat16), the updated kv_cache); padding tokens' output is 0.

    Raises:
        NotImplementedError: q_scale, k_scale or v_scale given (quantized KV caches).
    """
    import jax
    import jax.numpy as jnp

    # tpu-inference arrives with vllm-tpu (not a direct requirement: Pants cannot infer it).
    from tpu_inference.kernels.ragged_paged_attention.v3 import kernel, kernel_hd64  # pants: no-infer-dep

    if any(s is not None for s in (q_scale, k_scale, v_scale)):
        raise NotImplementedError("emulated paged attention: quantized KV cache scales are not supported")
    if out_dtype is None:
        out_dtype = jnp.float32 if queries.dtype == jnp.float32 else jnp.bfloat16
    if mask_value is None:
        mask_value = jnp.finfo(jnp.float32).min
    num_tokens, num_q_heads, head_dim = queries.shape
    num_kv_heads = keys.shape[1]
    page_size = kv_cache.shape[1]
    num_seqs_max = kv_lens.shape[0]
    pages_per_seq = page_indices.shape[0] // num_seqs_max
    span = pages_per_seq * page_size
    num_seqs = distribution[2]

    token = jnp.arange(num_tokens, dtype=jnp.int32)
    # The sequence of each query token: cu_q_lens[s] <= t < cu_q_lens[s + 1]; padding tokens beyond
    # the last sequence are masked.
    live = jnp.arange(num_seqs_max) < num_seqs
    seq = jnp.sum((token[:, None] >= cu_q_lens[None, 1:]) & live[None, :], axis=1)
    seq = jnp.minimum(seq, num_seqs_max - 1)
    valid = token < cu_q_lens[num_seqs]
    q_len = cu_q_lens[seq + 1] - cu_q_lens[seq]
    position = kv_lens[seq] - q_len + (token - cu_q_lens[seq])
    rows_per_cache = kv_cache.shape[0] * page_size
    flat = kv_cache.reshape(rows_per_cache, *kv_cache.shape[2:])

    def slot(seq_ids: Any, positions: Any) -> Any:
        page = page_indices[seq_ids * pages_per_seq + positions // page_size]
        return page * page_size + positions % page_size

    if update_kv_cache:
        merge = kernel_hd64.merge_kv if hd64 else kernel.merge_kv
        merged = merge(keys, values).astype(kv_cache.dtype)
        target = jnp.where(valid, slot(seq, jnp.maximum(position, 0)), rows_per_cache)
        flat = flat.at[target].set(merged, mode="drop")
    # Every position of each token's sequence, its keys and values from the (updated) cache.
    context = jnp.arange(span, dtype=jnp.int32)
    rows = flat[slot(seq[:, None], context[None, :]).reshape(-1)]
    k, v = _split_kv(rows, num_kv_heads, head_dim, hd64)
    k = k.reshape(num_tokens, span, num_kv_heads, head_dim)
    v = v.reshape(num_tokens, span, num_kv_heads, head_dim)
    group = num_q_heads // num_kv_heads
    q = queries.reshape(num_tokens, num_kv_heads, group, head_dim)
    logits = jnp.einsum("tkgd,tskd->tkgs", q, k, preferred_element_type=jnp.float32) * sm_scale
    if soft_cap is not None:
        logits = soft_cap * jnp.tanh(logits / soft_cap)
    mask = context[None, :] < kv_lens[seq][:, None]
    if use_causal_mask:
        mask &= context[None, :] <= position[:, None]
        if sliding_window is not None:
            mask &= context[None, :] > position[:, None] - sliding_window
    mask &= valid[:, None]
    logits = jnp.where(mask[:, None, None, :], logits, mask_value)
    weights = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("tkgs,tskd->tkgd", weights, v.astype(jnp.float32))
    out = jnp.where(valid[:, None, None, None], out, 0.0)
    return out.reshape(num_tokens, num_q_heads, head_dim).astype(out_dtype), flat.reshape(kv_cache.shape)


def paged_attention_hd64(
    queries: Any,
    keys: Any,
    values: Any,
    kv_cache: Any,
    kv_lens: Any,
    page_indices: Any,
    cu_q_lens: Any,
    distribution: Any,
    attention_sink: Any = None,
    **options: Any,
) -> tuple[Any, Any]:
    """`paged_attention` for head_dim 64 with the KV cache layout of tpu-inference's
    `kernel_hd64.ragged_paged_attention_hd64` ([total_num_pages, page_size, num_kv_heads // packing,
    packing, 128], a head's key and value side by side); `options` as that kernel takes them (causal,
    always updating the cache).

    Raises:
        NotImplementedError: an attention sink, or KV cache scales, given.
    """
    if attention_sink is not None:
        raise NotImplementedError("emulated paged attention: attention sinks are not supported")
    return paged_attention(
        queries, keys, values, kv_cache, kv_lens, page_indices, cu_q_lens, distribution, hd64=True, **options
    )
