"""The typed configuration of a training run, from defaults, a TOML/YAML file and the command line.

Precedence: the dataclass defaults, then `--config FILE` (TOML or YAML, keys are the field names), then
command-line options (`--population 8`). Every field is validated in `TrainConfig.__post_init__`, so an
invalid value is rejected, naming the option, before data is read or Ray starts.

ES defaults are the paper's (Qiu et al. 2025, Sec. 4: N = 30, sigma = 0.001, alpha = 0.0005, z-scored
rewards), except sigma and alpha with the tiny default model (see TINY_SIGMA); the run length, prompts
per member and completion length default to a short run that finishes
in minutes on a CPU with the tiny model, and are meant to be raised for real models.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import tomllib
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from driver.strategy import SHAPINGS, StrategyConfig
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
from shared.tasks import TASKS, CountdownTask, TaskError, load_task

# --backend: where and with what the engines run: "cpu" and "cuda" (the transformers engine backend on CPUs
# or CUDA GPUs), "vllm" (the vLLM engine backend on GPUs, TPUs or CPUs); see shared.protocol.ENGINE_BACKENDS.
BACKEND_CHOICES = ("cpu", "cuda", "vllm")
DATASETS = ("generated", "reference", "hf")
# The most problems --train-size and --eval-size may ask for: generating them takes about 20 s (Countdown,
# on the development machine); a larger dataset comes from a file (--dataset-path).
MAX_PROBLEMS = 100_000
# Qiu et al. 2025, Sec. 4 (Countdown): sigma = 0.001, alpha = 0.0005 for 0.5B-8B models.
PAPER_SIGMA, PAPER_ALPHA = 0.001, 0.0005
# The tiny default model (0.36 M parameters) needs a larger perturbation for members to differ at all:
# measured on it, sigma = 0.001 leaves every member's completions unchanged, sigma = 0.01 does not.
TINY_SIGMA, TINY_ALPHA = 0.01, 0.005


class ConfigError(ValueError):
    """An invalid configuration value; the message names the option (and the file, if it came from one)."""


def _opt(default: Any, help: str, unit: str = "", resumable: bool = False, **extra: Any) -> Any:
    """A TrainConfig field: its default, --help text, unit and `choices`. `resumable`: a resumed run may
    change it (where and how engines run, how long the run goes on); every other option decides the
    weights and must equal the interrupted run's value."""
    metadata = {"help": help, "unit": unit, "resumable": resumable, **extra}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run. Units are given per field; `None` means "derived" (see help)."""

    # Model and engines.
    model_dir: str | None = _opt(
        None,
        "Hugging Face model directory, readable on every node; default: the tiny test model, "
        "created under OUTPUT_DIR/base-model",
    )
    model: str | None = _opt(
        None,
        "a pretrained model the CPU engine ships, imported from GGUF into OUTPUT_DIR/base-model "
        f"(engine.gguf_import); instead of --model-dir. One of: {', '.join(PACKAGED_MODELS)}",
    )
    backend: str = _opt(
        "cpu",
        "rollout backend: cpu (transformers on CPU), cuda (transformers on a GPU) or vllm (vLLM on GPUs, "
        "with --engine-gpus, from the engine-gpu PEX; on TPU chips, with --engine-resources TPU=N, "
        "from the engine PEX; with neither, on CPUs, from the engine-cpu PEX)",
        choices=BACKEND_CHOICES,
    )
    dtype: str = _opt("float32", "weights dtype in the engines", choices=DTYPES)
    restore_mode: str = _opt(
        "master",
        "how perturbations are undone: master (exact, fp32 host copy), device (exact, a copy of the "
        "weights in device memory: one more set of parameters there, faster on a GPU) or subtract "
        "(the reference's, inexact in low precision)",
        choices=RESTORE_MODES,
    )
    deterministic: bool = _opt(
        True,
        "deterministic torch kernels in the engines (exact resume and fault recovery on GPUs, where "
        "greedy generation is otherwise not reproducible; slower: docs/measurements.md)",
    )
    tensor_parallel_size: int = _opt(
        1, "vLLM: GPUs or TPU chips each engine shards its model over (tensor parallelism)", "devices"
    )
    gpu_memory_utilization: float = _opt(
        0.85,
        "vLLM: share of each device's memory an engine may take (weights and KV cache)",
        "fraction",
        resumable=True,
    )
    max_model_len: int = _opt(2048, "vLLM: prompt + completion tokens per sequence", "tokens")
    cpu_kv_cache_gib: float = _opt(
        1.0, "vLLM on CPUs: host RAM each engine reserves for its KV cache", "GiB", resumable=True
    )
    cpu_linear: str = _opt(
        "read",
        "vLLM on CPUs: linear layers compute from the perturbed parameters (read), or vLLM's packed "
        "kernels are re-packed after every weight change (repack)",
        choices=CPU_LINEAR_MODES,
    )
    emulate_tpu: bool = _opt(
        False,
        "vLLM on CPUs: run the TPU engine's own vLLM (vllm-tpu + tpu-inference, from the engine PEX) on "
        "JAX's CPU backend with the chip stood in (engine.tpu_emulation), for tests and development; "
        "never on a TPU. The emulated HBM per engine is --cpu-kv-cache-gib",
    )
    num_engines: int = _opt(2, "number of engine actors", "actors", resumable=True)
    engine_cpus: float = _opt(1.0, "Ray CPUs per engine actor", "logical CPUs", resumable=True)
    engine_gpus: float = _opt(0.0, "Ray GPUs per engine actor", "GPUs", resumable=True)
    engine_resources: dict[str, float] = _opt(
        {},
        "extra Ray resources per engine actor, NAME=AMOUNT (repeatable), e.g. TPU=4",
        "units",
        resumable=True,
    )
    # ES (Qiu et al. 2025, Alg. 1).
    population: int = _opt(30, "population size N (members per iteration)", "members")
    sigma: float | None = _opt(
        None,
        "perturbation scale sigma; default: 0.001 (the paper's), or 0.01 with the tiny default model",
        "weight units",
    )
    alpha: float | None = _opt(
        None,
        "learning rate alpha of the update (alpha/N) * sum z_n eps_n; default: "
        "0.0005 (the paper's), or 0.005 with the tiny default model",
        "weight units",
    )
    shaping: str = _opt("zscore", "fitness shaping of member rewards", choices=SHAPINGS)
    antithetic: bool = _opt(False, "mirrored pairs (seed, +sigma) and (seed, -sigma)")
    iterations: int = _opt(20, "ES iterations (updates) in total", "iterations", resumable=True)
    # Rollouts.
    prompts_per_member: int = _opt(16, "Countdown problems each member is scored on per iteration", "prompts")
    max_new_tokens: int = _opt(128, "completion length limit", "tokens")
    batch_size: int = _opt(16, "prompts per generation batch inside an engine", "prompts")
    # Task and data.
    task: str = _opt(
        "countdown",
        f"what rollouts are scored on (shared.tasks): {', '.join(TASKS)}, or package.module:Class for a "
        "shared.tasks.Task in the source tree (e.g. src/tasks/), which both PEX files then hold",
    )
    chat_template: bool | None = _opt(
        None,
        "render prompts through the model's chat template (instruct models); default: the task's "
        "(countdown: off, the reference prompt is raw text; conciseness: on)",
    )
    dataset: str = _opt(
        "generated",
        "Countdown source: generated (no files), reference (the ES paper's "
        "JSON) or hf (Countdown-Tasks-3to4 rows: .json/.jsonl/.parquet); other tasks: generated "
        "(their default data) unless --dataset-path names a JSONL file",
        choices=DATASETS,
    )
    dataset_path: str | None = _opt(
        None, "file of the reference or hf dataset; for other tasks a JSONL file of their rows"
    )
    train_size: int = _opt(200, "generated problems for training (dataset=generated only)", "problems")
    eval_size: int = _opt(64, "held-out problems for greedy evaluation, taken out of the dataset", "problems")
    seed: int = _opt(0, "root seed of members, prompt batches, generated data and the split")
    # Outputs.
    output_dir: str | None = _opt(
        None,
        "run directory; default: runs/<UTC time>. A run directory may be moved or copied and resumed there",
        resumable=True,
    )
    eval_every: int = _opt(
        5,
        "greedy held-out evaluation every K iterations (and before training and at "
        "the end); 0: only before and at the end",
        "iterations",
    )
    checkpoint_every: int = _opt(
        5,
        "checkpoint every K iterations (and at the end); compact (ES state only) unless a full one is "
        "due; 0: only at the end",
        "iterations",
        resumable=True,
    )
    full_checkpoint_every: int = _opt(
        25,
        "write the model directory with the checkpoint every K iterations (and at the end); compact "
        "checkpoints in between replay their updates onto the last one; 0: only at the end",
        "iterations",
        resumable=True,
    )
    keep_full: int = _opt(
        2,
        "keep the newest N full checkpoints (and the compact ones that replay onto them or onto the "
        "base model); 0: keep every checkpoint",
        "checkpoints",
        resumable=True,
    )
    stop_deadline: float = _opt(
        25.0,
        "after SIGTERM or Ctrl-C, finish the current iteration only if that and the checkpoint fit in "
        "this many seconds, else drop it (default: inside a 30 s spot-VM preemption notice)",
        "s",
        resumable=True,
    )
    samples_per_iteration: int = _opt(4, "sample completions written per iteration", "samples")
    resume: bool = _opt(False, "continue the run in OUTPUT_DIR from its last checkpoint", resumable=True)
    progress: bool = _opt(True, "show a progress bar over members", resumable=True)
    # Where engines come from.
    engine_pex: str | None = _opt(
        None,
        f"engine PEX; default: build it with `./pants package {ENGINE_TARGET}` (the GPU or CPU engine "
        "where the backend needs it) when run from the source tree, else "
        f"${ENGINE_PEX_ENV} or {pex_path(ENGINE_TARGET)}",
        resumable=True,
    )
    build_engine: bool = _opt(
        True,
        "build the engine PEX with Pants when run from the source tree and --engine-pex is not given",
        resumable=True,
    )
    engine_python: str | None = _opt(
        None,
        "CPython 3.12 that runs the engine PEX on every node; default: "
        "$HERMETIC_ES_ENGINE_PYTHON or the driver's base interpreter",
        resumable=True,
    )
    pex_root: str | None = _opt(
        None, f"PEX_ROOT on every node; default: ${PEX_ROOT_ENV} or {DEFAULT_PEX_ROOT}", resumable=True
    )
    engine_start_timeout: float = _opt(
        120.0,
        "seconds for engine actors to start once the PEX is extracted on the node",
        "s",
        resumable=True,
    )
    address: str | None = _opt(
        None,
        "Ray cluster to join (e.g. auto or ray://host:10001); default: start a local cluster",
        resumable=True,
    )

    def __post_init__(self) -> None:
        """Derives sigma and alpha, then checks every option (`ConfigError` names the first bad one)."""
        tiny = self.model_dir is None and self.model is None
        if self.sigma is None:
            object.__setattr__(self, "sigma", TINY_SIGMA if tiny else PAPER_SIGMA)
        if self.alpha is None:
            object.__setattr__(self, "alpha", TINY_ALPHA if tiny else PAPER_ALPHA)
        try:
            task = load_task(self.task)
        except TaskError as e:
            raise ConfigError(str(e)) from e
        if self.chat_template is None:
            object.__setattr__(self, "chat_template", task.chat_template)
        self._check_values()
        self._check_es_and_data()
        self._check_model_and_engines()

    def _check_values(self) -> None:
        """Each option on its own: choices, signs, finiteness."""
        for f in fields(self):
            value = getattr(self, f.name)
            choices = f.metadata.get("choices")
            if choices and value not in choices:
                raise ConfigError(f"{_flag(f.name)}: expected one of {', '.join(choices)}, got {value!r}")
        positive = (
            "num_engines",
            "population",
            "iterations",
            "prompts_per_member",
            "max_new_tokens",
            "batch_size",
            "engine_cpus",
            "engine_start_timeout",
            "tensor_parallel_size",
            "max_model_len",
        )
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"{_flag(name)}: must be > 0, got {getattr(self, name)!r}")
        non_negative = (
            "engine_gpus",
            "eval_size",
            "eval_every",
            "checkpoint_every",
            "full_checkpoint_every",
            "keep_full",
            "stop_deadline",
            "samples_per_iteration",
            "train_size",
            "seed",
        )
        for name in non_negative:
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{_flag(name)}: must be >= 0, got {getattr(self, name)!r}")
        for name in ("train_size", "eval_size"):
            if getattr(self, name) > MAX_PROBLEMS:
                raise ConfigError(
                    f"{_flag(name)}: at most {MAX_PROBLEMS} problems, got {getattr(self, name)!r} "
                    f"(generating {MAX_PROBLEMS} Countdown problems takes about 20 s)"
                )
        if self.seed >= 2**63:
            raise ConfigError(f"--seed: must be < 2**63 (a signed 64-bit integer), got {self.seed!r}")
        for name in ("sigma", "alpha"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{_flag(name)}: must be a finite number > 0, got {value!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(
                f"--gpu-memory-utilization: must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if not self.cpu_kv_cache_gib > 0:
            raise ConfigError(f"--cpu-kv-cache-gib: must be > 0, got {self.cpu_kv_cache_gib!r}")
        for name, amount in self.engine_resources.items():
            if not isinstance(name, str) or not isinstance(amount, int | float) or not 0 < amount < math.inf:
                raise ConfigError(
                    f"--engine-resources: expected NAME=AMOUNT with a finite AMOUNT > 0, got {name}={amount}"
                )
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{_flag(f.name)}: must be a finite number, got {value!r}")

    def _check_es_and_data(self) -> None:
        """The population against antithetic sampling; the dataset options together."""
        if self.antithetic and self.population % 2:
            raise ConfigError(f"--population: must be even with --antithetic, got {self.population}")
        if self.task != CountdownTask.name:
            if self.dataset != "generated":
                raise ConfigError(
                    f"--dataset: {self.dataset} is a Countdown source; task {self.task} reads its default "
                    "data, or a JSONL file given with --dataset-path"
                )
        elif self.dataset != "generated" and not self.dataset_path:
            raise ConfigError(f"--dataset-path: required with --dataset {self.dataset}")
        if self.task == CountdownTask.name and self.dataset == "generated" and self.dataset_path:
            raise ConfigError("--dataset-path: only with --dataset reference or hf (generated needs no file)")
        if not self.dataset_path and self.train_size < self.prompts_per_member:
            raise ConfigError(
                f"--train-size: must be >= --prompts-per-member ({self.prompts_per_member}), "
                f"got {self.train_size}"
            )
        if self.resume and not self.output_dir:
            raise ConfigError("--resume: needs --output-dir, the run to continue")

    def _check_model_and_engines(self) -> None:
        """The model against the engines, and the backend against the devices each engine gets."""
        if self.backend == "cpu" and self.engine_gpus:
            raise ConfigError("--engine-gpus: must be 0 with --backend cpu (use --backend cuda)")
        if self.backend != "vllm" and self.tensor_parallel_size != 1:
            raise ConfigError("--tensor-parallel-size: only with --backend vllm")
        if self.model is not None and self.model not in PACKAGED_MODELS:
            raise ConfigError(f"--model: expected one of {', '.join(PACKAGED_MODELS)}, got {self.model!r}")
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

    def strategy_config(self) -> StrategyConfig:
        """The ES hyper-parameters of this run."""
        return StrategyConfig(
            population=self.population,
            sigma=self.sigma,
            alpha=self.alpha,
            shaping=self.shaping,
            antithetic=self.antithetic,
        )

    def to_dict(self) -> dict[str, Any]:
        """All fields, JSON-serialisable."""
        return dataclasses.asdict(self)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


_FIELDS = {f.name: f for f in fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)
# Options a resumed run may change (declared on the fields: `_opt(..., resumable=True)`).
RESUMABLE_OVERRIDES = frozenset(name for name, f in _FIELDS.items() if f.metadata["resumable"])


def _is_optional(name: str) -> bool:
    """True when the field's type admits None (`X | None`)."""
    return type(None) in typing.get_args(_HINTS[name])


