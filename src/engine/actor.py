"""The engine object that `shared.engine_host.EngineHost` hosts inside each engine actor.

It runs in the engine PEX's environment (vLLM, JAX, libtpu, torch, transformers). The driver reaches it
only through `EngineHost.call(method, ...)`, by method name, sending seeds, scalars and
`shared.countdown.CountdownProblem` records, and receiving rewards and a few sample completions.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from shared.countdown import CountdownProblem, reward

# Modules whose presence and version the engine reports (module name, not distribution name).
ENGINE_MODULES = ("ray", "jax", "jaxlib", "vllm", "tpu_inference", "torch", "transformers", "numpy")


@contextlib.contextmanager
def _atomic_dir(out: Path):
    """Yields a temporary sibling of `out` to fill; on success it replaces `out` (an existing `out` is
    moved aside first and deleted after), on an exception it is removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _quiet_transformers() -> None:
    """Turns off transformers' progress bars (weights loading/saving), which Ray would forward to the
    driver's terminal as noise between its own progress lines."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


class EngineActor:
    """One rollout engine: a model, its in-place ES weight operations, and Countdown scoring.

    Args:
        engine_id: index of this engine in the pool (0-based), used in logs and reports.
    """

    def __init__(self, engine_id: int = 0) -> None:
        self.engine_id = engine_id
        self.backend = None
        self.weights = None

    def module_versions(self, modules: tuple[str, ...] = ENGINE_MODULES) -> dict[str, str | None]:
        """Imports each module and returns module -> `__version__` as a plain str (None where it has none).

        Raises:
            ImportError: a module is missing, i.e. the engine PEX is not the engine resolve.
        """
        versions = {}
        for name in modules:
            module = importlib.import_module(name)
            version = getattr(module, "__version__", None)
            # str(): torch's __version__ is a str subclass from torch, which the driver cannot unpickle.
            versions[name] = None if version is None else str(version)
        return versions

    def ping(self) -> dict[str, Any]:
        """Returns {"engine_id": int}; a cheap liveness probe."""
        return {"engine_id": self.engine_id}

    def make_tiny_model(self, out_dir: str, seed: int = 0, warm_start_steps: int = 0) -> str:
        """Creates the tiny model (`engine.tiny_model.make_tiny_model`) at `out_dir` unless it already
        holds one; returns the path. Written to a temporary sibling and renamed, so a crash leaves none."""
        from engine.tiny_model import make_tiny_model

        _quiet_transformers()
        out = Path(out_dir)
        if not (out / "config.json").exists():
            with _atomic_dir(out) as tmp:
                make_tiny_model(tmp, seed=seed, warm_start_steps=warm_start_steps)
        return str(out)

    def import_model(self, name: str, out_dir: str, dtype: str = "bfloat16") -> str:
        """Imports a packaged pretrained model (`engine.gguf_import.MODELS`, e.g. "smollm2-135m-instruct")
        as a Hugging Face directory at `out_dir` unless it already holds one; returns the path.

        Raises:
            KeyError: unknown name. FileNotFoundError: this engine environment does not ship the model
            (only the engine-cpu PEX does).
        """
        from engine.gguf_import import import_gguf, packaged_gguf

        _quiet_transformers()
        return str(import_gguf(packaged_gguf(name), out_dir, dtype=dtype))

    def load_model(
        self,
        model_dir: str,
        dtype: str = "float32",
        device: str = "cpu",
        restore_mode: str = "master",
        master_path: str | None = None,
        deterministic: bool = False,
        backend: str = "transformers",
        vllm: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Loads the model with the transformers backend on `device` ("cpu", "cuda"), or with vLLM.

        Args:
            restore_mode: `engine.torch_weights.RESTORE_MODES`.
            deterministic: on a GPU, turn on deterministic kernels for this process first
                (`engine.hf_backend.use_deterministic_kernels`; with vLLM, deterministic cuBLAS); needed
                for reproducible GPU rollouts. CPU kernels are left as they are (already reproducible: the
                resume and fault tests).
            master_path: a checkpoint's `master.safetensors` (fp32 weights, written when `dtype` is not
                float32, and always by vLLM on TPUs); loaded over the model's weights so that a resumed
                run continues bit-exactly.
            backend: "transformers" or "vllm" (`engine.vllm_backend.VLLMBackend`: the device is the one
                vLLM's platform finds, GPUs or TPU chips; `device` is ignored).
            vllm: further `VLLMBackend` arguments (tensor_parallel_size, gpu_memory_utilization,
                max_model_len, ...).

        Returns:
            {"fingerprint": str, "parameters": int (with vLLM: summed over tensor-parallel ranks)}.

        Raises:
            OSError: the directory lacks model or tokenizer files. ValueError: the master does not match,
            or an unknown backend.
        """
        _quiet_transformers()
        if self._vllm:
            self.backend.close()  # one vLLM engine per actor: free the previous one's processes first
        self.backend = self.weights = None
        if backend == "vllm":
            from engine.vllm_backend import VLLMBackend

            self.backend = VLLMBackend(
                model_dir, dtype=dtype, restore_mode=restore_mode, deterministic=deterministic, **(vllm or {})
            )
            self.weights = self.backend
            if master_path:
                self.backend.load_master_file(master_path)
            parameters = sum(worker["parameters"] for worker in self.backend.workers)
            return {"fingerprint": self.backend.fingerprint(), "parameters": parameters}
        if backend != "transformers":
            raise ValueError(f"backend must be 'transformers' or 'vllm', got {backend!r}")
        from engine.hf_backend import HFBackend, use_deterministic_kernels
        from engine.torch_weights import TorchWeights

        if deterministic and device != "cpu":
            use_deterministic_kernels()
        self.backend = HFBackend(model_dir, dtype=dtype, device=device)
        self.weights = TorchWeights(self.backend.model, restore_mode=restore_mode)
        if master_path:
            self.weights.load_master(_read_master(master_path))
        parameters = sum(p.numel() for p in self.weights.params.values())
        return {"fingerprint": self.weights.fingerprint(), "parameters": parameters}

    @property
    def _vllm(self) -> bool:
        from engine.hf_backend import HFBackend

        return self.backend is not None and not isinstance(self.backend, HFBackend)

    def _require_model(self) -> None:
        if self.backend is None or self.weights is None:
            raise RuntimeError(f"engine {self.engine_id}: no model loaded; call load_model first")

    def evaluate(
        self,
        problems: list[CountdownProblem],
        max_new_tokens: int,
        seed: int | None = None,
        sign: int = 1,
        sigma: float = 0.0,
        batch_size: int = 16,
        num_samples: int = 2,
    ) -> dict[str, Any]:
        """Scores the model on `problems`, perturbed by member (seed, sign, sigma) if `seed` is given.

        Perturbs in place, generates greedily, scores each completion with the Countdown reward, and
        restores the weights (also when generation fails).

        Returns:
            {"rewards": [float] per problem, "answers": [float], "formats": [float], "tokens": int
            (generated), "samples": [{"id", "completion", "reward"}] (first `num_samples`),
            "seconds": {"perturb", "generate", "restore"}}.
        """
        self._require_model()
        times = {"perturb": 0.0, "generate": 0.0, "restore": 0.0}
        start = time.perf_counter()
        if seed is not None:
            self.weights.perturb(seed, sigma, sign)
        times["perturb"] = time.perf_counter() - start
        try:
            start = time.perf_counter()
            completions = self.backend.generate([p.prompt for p in problems], max_new_tokens, batch_size)
            times["generate"] = time.perf_counter() - start
        finally:
            start = time.perf_counter()
            self.weights.restore()
            times["restore"] = time.perf_counter() - start
        scored = [reward(c.text, p.numbers, p.target) for p, c in zip(problems, completions, strict=True)]
        return {
            "rewards": [s.total for s in scored],
            "answers": [s.answer for s in scored],
            "formats": [s.format for s in scored],
            "tokens": sum(c.num_tokens for c in completions),
            "samples": [
                {"id": p.id, "completion": c.text, "reward": s.total}
                for p, c, s in list(zip(problems, completions, scored, strict=True))[:num_samples]
            ],
            "seconds": times,
        }

    def apply_update(self, pairs: list[tuple[int, float]]) -> str:
        """Applies an ES update ((seed, coefficient) pairs); returns the new weights' fingerprint."""
        self._require_model()
        self.weights.apply_update(pairs)
        return self.weights.fingerprint()

    def fingerprint(self) -> str:
        """SHA-256 of the current weights (see `TorchWeights.fingerprint`)."""
        self._require_model()
        return self.weights.fingerprint()

    def export_master(self) -> dict[str, Any]:
        """The fp32 master weights, name -> float32 numpy array (to resync another engine of the same
        backend): transformers parameter names, or with vLLM `VLLMBackend.master()` names."""
        self._require_model()
        master = self.backend.master() if self._vllm else self.weights.master
        return {name: t.float().numpy().copy() for name, t in master.items()}

    def import_master(self, master: dict[str, Any]) -> str:
        """Replaces the weights with `export_master()` output of another engine; returns the fingerprint.

        Raises:
            ValueError: the master does not match this model (names or shapes).
        """
        self._require_model()
        import torch

        # torch.tensor copies: arrays from Ray's object store are read-only.
        tensors = {name: torch.tensor(array) for name, array in master.items()}
        if self._vllm:
            return self.backend.load_master(tensors)
        self.weights.load_master(tensors)
        return self.weights.fingerprint()

    def save_checkpoint(self, checkpoint_dir: str) -> dict[str, Any]:
        """Writes the model into `checkpoint_dir`/model (a Hugging Face directory, safetensors) and, when
        the weights are not float32, the fp32 master into `checkpoint_dir`/master.safetensors.

        With vLLM on GPUs the model is written from the master in the checkpoint's layout (the ranks'
        shards joined), so it loads in transformers and vLLM alike. On TPUs the master is in
        tpu-inference's layout: `model` is then a copy of the loaded model directory and the trained
        weights are in master.safetensors (leaf names), which `load_model(master_path=...)` reads.

        Returns:
            {"model": path, "master": path or None, "fingerprint": str}.
        """
        self._require_model()
        from safetensors.torch import save_file

        model_out, master_out = Path(checkpoint_dir) / "model", Path(checkpoint_dir) / "master.safetensors"
        if not self._vllm:
            model = self.save(str(model_out))
            master = None
            if any(p.dtype != self.weights.master[name].dtype for name, p in self.weights.params.items()):
                master = str(master_out)
                save_file(self.weights.master, master)
            return {"model": model, "master": master, "fingerprint": self.weights.fingerprint()}
        from engine.vllm_backend import write_model_dir

        tensors = self.backend.master()
        with _atomic_dir(model_out) as tmp:
            if not self.backend.checkpoint_layout:
                shutil.copytree(self.backend.model_dir, tmp, dirs_exist_ok=True)
            else:
                write_model_dir(self.backend.model_dir, tensors, self.backend.dtype, tmp)
        master = None
        if not self.backend.checkpoint_layout or self.backend.dtype != "float32":
            master = str(master_out)
            save_file(tensors, master)
        return {"model": str(model_out), "master": master, "fingerprint": self.backend.fingerprint()}

    def save(self, out_dir: str) -> str:
        """Saves model (safetensors) and tokenizer as a Hugging Face directory, atomically (written to a
        temporary sibling, then renamed over `out_dir`). Returns out_dir. Transformers backend only
        (vLLM: `save_checkpoint`)."""
        self._require_model()
        if self._vllm:
            raise RuntimeError("save() is for the transformers backend; with vLLM use save_checkpoint()")
        out = Path(out_dir)
        with _atomic_dir(out) as tmp:
            self.backend.model.save_pretrained(tmp, safe_serialization=True)
            self.backend.tokenizer.save_pretrained(tmp)
        return str(out)


def _read_master(path: str) -> dict[str, Any]:
    """A `master.safetensors`: name -> float32 CPU tensor."""
    from safetensors.torch import load_file

    return load_file(path)
