"""Where and how a run's engines run: the model, the backend and its settings, the resources of each engine
actor, and where the engine PEX and its interpreter come from (the options `train` and `evaluate` share
with every engine; `driver.train_config.TrainConfig` adds the ES, data and output options)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, ValidationError, model_validator

from driver.options import STRICT, ConfigError, config_error, option
from shared.engine_pex import (
    CPU_ENGINE_TARGET,
    DEFAULT_PEX_ROOT,
    ENGINE_PEX_ENV,
    ENGINE_TARGET,
    GPU_ENGINE_TARGET,
    PEX_ROOT_ENV,
    pex_path,
)
from shared.protocol import CPU_LINEAR_MODES, DTYPES, PACKAGED_MODELS, RESTORE_MODES

# --backend: where and with what the engines run: "cpu" and "cuda" (the transformers engine backend on CPUs
# or CUDA GPUs), "vllm" (the vLLM engine backend on GPUs, TPUs or CPUs); see shared.protocol.ENGINE_BACKENDS.
BACKEND_CHOICES = ("cpu", "cuda", "vllm")


class EngineOptions(BaseModel):
    """The engine options of a run (units per field; `None` means "derived", see help).

    Raises:
        ConfigError: on construction, for the first invalid value (`driver.options.config_error`).
    """

    model_config = STRICT

    # Model and engines.
    model_dir: str | None = option(
        None,
        "Hugging Face model directory, readable on every node; default: the tiny test model, "
        "created under OUTPUT_DIR/base-model",
    )
    model: Literal[PACKAGED_MODELS] | None = option(
        None,
        "a pretrained model the CPU engine ships, imported from GGUF into OUTPUT_DIR/base-model "
        f"(engine.gguf_import); instead of --model-dir. One of: {', '.join(PACKAGED_MODELS)}",
    )
    backend: Literal[BACKEND_CHOICES] = option(
        "cpu",
        "rollout backend: cpu (transformers on CPU), cuda (transformers on a GPU) or vllm (vLLM on GPUs, "
        "with --engine-gpus, from the engine-gpu PEX; on TPU chips, with --engine-resources TPU=N, "
        "from the engine PEX; with neither, on CPUs, from the engine-cpu PEX)",
    )
    dtype: Literal[DTYPES] = option("float32", "weights dtype in the engines")
    restore_mode: Literal[RESTORE_MODES] = option(
        "master",
        "how perturbations are undone: master (exact, fp32 host copy), device (exact, a copy of the "
        "weights in device memory: one more set of parameters there, faster on a GPU) or subtract "
        "(the reference's, inexact in low precision)",
    )
    deterministic: bool = option(
        True,
        "deterministic torch kernels in the engines (exact resume and fault recovery on GPUs, where "
        "greedy generation is otherwise not reproducible; slower: docs/measurements.md)",
    )
    tensor_parallel_size: int = option(
        1, "vLLM: GPUs or TPU chips each engine shards its model over (tensor parallelism)", "devices", gt=0
    )
    gpu_memory_utilization: float = option(
        0.85,
        "vLLM: share of each device's memory an engine may take (weights and KV cache)",
        "fraction",
        resumable=True,
        gt=0,
        le=1,
        expect="in (0, 1]",
    )
    max_model_len: int = option(2048, "vLLM: prompt + completion tokens per sequence", "tokens", gt=0)
    cpu_kv_cache_gib: float = option(
        1.0, "vLLM on CPUs: host RAM each engine reserves for its KV cache", "GiB", resumable=True, gt=0
    )
    cpu_linear: Literal[CPU_LINEAR_MODES] = option(
        "read",
        "vLLM on CPUs: linear layers compute from the perturbed parameters (read), or vLLM's packed "
        "kernels are re-packed after every weight change (repack)",
    )
    emulate_tpu: bool = option(
        False,
        "vLLM on CPUs: run the TPU engine's own vLLM (vllm-tpu + tpu-inference, from the engine PEX) on "
        "JAX's CPU backend with the chip stood in (engine.tpu_emulation), for tests and development; "
        "never on a TPU. The emulated HBM per engine is --cpu-kv-cache-gib",
    )
    num_engines: int = option(2, "number of engine actors", "actors", resumable=True, gt=0)
    engine_cpus: float = option(1.0, "Ray CPUs per engine actor", "logical CPUs", resumable=True, gt=0)
    engine_gpus: float = option(0.0, "Ray GPUs per engine actor", "GPUs", resumable=True, ge=0)
    engine_resources: dict[str, Annotated[float, Field(gt=0)]] = option(
        {},
        "extra Ray resources per engine actor, NAME=AMOUNT (repeatable), e.g. TPU=4",
        "units",
        resumable=True,
        expect="a finite AMOUNT > 0 in each NAME=AMOUNT",
    )
    # Where engines come from.
    engine_pex: str | None = option(
        None,
        f"engine PEX; default: build it with `./pants package {ENGINE_TARGET}` (the GPU or CPU engine "
        "where the backend needs it) when run from the source tree, else "
        f"${ENGINE_PEX_ENV} or {pex_path(ENGINE_TARGET)}",
        resumable=True,
    )
    build_engine: bool = option(
        True,
        "build the engine PEX with Pants when run from the source tree and --engine-pex is not given",
        resumable=True,
    )
    engine_python: str | None = option(
        None,
        "CPython 3.12 that runs the engine PEX on every node; default: "
        "$HERMETIC_ES_ENGINE_PYTHON or the driver's base interpreter",
        resumable=True,
    )
    pex_root: str | None = option(
        None, f"PEX_ROOT on every node; default: ${PEX_ROOT_ENV} or {DEFAULT_PEX_ROOT}", resumable=True
    )
    engine_start_timeout: float = option(
        120.0,
        "seconds for engine actors to start once the PEX is extracted on the node",
        "s",
        resumable=True,
        gt=0,
    )
    address: str | None = option(
        None,
        "Ray cluster to join (e.g. auto or ray://host:10001); default: start a local cluster",
        resumable=True,
    )

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as e:
            raise config_error(e, type(self).model_fields) from None

    @model_validator(mode="after")
    def _check_model_and_engines(self) -> EngineOptions:
        """The model against the engines, and the backend against the devices each engine gets."""
        if self.backend == "cpu" and self.engine_gpus:
            raise ConfigError("--engine-gpus: must be 0 with --backend cpu (use --backend cuda)")
        if self.backend != "vllm" and self.tensor_parallel_size != 1:
            raise ConfigError("--tensor-parallel-size: only with --backend vllm")
        if self.model is not None and self.model_dir is not None:
            raise ConfigError("--model: give either --model or --model-dir, not both")
        if self.model is not None and (self.engine_gpus or self.engine_resources.get("TPU", 0)):
            raise ConfigError(
                f"--model: {self.model} ships in the CPU engine only; on GPUs and TPUs import it first "
                "(./pants run src/engine:import-gguf -- --out DIR) and pass --model-dir DIR"
            )
        if self.backend == "vllm":
            tpu = self.engine_resources.get("TPU", 0)
            if self.engine_gpus and tpu:
                raise ConfigError(
                    "--backend vllm: give each engine GPUs (--engine-gpus N), TPU chips "
                    "(--engine-resources TPU=N) or neither (CPUs), not both"
                )
            if tpu and self.restore_mode == "device":
                raise ConfigError("--restore-mode: device is for GPUs; on TPUs use master or subtract")
            devices = self.engine_gpus or tpu
            option = "--engine-gpus" if self.engine_gpus else "--engine-resources TPU"
            if not devices and self.tensor_parallel_size != 1:
                raise ConfigError("--tensor-parallel-size: vLLM engines on CPUs run unsharded (1)")
            if devices and devices < self.tensor_parallel_size:
                raise ConfigError(
                    f"--tensor-parallel-size: {self.tensor_parallel_size} devices per engine, but each "
                    f"engine gets {devices} ({option})"
                )
        if self.emulate_tpu and not self.vllm_on_cpu:
            raise ConfigError(
                "--emulate-tpu: emulates a TPU with vLLM on CPUs (--backend vllm, no --engine-gpus, no TPU "
                "in --engine-resources); on a TPU VM run without it"
            )
        if self.emulate_tpu and self.model is not None:
            raise ConfigError("--emulate-tpu: --model ships in the CPU engine only; pass --model-dir")
        if self.emulate_tpu and self.restore_mode == "device":
            raise ConfigError("--restore-mode: device is for GPUs; an emulated TPU uses master or subtract")
        if self.backend == "cuda" and not self.engine_gpus:
            raise ConfigError("--engine-gpus: must be > 0 with --backend cuda (each engine needs a GPU)")
        return self

    @property
    def vllm_on_cpu(self) -> bool:
        """vLLM engines on CPUs (no GPUs, no TPU chips per engine)."""
        return self.backend == "vllm" and not self.engine_gpus and not self.engine_resources.get("TPU", 0)

    @property
    def device_type(self) -> str:
        """The kind of device the engines compute on, which decides the noise a seed gives: "cpu", "cuda"
        or "tpu" (vLLM with TPU chips per engine)."""
        if self.backend == "cuda" or (self.backend == "vllm" and self.engine_gpus):
            return "cuda"
        if self.backend == "vllm" and self.engine_resources.get("TPU", 0):
            return "tpu"
        return "cpu"

    @property
    def engine_target(self) -> str:
        """The Pants target of the engine PEX this run needs: src/engine:engine-gpu for vLLM on GPUs,
        src/engine:engine-cpu for vLLM on CPUs or a packaged `--model`, else src/engine:engine
        (transformers, vLLM on TPU, and vLLM emulating a TPU)."""
        if self.backend == "vllm" and self.engine_gpus:
            return GPU_ENGINE_TARGET
        if (self.vllm_on_cpu and not self.emulate_tpu) or self.model is not None:
            return CPU_ENGINE_TARGET
        return ENGINE_TARGET