def _field_kind(name: str) -> type:
    """The value type of a field: bool, int, float, str or dict (`X | None` -> X, `dict[K, V]` -> dict)."""
    hint = _HINTS[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if _is_optional(name):
        hint = args[0]
    return typing.get_origin(hint) or hint


def _check_value(name: str, value: Any, where: str) -> Any:
    """A file value converted to the field's type, or ConfigError naming `where` and the key."""
    kind = _field_kind(name)
    if value is None and _is_optional(name):
        return None
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif kind is dict:
        ok = isinstance(value, dict) and all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in value.values()
        )
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(f"{where}: key '{name}': expected {kind.__name__}, got {value!r}")
    try:
        if kind is float:
            return float(value)
        if kind is dict:
            return {str(k): float(v) for k, v in value.items()}
    except OverflowError:
        raise ConfigError(f"{where}: key '{name}': {value!r} is out of a float's range") from None
    return value


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Reads a TOML (.toml) or YAML (.yaml/.yml) file of TrainConfig fields. Returns {field: value}.

    Raises:
        ConfigError: the file is missing, unparsable, not a table, has unknown keys or mistyped values.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"--config: cannot read {path}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            raise ConfigError(f"--config: {path}: expected a .toml, .yaml or .yml file")
    except (tomllib.TOMLDecodeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{path}: not valid {path.suffix[1:].upper()}: {e}") from e
    except Exception as e:  # yaml.YAMLError, imported lazily
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a table of options, got {type(data).__name__}")
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; valid keys: {', '.join(_FIELDS)}")
    return {name: _check_value(name, value, str(path)) for name, value in data.items()}


def _parse_resource(text: str) -> tuple[str, float]:
    name, sep, amount = text.partition("=")
    try:
        if not sep or not name:
            raise ValueError
        return name, float(amount)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=AMOUNT, got {text!r}") from None


def _optional_str(text: str) -> str | None:
    return None if text in ("", "none", "None") else text


def build_parser(prog: str = "train", description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one option per TrainConfig field (plus --config). Options not given are
    absent from the parsed namespace, so that file values are not overridden by defaults."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", help="TOML or YAML file of options (keys: the option names with _)")
    for f in fields(TrainConfig):
        kind = _field_kind(f.name)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        unit = f" [{f.metadata['unit']}]" if f.metadata.get("unit") else ""
        text = f"{f.metadata['help']}{unit}" + ("" if default is None else f" (default: {default})")
        kwargs: dict[str, Any] = {"help": text, "dest": f.name}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif kind is dict:
            kwargs.update(action="append", type=_parse_resource, metavar="NAME=AMOUNT")
        else:
            if _is_optional(f.name):
                kwargs["type"] = _optional_str if kind is str else kind
            else:
                kwargs["type"] = kind
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
        parser.add_argument(_flag(f.name), **kwargs)
    return parser


def config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, set[str]]:
    """Merges defaults, the --config file and the given options; returns (config, names given on the
    command line or in the file).

    Raises:
        ConfigError: see `load_config_file` and `TrainConfig`.
    """
    given = vars(args).copy()
    values = load_config_file(given.pop("config")) if "config" in given else {}
    if "engine_resources" in given:
        given["engine_resources"] = dict(given["engine_resources"])
    values.update(given)
    return TrainConfig(**values), set(values)


def merge_for_resume(
    saved: dict[str, Any], current: TrainConfig, given: set[str], source: str
) -> TrainConfig:
    """The config of a resumed run: the saved run's values, with the options in RESUMABLE_OVERRIDES that
    were given now. Other options given now must equal the saved values. An option added after the run
    was started (absent from its config.json) takes its default.

    Raises:
        ConfigError: a given option changes a value that decides the weights, or the saved config is bad.
    """
    unknown = sorted(set(saved) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"{source}: unknown keys {unknown}; not a config written by this version")
    defaults = TrainConfig()
    merged = {name: saved.get(name, getattr(defaults, name)) for name in _FIELDS}
    for name in given:
        value = getattr(current, name)
        if name in RESUMABLE_OVERRIDES:
            merged[name] = value
        elif value != merged[name]:
            raise ConfigError(
                f"{_flag(name)}: {value!r} differs from the run being resumed ({merged[name]!r} in "
                f"{source}); "
                "a resumed run keeps the hyper-parameters, data and model of the run it continues"
            )
    merged["resume"] = True
    merged["output_dir"] = current.output_dir
    return TrainConfig(**merged)
