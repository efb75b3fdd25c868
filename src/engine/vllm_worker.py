"""ES weight operations inside vLLM's workers: the classes named by vLLM's `worker_extension_cls`.

vLLM mixes the named class into its worker class as an extra base (`WorkerWrapperBase.init_worker`,
which asserts that none of the extension's attribute names already exists on the worker), and
`LLM.collective_rpc("es_perturb", args=...)` then calls the method on every worker: one per
tensor-parallel rank. So `self` is the worker, and the weights are operated on where they live, in place,
without ever leaving the device (vLLM's documented pattern for RL weight updates).

- `TorchWorkerExtension`, for CUDA vLLM: the worker's `model_runner.get_model()` is a torch module holding
  this rank's shard of every weight (vLLM's fused layout: `qkv_proj`, `gate_up_proj`). The ES-core
  `engine.torch_weights.TorchWeights` does the work, with a per-rank noise key prefix so that the shards of
  one weight get independent noise.
- `JaxWorkerExtension`, for tpu-inference on TPU: the worker's `model_runner.state` is the pytree of JAX
  arrays whose leaves (`model_runner.state_leaves`) the compiled model function takes as input.
  `engine.jax_weights.JaxWeights` replaces its leaves by same-shape, same-dtype, same-sharding arrays
  (donating the old buffers, so the device holds one set of parameters), and the new pytree is put back
  on the runner. Compiled functions are therefore reused; the extension records the compilation count
  after the first perturbation and raises if a later perturbation compiles again.

Every attribute starts with `es_` / `_es_` so that it cannot collide with the workers' own
(`tests/test_vllm_contract.py` checks both extensions against the locked vLLM and tpu-inference).
"""

from __future__ import annotations

from typing import Any


class RecompilationError(RuntimeError):
    """A perturbation compiled the weight operations again (the compiled-function cache grew)."""


class TorchWorkerExtension:
    """ES operations on a CUDA vLLM worker's torch model (mixed into vLLM's worker; `self` is the worker)."""

    def _es_model(self) -> Any:
        return self.model_runner.get_model()

    def es_setup(self, restore_mode: str = "master") -> dict[str, Any]:
        """Wraps this rank's parameters in `TorchWeights`. Call once after the `LLM` is built.

        Returns:
            {"rank": int, "world_size": int (tensor-parallel), "parameters": int (this rank's),
            "fingerprint": str}.
        """
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        from engine.torch_weights import TorchWeights

        rank, world = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
        prefix = f"tp{rank}of{world}/" if world > 1 else ""
        self._es_weights = TorchWeights(self._es_model(), restore_mode=restore_mode, noise_key_prefix=prefix)
        parameters = sum(p.numel() for p in self._es_weights.params.values())
        return {
            "rank": rank,
            "world_size": world,
            "parameters": parameters,
            "fingerprint": self._es_weights.fingerprint(),
        }

    def es_perturb(self, seed: int, sigma: float, sign: int = 1) -> None:
        """`TorchWeights.perturb` on this rank's parameters."""
        self._es_weights.perturb(seed, sigma, sign)

    def es_restore(self) -> None:
        """`TorchWeights.restore` on this rank's parameters."""
        self._es_weights.restore()

    def es_apply_update(self, pairs: list[tuple[int, float]]) -> str:
        """`TorchWeights.apply_update`; returns this rank's fingerprint."""
        self._es_weights.apply_update(pairs)
        return self._es_weights.fingerprint()

    def es_fingerprint(self) -> str:
        """SHA-256 of this rank's parameters (`TorchWeights.fingerprint`)."""
        return self._es_weights.fingerprint()

    def es_save_shard(self, path: str) -> str:
        """Writes this rank's parameters (vLLM's layout and shard shapes) to `path` (safetensors); returns
        it. Parameters that share storage (tied embeddings) are written once, under their first name."""
        from safetensors.torch import save_file

        tensors, seen = {}, set()
        for name, p in self._es_weights.params.items():
            if p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                tensors[name] = p.detach().cpu().contiguous()
        save_file(tensors, path)
        return path


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

    def es_setup(self, restore_mode: str = "master") -> dict[str, Any]:
        """Wraps the runner's weights in `JaxWeights`. Call once after the `LLM` is built.

        Returns:
            {"leaves": int, "parameters": int, "fingerprint": str}.
        """
        from engine.jax_weights import JaxWeights  # pants: no-infer-dep (TPU engine only; no JAX on GPUs)

        self._es_weights = JaxWeights(self.model_runner.state, restore_mode=restore_mode)
        self._es_compiled: int | None = None
        self._es_publish()
        return {
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

    def es_apply_update(self, pairs: list[tuple[int, float]]) -> str:
        """`JaxWeights.apply_update`, publishes the arrays; returns the fingerprint."""
        self._es_weights.apply_update(pairs)
        self._es_publish()
        return self._es_weights.fingerprint()

    def es_fingerprint(self) -> str:
        """SHA-256 of the weights (`JaxWeights.fingerprint`)."""
        return self._es_weights.fingerprint()

    def es_compilations(self) -> int:
        """Compiled versions of the perturbation (`JaxWeights.compilations`); stays 1 after warm-up."""
        return self._es_weights.compilations()
