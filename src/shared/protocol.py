"""The driver-engine contract: what every engine does (`Engine`) and the typed messages between them.

The driver starts engine actors of `shared.engine_host.EngineHost`, which hosts an `Engine` implementation
(`engine.actor.EngineActor`) inside the engine PEX, and calls its methods through Ray. Requests and
results are the frozen dataclasses below: Ray pickles them by reference (`shared.protocol.X`), and the
driver's and the engine's environments each import this same module, so a field added here reaches both
sides at once. Values that must agree on both sides (restore modes, backends, dtypes, packaged models, the
versions an engine reports) are defined here and nowhere else.

Units: seconds for durations, tokens for lengths, GiB for memory. Weights' fingerprints are SHA-256 hex
digests (64 characters) of the weights' bytes.
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass, field
from typing import Any, Protocol

# How `Weights.restore` undoes a perturbation (engine.torch_weights): "master" copies back from an fp32
# host copy (exact), "subtract" subtracts the noise again, "device" keeps the copy in device memory.
RESTORE_MODES = ("master", "subtract", "device")
# The engines' rollout backends: transformers (torch, CPU or CUDA) and vLLM (GPU, TPU or CPU platform).
ENGINE_BACKENDS = ("transformers", "vllm")
DTYPES = ("float32", "bfloat16", "float16")
# How linear layers of vLLM's CPU platform reach the weights ES perturbs (engine.vllm_cpu).
CPU_LINEAR_MODES = ("read", "repack")
# Pretrained models the CPU engine ships and imports by name (engine.gguf_import.MODELS).
PACKAGED_MODELS = ("smollm2-135m-instruct",)
# Distributions whose versions the engines report (run manifest, doctor): every flavour of vLLM, its
# platform packages and the libraries ES depends on. Distribution names; None where not installed.
REPORTED_DISTRIBUTIONS = (
    "ray",
    "vllm-tpu",
    "vllm",
    "vllm-cpu",
    "tpu-inference",
    "jax",
    "jaxlib",
    "libtpu",
    "torch",
    "transformers",
)
# Modules whose `__version__` the run manifest records from every engine (cheap imports: no TPU probing).
REPORTED_MODULES = ("ray", "torch", "transformers", "numpy", "numba")


# How a member perturbs the weights: "full" (Qiu et al. 2025: every parameter gets i.i.d. N(0, 1) noise
# of its shape) or "lowrank" (Sarkar et al. 2025, EGGROLL: each targeted matrix gets B A^T / sqrt(rank)).
PERTURBATIONS = ("full", "lowrank")
# The weight matrices low-rank members perturb and updates change: the linear layers of attention and MLP
# (EGGROLL's LLM runs and its vLLM port); embeddings, the LM head, norms and biases stay frozen.
LOWRANK_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


@dataclass(frozen=True)
class Perturbation:
    """How members perturb the weights (`PERTURBATIONS`), and for "lowrank" the rank r of each member's
    noise E = B A^T / sqrt(r) (A: in x r, B: out x r, standard normal), applied to the `LOWRANK_TARGETS`
    matrices only (Sarkar et al. 2025, "Evolution Strategies at the Hyperscale", Sec. 3; r = 1 in their
    LLM runs). E has unit-variance entries for any r, so sigma and alpha keep their meaning.

    Raises:
        ValueError: an unknown mode, or rank < 1.
    """

    mode: str = "full"
    rank: int = 1

    def __post_init__(self) -> None:
        _choice("perturbation", self.mode, PERTURBATIONS)
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")

    def record(self) -> dict[str, Any]:
        """What a checkpoint records of it, {"mode", "rank", "targets"} (rank and targets only matter,
        and are only recorded, for "lowrank"); replaying updates under another record is refused."""
        if self.mode == "full":
            return {"mode": "full"}
        return {"mode": self.mode, "rank": self.rank, "targets": list(LOWRANK_TARGETS)}


@dataclass(frozen=True)
class VLLMOptions:
    """Settings of a vLLM engine (`engine.vllm_backend.VLLMBackend`).

    Attributes:
        tensor_parallel_size: workers (GPUs or TPU chips) one engine's model is sharded over.
        gpu_memory_utilization: share (0, 1] of device memory vLLM may take; unused on CPUs.
        max_model_len: prompt + completion tokens per sequence.
        cpu_kv_cache_gib: KV cache of an engine on vLLM's CPU platform, GiB of host RAM.
        cpu_linear: `CPU_LINEAR_MODES` ("read" or "repack"), on vLLM's CPU platform only.
        emulate_tpu: run the TPU engine's own vLLM (vllm-tpu + tpu-inference) on JAX's CPU backend with
            the chip stood in (`engine.tpu_emulation`; tests and development only, never on a TPU); the
            emulated HBM is `cpu_kv_cache_gib`.
        member_slots: LoRA adapter slots for low-rank members scored in one batch
            (`Engine.evaluate_members`; `engine.vllm_lora`): the most members one rollout may carry. 0
            turns LoRA off (members one at a time, merged into the weights).

    Raises:
        ValueError: an unknown cpu_linear, or member_slots < 0.
    """

    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.85
    max_model_len: int = 2048
    cpu_kv_cache_gib: float = 1.0
    cpu_linear: str = "read"
    emulate_tpu: bool = False
    member_slots: int = 0

    def __post_init__(self) -> None:
        _choice("cpu_linear", self.cpu_linear, CPU_LINEAR_MODES)
        if self.member_slots < 0:
            raise ValueError(f"member_slots must be >= 0, got {self.member_slots}")


@dataclass(frozen=True)
class LoadRequest:
    """Which weights an engine loads and how it runs them (`Engine.load_model`).

    Attributes:
        model_dir: a Hugging Face model directory on the engine's node (config, safetensors, tokenizer).
        backend: `ENGINE_BACKENDS`.
        dtype: `DTYPES`; the weights' dtype on the device.
        device: the run's device type ("cpu", "cuda", "tpu"): the torch device of the transformers
            backend; vLLM picks its own platform, and the engine reports this in its machine report.
        restore_mode: `RESTORE_MODES`.
        master_path: a checkpoint's fp32 master (`shared.run_layout.MASTER`) loaded over the model's
            weights, so that a resumed run continues bit-exactly; None when the model is the weights.
        deterministic: deterministic GPU kernels (needed for reproducible GPU rollouts; CPUs always are).
        vllm: settings of the vLLM backend.
        perturbation: how members perturb the weights and updates change them (`Perturbation`).

    Raises:
        ValueError: a field outside its allowed values (named).
    """

    model_dir: str
    backend: str = "transformers"
    dtype: str = "float32"
    device: str = "cpu"
    restore_mode: str = "master"
    master_path: str | None = None
    deterministic: bool = False
    vllm: VLLMOptions = field(default_factory=VLLMOptions)
    perturbation: Perturbation = field(default_factory=Perturbation)

    def __post_init__(self) -> None:
        _choice("backend", self.backend, ENGINE_BACKENDS)
        _choice("dtype", self.dtype, DTYPES)
        _choice("restore_mode", self.restore_mode, RESTORE_MODES)


@dataclass(frozen=True)
class LoadResult:
    """A loaded model: its weights' `fingerprint`, number of ES `parameters` (elements, summed over
    tensor-parallel ranks), and the `machine` that computes on it (`engine.machine.machine_report`: CPU
    model and instruction-set flags, torch's CPU kernel capability, thread counts, device), which decides
    whether two engines compute bit-identical results."""

    fingerprint: str
    parameters: int
    machine: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Member:
    """One perturbation of the population: theta + sign * sigma * eps(seed) (Qiu et al. 2025, Alg. 1).

    Attributes:
        seed: the member seed (`shared.seeds.member_seed`), from which every parameter's noise is drawn.
        sign: +1 or -1 (antithetic pairs share a seed).
        sigma: the noise scale (dimensionless, relative to the weights' units).
    """

    seed: int
    sign: int = 1
    sigma: float = 0.0


@dataclass(frozen=True)
class RolloutRequest:
    """How to score a batch of problems (`Engine.evaluate`).

    Attributes:
        max_new_tokens: tokens generated per problem at most (greedy decoding).
        task: the task whose prompts and reward are used (`shared.tasks.load_task`: "countdown",
            "conciseness" or "package.module:Class").
        chat_template: render each prompt through the model's chat template (one user message and the
            generation prompt) instead of giving the raw text.
        member: the perturbation to score, or None for the unperturbed weights.
        members: the perturbations to score on the same problems in one batch
            (`Engine.evaluate_members`; low-rank members on vLLM, as LoRA adapters); `member` is then None.
        batch_size: prompts per generate call of the transformers backend (vLLM schedules its own).
        num_samples: completions returned as `Sample`s (the first ones).
    """

    max_new_tokens: int
    _: KW_ONLY  # the rest by name: a positional `member` once became `task` and failed only in the engine
    task: str = "countdown"
    chat_template: bool = False
    member: Member | None = None
    members: tuple[Member, ...] = ()
    batch_size: int = 16
    num_samples: int = 2

    def __post_init__(self) -> None:
        if self.members and self.member is not None:
            raise ValueError("a RolloutRequest carries a member or members, not both")


@dataclass(frozen=True)
class Sample:
    """One completion: the problem's id, the generated text and its task reward (total)."""

    id: int | str
    completion: str
    reward: float


@dataclass(frozen=True)
class RolloutSeconds:
    """Wall-clock seconds of one rollout's phases inside the engine: `score` is the task reward of every
    completion."""

    perturb: float = 0.0
    generate: float = 0.0
    restore: float = 0.0
    score: float = 0.0


@dataclass(frozen=True)
class RolloutResult:
    """Scores of one rollout, per problem in request order (`shared.tasks.Task.reward`): `rewards` (the
    totals), `components` (component name -> per-problem values, the task's `components`); `tokens`
    generated in all; the first `samples`; and the phases' `seconds`."""

    rewards: list[float]
    components: dict[str, list[float]]
    tokens: int
    samples: list[Sample]
    seconds: RolloutSeconds


@dataclass(frozen=True)
class CheckpointResult:
    """A checkpoint an engine wrote (`shared.run_layout.CheckpointFiles`): the `model` directory, the
    fp32 `master` file or None when the model holds the exact weights, and the weights' `fingerprint`."""

    model: str
    master: str | None
    fingerprint: str


class Engine(Protocol):
    """What one rollout engine does; `engine.actor.EngineActor` implements it inside the engine PEX and
    `shared.engine_host.EngineHost` exposes it to the driver as Ray actor methods.

    Every weight operation is in place and deterministic: equal requests on equal weights give equal
    results and fingerprints on every engine, which is how the driver keeps engines in sync.
    """

    def ping(self) -> dict[str, int]:
        """{"engine_id": int}: a cheap liveness probe."""

    def module_versions(self, modules: tuple[str, ...] = REPORTED_MODULES) -> dict[str, str | None]:
        """module name -> `__version__` (None where it has none). Raises ImportError for a missing one."""

    def make_tiny_model(self, out_dir: str, seed: int = 0, warm_start_steps: int = 0) -> str:
        """Creates the tiny test model at `out_dir` (on the engine's node) unless it holds one; its path."""

    def import_model(self, name: str, out_dir: str, dtype: str = "bfloat16") -> str:
        """Imports the packaged model `name` (`PACKAGED_MODELS`) at `out_dir` unless it holds one.

        Raises: KeyError (unknown name), FileNotFoundError (this engine environment does not ship it)."""

    def load_model(self, request: LoadRequest) -> LoadResult:
        """Loads weights, replacing (and closing) any model loaded before.

        Raises: OSError (model files missing), ValueError (master or setting does not match)."""

    def evaluate(self, problems: list[Any], request: RolloutRequest) -> RolloutResult:
        """Perturbs by `request.member` (if any), generates greedily, scores with `request.task`'s reward
        and restores the weights exactly (also when generation fails). Raises RuntimeError without a
        model, `shared.tasks.TaskError` for a task this engine PEX does not hold."""

    def evaluate_members(self, problems: list[Any], request: RolloutRequest) -> list[RolloutResult]:
        """Scores each of `request.members` on `problems`, in one batch where the backend can; one result
        per member, in order. Raises as `evaluate`, and ValueError where the backend cannot hold that many
        members at once (`VLLMOptions.member_slots`)."""

    def apply_update(self, pairs: list[tuple[int, float]]) -> str:
        """theta += sum_i coefficient_i * eps(seed_i) over (seed, coefficient) pairs; the new fingerprint."""

    def take_update_seconds(self) -> dict[str, float]:
        """{"update": s, "fingerprint": s}: wall-clock seconds `apply_update` spent updating the weights and
        fingerprinting them since the last call (which resets them)."""

    def fingerprint(self) -> str:
        """The current weights' fingerprint."""

    def export_master(self) -> dict[str, Any]:
        """The fp32 master weights, name -> float32 numpy array, to resync an engine of the same backend."""

    def import_master(self, master: dict[str, Any]) -> str:
        """Replaces the weights by another engine's `export_master()`; the new fingerprint.

        Raises: ValueError (names or shapes differ)."""

    def save_checkpoint(self, checkpoint_dir: str) -> CheckpointResult:
        """Writes the model files of a checkpoint (`shared.run_layout.CheckpointFiles`) atomically."""
