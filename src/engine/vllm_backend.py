"""The vLLM rollout backend: one `vllm.LLM` per engine, greedy generation, ES weight operations in place
inside its workers (`engine.vllm_worker`, through `LLM.collective_rpc`).

The same code runs in both engine PEX files: the TPU engine (`vllm-tpu` + tpu-inference, JAX weights)
and the GPU engine (CUDA `vllm`, torch weights); `vllm.platforms.current_platform` picks the worker
extension. Settings follow the ES paper's rollouts (Qiu et al. 2025, Sec. 4: greedy decoding) and what
in-place perturbation needs: prefix caching off (a cached prefix computed with other weights would be
reused), one `LLM` for the whole run (no re-initialisation or recompilation per member; CUDA graphs are
captured once at start-up and keep pointing at the same parameter storage, which is modified in place).

On TPU VMs, give each engine its chips through Ray (`--engine-resources TPU=4`): Ray sets
`TPU_VISIBLE_CHIPS` (and the chip bounds) in the engine actor's environment before this runs. The driver
never imports JAX (its resolve lacks it), so it cannot initialise a TPU.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from engine.hf_backend import Completion, use_deterministic_cublas

TORCH_EXTENSION = "engine.vllm_worker.TorchWorkerExtension"
JAX_EXTENSION = "engine.vllm_worker.JaxWorkerExtension"


def worker_extension(is_tpu: bool) -> str:
    """The qualified name of the worker extension for the platform (tpu-inference workers hold JAX
    weights, CUDA workers torch weights)."""
    return JAX_EXTENSION if is_tpu else TORCH_EXTENSION


def sampling_params(max_new_tokens: int) -> Any:
    """Greedy `vllm.SamplingParams` for `max_new_tokens` tokens (the paper decodes greedily).

    Raises:
        ValueError: max_new_tokens < 1.
    """
    from vllm import SamplingParams

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    return SamplingParams(temperature=0.0, max_tokens=max_new_tokens, skip_special_tokens=True)


class VLLMBackend:
    """Greedy generation with vLLM and ES weight operations on the workers' weights, in place.

    Args:
        model_dir: a Hugging Face model directory (local; nothing is downloaded).
        dtype: "bfloat16" (the paper's), "float16" or "float32".
        tensor_parallel_size: workers (GPUs or TPU chips) the model is sharded over inside this engine.
        max_model_len: prompt + completion tokens per sequence.
        gpu_memory_utilization: share of device memory vLLM may take (weights + KV cache).
        restore_mode: "master" (exact, fp32 host master) or "subtract"; "device" on GPUs only.
        deterministic: deterministic cuBLAS workspaces (`engine.hf_backend.use_deterministic_cublas`, read
            when the workers start) so that identical weights give identical completions across engines
            and restarts.
        llm_kwargs: further `vllm.LLM` arguments (e.g. `enforce_eager=True`).

    Raises:
        ValueError: from vLLM, for an unreadable model directory or an unsupported setting.
    """

    def __init__(
        self,
        model_dir: str | Path,
        dtype: str = "bfloat16",
        tensor_parallel_size: int = 1,
        max_model_len: int = 2048,
        gpu_memory_utilization: float = 0.85,
        restore_mode: str = "master",
        deterministic: bool = True,
        **llm_kwargs: Any,
    ) -> None:
        from vllm import LLM
        from vllm.platforms import current_platform

        if deterministic:
            use_deterministic_cublas()
        self.llm = LLM(
            model=str(model_dir),
            tokenizer=str(model_dir),
            dtype=dtype,
            tensor_parallel_size=tensor_parallel_size,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            enable_prefix_caching=False,
            worker_extension_cls=worker_extension(current_platform.is_tpu()),
            seed=0,
            **llm_kwargs,
        )
        self.workers = self.llm.collective_rpc("es_setup", kwargs={"restore_mode": restore_mode})

    def generate(self, prompts: list[str], max_new_tokens: int, batch_size: int = 0) -> list[Completion]:
        """Greedy completions of `prompts`, in order (`batch_size` is ignored: vLLM schedules batches).

        Raises:
            ValueError: max_new_tokens < 1.
        """
        outputs = self.llm.generate(prompts, sampling_params(max_new_tokens), use_tqdm=False)
        completions = []
        for output in outputs:
            best = output.outputs[0]
            completions.append(
                Completion(
                    text=best.text, num_tokens=len(best.token_ids), finished=best.finish_reason == "stop"
                )
            )
        return completions

    def perturb(self, seed: int, sigma: float, sign: int = 1) -> None:
        """theta <- theta + sign * sigma * eps(seed) on every worker."""
        self.llm.collective_rpc("es_perturb", args=(seed, sigma, sign))

    def restore(self) -> None:
        """Undoes `perturb` on every worker."""
        self.llm.collective_rpc("es_restore")

    def apply_update(self, pairs: list[tuple[int, float]]) -> str:
        """Applies the update ((seed, coefficient) pairs) on every worker; returns `fingerprint()`."""
        return combine(self.llm.collective_rpc("es_apply_update", args=(pairs,)))

    def fingerprint(self) -> str:
        """SHA-256 over the workers' fingerprints in rank order: equal across engines exactly when every
        shard is bit-identical."""
        return combine(self.llm.collective_rpc("es_fingerprint"))


def combine(fingerprints: list[str]) -> str:
    """One fingerprint for an engine from its workers' (in rank order); a single worker's is kept as is."""
    if len(fingerprints) == 1:
        return fingerprints[0]
    return hashlib.sha256("|".join(fingerprints).encode()).hexdigest()
