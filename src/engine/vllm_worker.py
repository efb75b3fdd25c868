"""ES weight operations inside vLLM's workers: the classes named by vLLM's `worker_extension_cls`.

vLLM mixes the named class into its worker class as an extra base (`WorkerWrapperBase.init_worker`,
which asserts that none of the extension's attribute names already exists on the worker), and
`LLM.collective_rpc("es_perturb", args=...)` then calls the method on every worker: one per
tensor-parallel rank. So `self` is the worker, and the weights are operated on where they live, in place,
without ever leaving the device (vLLM's documented pattern for RL weight updates).

- `TorchWorkerExtension`, for vLLM on CUDA GPUs and CPUs: the worker's `model_runner.get_model()` is a torch
  module holding this rank's shard of every weight (vLLM's fused layout: `qkv_proj`, `gate_up_proj`). The
  ES-core `engine.torch_weights.TorchWeights` does the work, with the noise drawn per checkpoint tensor and
  placed by vLLM's own loader (`engine.vllm_layout`): every rank applies the same perturbation of the same
  Hugging Face model, at any tensor-parallel degree, and the master moves in the checkpoint's layout.
- `JaxWorkerExtension`, for tpu-inference on TPU: the worker's `model_runner.state` is the pytree of JAX
  arrays whose leaves (`model_runner.state_leaves`) the compiled model function takes as input. The
  noise is drawn per leaf; the master moves to and from checkpoints in the checkpoint's layout
  (`engine.jax_layout`).
  `engine.jax_weights.JaxWeights` replaces its leaves by same-shape, same-dtype, same-sharding arrays
  (donating the old buffers, so the device holds one set of parameters), and the new pytree is put back
  on the runner. Compiled functions are therefore reused; the extension records the compilation count
  after the first perturbation and raises if a later perturbation compiles again.

Arguments and results are scalars, strings and lists only, and tensors move through files: vLLM's
engine-core transport (msgpack) decodes a tensor inside a result as a plain list unless insecure
serialization is turned on (`tests/engine_resolve/test_vllm_worker.py` passes every call through it).

Every attribute starts with `es_` / `_es_` so that it cannot collide with the workers' own
(`tests/engine_resolve/test_vllm_contract.py` checks both extensions against the locked vLLM and
tpu-inference).

Importing this module changes nothing. On vLLM's CPU platform the extension is
`engine.vllm_cpu_worker.CpuTorchWorkerExtension`, whose module installs the weight-reading linear layers
when vLLM imports it in the worker process, before the model loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shared.run_layout import MASTER


class RecompilationError(RuntimeError):
    """A perturbation compiled the weight operations again (the compiled-function cache grew)."""


class TorchWorkerExtension:
    """ES operations on a vLLM worker's torch model, CUDA or CPU (mixed into vLLM's worker; `self` is the
    worker)."""

    def _es_model(self) -> Any:
        return self.model_runner.get_model()

    def es_setup(self, restore_mode: str = "master", rank: int = 0, member_slots: int = 0) -> dict[str, Any]:
        """Wraps this rank's parameters in `TorchWeights`, with the noise of the checkpoint's tensors
        (`engine.vllm_layout.HFLayout` over the model directory vLLM loaded). Call once after the `LLM`
        is built.

        With `rank` > 0 members are low-rank (`engine.lowrank.LowRankWeights` over the same layout:
        merged into the weights one at a time, and the update); with `member_slots` > 0 too, the `LLM`
        was built with `engine.vllm_lora.llm_kwargs(member_slots, rank)` and members also run as LoRA
        adapters (`engine.vllm_lora.MemberAdapters`, `es_set_members`).

        Returns:
            {"layout": "checkpoint" (the master's), "rank": int, "world_size": int (tensor-parallel),
            "parameters": int (this rank's), "fingerprint": str}.

        Raises:
            engine.vllm_layout.LayoutError: the checkpoint does not map onto vLLM's parameters, or is
                quantized.
        """
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        from engine.torch_weights import TorchWeights
        from engine.vllm_layout import HFLayout, LayoutError, checkpoint_shapes

        quantization = getattr(self.model_config, "quantization", None)
        if quantization:
            raise LayoutError(
                f"{self.model_config.model}: quantized weights ({quantization}) cannot be perturbed in "
                "place; ES needs an unquantized checkpoint (bfloat16, float16 or float32)"
            )
        model = self._es_model()
        empty = [name for name, p in model.named_parameters() if p.numel() == 0]
        if empty:
            raise LayoutError(
                f"{self.model_config.model}: parameter {empty[0]} is empty after loading ({len(empty)} in "
                "all): the platform moved its weights elsewhere, so ES cannot perturb them in place"
            )
        self._es_repack = False
        if _is_cpu():
            from engine.vllm_cpu import check_linear_reads_weights, installed_mode

            check_linear_reads_weights(model)
            self._es_repack = installed_mode() == "repack"
        self._es_layout = HFLayout(model, checkpoint_shapes(self.model_config.model))
        if rank > 0:
            from engine.lowrank import LowRankWeights

            self._es_weights = LowRankWeights(
                model,
                restore_mode=restore_mode,
                rank=rank,
                noise_slices=self._es_layout.slices,
                shapes=self._es_layout.shapes,
            )
        else:
            self._es_weights = TorchWeights(
                model,
                restore_mode=restore_mode,
                noise=self._es_layout.noise,
                noise_slices=self._es_layout.slices,
            )
        self._es_adapters = None
        if member_slots > 0:
            from engine.vllm_lora import MemberAdapters

            self._es_adapters = MemberAdapters(
                self.model_runner, model, self._es_layout.slices, self._es_layout.shapes, member_slots, rank
            )
        return {
            "layout": "checkpoint",
            "cpu_linear": _cpu_linear_mode(),
            "rank": get_tensor_model_parallel_rank(),
            "world_size": get_tensor_model_parallel_world_size(),
            "parameters": sum(p.numel() for p in self._es_weights.params.values()),
            "fingerprint": self._es_weights.fingerprint(),
        }

    def _es_changed(self) -> None:
        """After a weight change: re-packs the CPU kernels' copies in "repack" mode."""
        if self._es_repack:
            from engine.vllm_cpu import repack

            repack(self._es_model())

    def es_perturb(self, seed: int, sigma: float, sign: int = 1) -> None:
        """`TorchWeights.perturb` on this rank's parameters."""
        self._es_weights.perturb(seed, sigma, sign)
        self._es_changed()

    def es_set_members(self, members: list[tuple[int, int]], sigma: float) -> None:
        """Writes low-rank members ((seed, sign) pairs, at `sigma`) into the LoRA slots 0.. in order
        (`engine.vllm_lora.MemberAdapters.set_members`).

        Raises:
            RuntimeError: the engine has no member slots. ValueError: more members than slots.
        """
        if self._es_adapters is None:
            raise RuntimeError("this engine has no LoRA member slots (VLLMOptions.member_slots is 0)")
        self._es_adapters.set_members([(int(seed), int(sign)) for seed, sign in members], sigma)

    def es_restore(self) -> None:
        """`TorchWeights.restore` on this rank's parameters."""
        self._es_weights.restore()
        self._es_changed()

    def es_update(self, pairs: list[tuple[int, float]]) -> None:
        """`TorchWeights.apply_update`."""
        self._es_weights.apply_update(pairs)
        self._es_changed()

    def es_apply_update(self, pairs: list[tuple[int, float]]) -> str:
        """`es_update`; returns this rank's fingerprint."""
        self.es_update(pairs)
        return self._es_weights.fingerprint()

    def es_fingerprint(self) -> str:
        """SHA-256 of this rank's parameters (`TorchWeights.fingerprint`)."""
        return self._es_weights.fingerprint()

    def es_master_part(self, directory: str) -> str:
        """Writes this rank's part of the fp32 master, in the checkpoint's layout
        (`HFLayout.to_checkpoint`), to `directory`/rank{rank}.safetensors: per checkpoint tensor its
        float32 values and, under `name + engine.vllm_layout.HELD`, the bool mask of the elements this rank
        holds. Returns
        the path (a file, not tensors: vLLM's engine-core transport decodes tensors in results as lists)."""
        from safetensors.torch import save_file
        from vllm.distributed import get_tensor_model_parallel_rank

        from engine.vllm_layout import HELD

        path = Path(directory) / f"rank{get_tensor_model_parallel_rank()}.safetensors"
        tensors = {}
        for name, (values, held) in self._es_layout.to_checkpoint(self._es_weights.master).items():
            tensors[name], tensors[name + HELD] = values, held
        save_file(tensors, str(path))
        return str(path)

    def es_load_master(self, path: str) -> str:
        """Replaces the weights by the full fp32 master in the checkpoint's layout in the safetensors file
        `path` (checkpoint name -> tensor; e.g. a checkpoint's master.safetensors), keeping this rank's
        shard; returns this rank's fingerprint.

        Raises:
            engine.vllm_layout.LayoutError: a tensor is missing or has another shape.
        """
        from safetensors.torch import load_file

        master = {name: t.clone() for name, t in self._es_weights.master.items()}
        self._es_layout.from_checkpoint(load_file(path), master)
        self._es_weights.load_master(master)
        self._es_changed()
        return self._es_weights.fingerprint()


class JaxWorkerExtension:
    """ES operations on a tpu-inference worker's JAX weights (mixed into `TPUWorker`; `self` is the
    worker, `self.model_runner.state` the weights pytree)."""

    def _es_publish(self) -> None:
        """Puts the current arrays back on the runner: rebinds `state` and calls the runner's
        `refresh_state_leaves()`, which tpu-inference requires of any code that rebinds `state` (its
        compiled `model_fn` reads `state_leaves`, otherwise it keeps running on the previous arrays)."""
        runner = self.model_runner
        runner.state = self._es_weights.params
        runner.refresh_state_leaves()

    def es_setup(self, restore_mode: str = "master", rank: int = 0, member_slots: int = 0) -> dict[str, Any]:
        """Wraps the runner's weights in `JaxWeights`, and maps them onto the checkpoint vLLM loaded
        (`engine.jax_layout.JaxLayout`, checked bit for bit). Call once after the `LLM` is built.
        Full-rank members only (`rank` and `member_slots` must be 0).

        Returns:
            {"layout": "checkpoint" (the master's, as `es_master` writes it), "sharded": False (one
            worker holds every array, whatever the mesh), "devices": int (the devices the weights are
            sharded over), "leaves": int, "parameters": int, "fingerprint": str}.

        Raises:
            engine.vllm_layout.LayoutError: the runner's weights do not map onto the checkpoint (named).
            ValueError: low-rank members (rank > 0) or member slots, which JAX workers do not run.
        """
        if rank or member_slots:
            raise ValueError(
                "perturbation lowrank: the TPU engine's JAX workers run full-rank members only; vLLM's CUDA "
                "and CPU engines and the transformers backend run low-rank ones"
            )
        from engine.jax_layout import JaxLayout  # pants: no-infer-dep (TPU engine only)
        from engine.jax_weights import JaxWeights  # pants: no-infer-dep (TPU engine only; no JAX on GPUs)

        self._es_weights = JaxWeights(self.model_runner.state, restore_mode=restore_mode)
        self._es_layout = JaxLayout(
            self._es_weights.names, [m.shape for m in self._es_weights.master], self.model_config.model
        )
        self._es_layout.check(self._es_weights.master, self._es_weights.dtypes)
        self._es_compiled: int | None = None
        self._es_publish()
        return {
            "layout": "checkpoint",
            "sharded": False,
            "devices": len({d for leaf in self._es_weights.leaves for d in leaf.sharding.device_set}),
            "leaves": len(self._es_weights.master),
            "parameters": int(sum(m.size for m in self._es_weights.master)),
            "fingerprint": self._es_weights.fingerprint(),
        }

    def es_perturb(self, seed: int, sigma: float, sign: int = 1) -> None:
        """`JaxWeights.perturb`, then publishes the new arrays.

        Raises:
            RecompilationError: this perturbation compiled the operation again (after the first one).
        """
        self._es_weights.perturb(seed, sigma, sign)
        self._es_publish()
        compiled = self._es_weights.compilations()
        if self._es_compiled is None:
            self._es_compiled = compiled
        elif compiled > self._es_compiled:
            raise RecompilationError(
                f"perturbation compiled again ({self._es_compiled} -> {compiled} compiled versions): the "
                "weights' shapes, dtypes or shardings changed since the first perturbation"
            )

    def es_restore(self) -> None:
        """`JaxWeights.restore`, then publishes the arrays."""
        self._es_weights.restore()
        self._es_publish()

    def es_update(self, pairs: list[tuple[int, float]]) -> None:
        """`JaxWeights.apply_update`, publishes the arrays."""
        self._es_weights.apply_update(pairs)
        self._es_publish()

    def es_apply_update(self, pairs: list[tuple[int, float]]) -> str:
        """`es_update`; returns the fingerprint."""
        self.es_update(pairs)
        return self._es_weights.fingerprint()

    def es_fingerprint(self) -> str:
        """SHA-256 of the weights (`JaxWeights.fingerprint`)."""
        return self._es_weights.fingerprint()

    def es_master(self, directory: str) -> str:
        """Writes the fp32 master in the checkpoint's layout (`JaxLayout.to_checkpoint`: Hugging Face
        names and shapes) to `directory`/master.safetensors; returns the path (a file, as for torch
        workers)."""
        from safetensors.numpy import save_file

        path = Path(directory) / MASTER
        save_file(self._es_layout.to_checkpoint(self._es_weights.master), str(path))
        return str(path)

    def es_load_master(self, path: str) -> str:
        """Replaces the weights by the fp32 master in the checkpoint's layout in the safetensors file
        `path` (e.g. a checkpoint's master.safetensors), publishes the arrays; returns the fingerprint.

        Raises:
            engine.vllm_layout.LayoutError: a tensor is missing or has another shape (named).
        """
        from safetensors.numpy import load_file

        leaves = self._es_layout.from_checkpoint(load_file(path))
        self._es_weights.load_master(dict(zip(self._es_weights.names, leaves, strict=True)))
        self._es_publish()
        return self._es_weights.fingerprint()

    def es_compilations(self) -> int:
        """Compiled versions of the perturbation (`JaxWeights.compilations`); stays 1 after warm-up."""
        return self._es_weights.compilations()

    def es_device_memory(self) -> dict[str, int]:
        """This process's live JAX arrays (`jax.live_arrays()`: weights, KV cache, inputs): {"arrays":
        count, "bytes": total bytes}. Equal before and after a perturbation, restore or update when
        the old weights' buffers were donated or freed, i.e. one parameter set stays resident."""
        import jax  # pants: no-infer-dep (TPU engine only)

        arrays = [a for a in jax.live_arrays() if not a.is_deleted()]
        return {"arrays": len(arrays), "bytes": int(sum(a.nbytes for a in arrays))}


def _is_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _cpu_linear_mode() -> str | None:
    """The CPU linear mode installed in this process (None off the CPU platform)."""
    from engine.vllm_cpu import installed_mode

    return installed_mode()
