"""The typed configuration of a training run: a pydantic model, filled from defaults, a TOML/YAML file and
the command line (`driver.config_sources`).

`TrainConfig` is the engine options (`driver.engine_options.EngineOptions`) plus the ES, rollout, task,
data and output options. Each field's type, `Literal` choices and range are declared on it, and the checks
across fields are the models' validators, so every value is checked once, where it enters, and an invalid
one is rejected, naming the option (or the file and key), the value and what was expected, before data is
read or Ray starts (`driver.options.ConfigError`).

ES defaults are the paper's (Qiu et al. 2025, Sec. 4: N = 30, sigma = 0.001, alpha = 0.0005, z-scored
rewards), except sigma and alpha with the tiny default model (see TINY_SIGMA); the run length, prompts
per member and completion length default to a short run that finishes in minutes on a CPU with the tiny
model, and are meant to be raised for real models.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from driver.engine_options import EngineOptions
from driver.options import ConfigError, option
from driver.strategy import SHAPINGS, StrategyConfig
from shared.protocol import PERTURBATIONS, Perturbation, RolloutRequest
from shared.tasks import TASKS, CountdownTask, TaskError, load_task

__all__ = ["ConfigError", "FIELDS", "RESUMABLE_OVERRIDES", "TrainConfig"]

DATASETS = ("generated", "reference", "hf")
# The most problems --train-size and --eval-size may ask for: generating them takes about 20 s (Countdown,
# on the development machine); a larger dataset comes from a file (--dataset-path).
MAX_PROBLEMS = 100_000
_SIZES = f"in [0, {MAX_PROBLEMS}] (generating {MAX_PROBLEMS} takes about 20 s; more come from --dataset-path)"
# Qiu et al. 2025, Sec. 4 (Countdown): sigma = 0.001, alpha = 0.0005 for 0.5B-8B models.
PAPER_SIGMA, PAPER_ALPHA = 0.001, 0.0005
# The tiny default model (0.36 M parameters) needs a larger perturbation for members to differ at all:
# measured on it, sigma = 0.001 leaves every member's completions unchanged, sigma = 0.01 does not.
TINY_SIGMA, TINY_ALPHA = 0.01, 0.005


class TrainConfig(EngineOptions):
    """Every setting of a training run (units per field; `None` means "derived", see help).

    Raises:
        ConfigError: on construction, for the first invalid value (`driver.options.config_error`).
    """

    # ES (Qiu et al. 2025, Alg. 1).
    population: int = option(30, "population size N (members per iteration)", "members", gt=0)
    sigma: Annotated[float, Field(gt=0)] | None = option(
        None,
        "perturbation scale sigma; default: 0.001 (the paper's), or 0.01 with the tiny default model",
        "weight units",
        expect="a finite number > 0",
    )
    alpha: Annotated[float, Field(gt=0)] | None = option(
        None,
        "learning rate alpha of the update (alpha/N) * sum z_n eps_n; default: "
        "0.0005 (the paper's), or 0.005 with the tiny default model",
        "weight units",
        expect="a finite number > 0",
    )
    shaping: Literal[SHAPINGS] = option("zscore", "fitness shaping of member rewards")
    antithetic: bool = option(False, "mirrored pairs (seed, +sigma) and (seed, -sigma)")
    perturbation: Literal[PERTURBATIONS] = option(
        "full",
        "member noise: full (the paper's: every parameter) or lowrank (EGGROLL: B A^T / sqrt(rank) on the "
        "attention and MLP matrices, the rest frozen; on vLLM engines the members run as LoRA adapters, "
        "an engine's share of the population in one batch)",
    )
    rank: int = option(1, "rank r of each member's low-rank noise (--perturbation lowrank)", "rank", gt=0)
    member_batch: int = option(
        0,
        "low-rank members a vLLM engine scores in one batch, as LoRA adapters (--perturbation lowrank "
        "--backend vllm): 0 = its whole share of the population (population / engines, rounded up); 1 = "
        "one at a time, merged into the weights (no LoRA)",
        "members",
        ge=0,
    )
    iterations: int = option(20, "ES iterations (updates) in total", "iterations", resumable=True, gt=0)
    # Rollouts.
    prompts_per_member: int = option(16, "problems each member is scored on per iteration", "prompts", gt=0)
    max_new_tokens: int = option(128, "completion length limit", "tokens", gt=0)
    batch_size: int = option(16, "prompts per generation batch inside an engine", "prompts", gt=0)
    # Task and data.
    task: str = option(
        "countdown",
        f"what rollouts are scored on (shared.tasks): {', '.join(TASKS)}, or package.module:Class for a "
        "shared.tasks.Task in the source tree (e.g. src/tasks/), which both PEX files then hold",
    )
    chat_template: bool | None = option(
        None,
        "render prompts through the model's chat template (instruct models); default: the task's "
        "(countdown: off, the reference prompt is raw text; conciseness: on)",
    )
    dataset: Literal[DATASETS] = option(
        "generated",
        "Countdown source: generated (no files), reference (the ES paper's "
        "JSON) or hf (Countdown-Tasks-3to4 rows: .json/.jsonl/.parquet); other tasks: generated "
        "(their default data) unless --dataset-path names a JSONL file",
    )
    dataset_path: str | None = option(
        None, "file of the reference or hf dataset; for other tasks a JSONL file of their rows"
    )
    train_size: int = option(
        200,
        "generated problems for training (dataset=generated only)",
        "problems",
        ge=0,
        le=MAX_PROBLEMS,
        expect=_SIZES,
    )
    eval_size: int = option(
        64,
        "held-out problems for greedy evaluation, taken out of the dataset",
        "problems",
        ge=0,
        le=MAX_PROBLEMS,
        expect=_SIZES,
    )
    seed: int = option(
        0,
        "root seed of members, prompt batches, generated data and the split",
        ge=0,
        lt=2**63,
        expect="in [0, 2**63) (a signed 64-bit integer)",
    )
    # Outputs.
    output_dir: str | None = option(
        None,
        "run directory; default: runs/<UTC time>. A run directory may be moved or copied and resumed there",
        resumable=True,
    )
    eval_every: int = option(
        5,
        "greedy held-out evaluation every K iterations (and before training and at "
        "the end); 0: only before and at the end",
        "iterations",
        ge=0,
    )
    checkpoint_every: int = option(
        5,
        "checkpoint every K iterations (and at the end); compact (ES state only) unless a full one is "
        "due; 0: only at the end",
        "iterations",
        resumable=True,
        ge=0,
    )
    full_checkpoint_every: int = option(
        25,
        "write the model directory with the checkpoint every K iterations (and at the end); compact "
        "checkpoints in between replay their updates onto the last one; 0: only at the end",
        "iterations",
        resumable=True,
        ge=0,
    )
    keep_full: int = option(
        2,
        "keep the newest N full checkpoints (and the compact ones that replay onto them or onto the "
        "base model); 0: keep every checkpoint",
        "checkpoints",
        resumable=True,
        ge=0,
    )
    stop_deadline: float = option(
        25.0,
        "after SIGTERM or Ctrl-C, finish the current iteration only if that and the checkpoint fit in "
        "this many seconds, else drop it (default: inside a 30 s spot-VM preemption notice)",
        "s",
        resumable=True,
        ge=0,
    )
    samples_per_iteration: int = option(4, "sample completions written per iteration", "samples", ge=0)
    resume: bool = option(False, "continue the run in OUTPUT_DIR from its last checkpoint", resumable=True)
    progress: bool = option(
        True,
        "show a progress bar over members on a terminal (never in a log file or a pipe, where the line "
        "per iteration is the progress)",
        resumable=True,
    )

    @field_validator("task")
    @classmethod
    def _known_task(cls, task: str) -> str:
        try:
            load_task(task)
        except TaskError as e:
            raise ConfigError(str(e)) from e
        return task

    @model_validator(mode="after")
    def _derive_and_check(self) -> TrainConfig:
        """Derives sigma, alpha and chat_template, then checks the options against each other."""
        tiny = self.model_dir is None and self.model is None
        if self.sigma is None:
            object.__setattr__(self, "sigma", TINY_SIGMA if tiny else PAPER_SIGMA)
        if self.alpha is None:
            object.__setattr__(self, "alpha", TINY_ALPHA if tiny else PAPER_ALPHA)
        if self.chat_template is None:
            object.__setattr__(self, "chat_template", load_task(self.task).chat_template)
        self._check_es_and_data()
        return self

    def _check_es_and_data(self) -> None:
        """The population against antithetic sampling; the dataset options together."""
        if self.antithetic and self.population % 2:
            raise ConfigError(f"--population: must be even with --antithetic, got {self.population}")
        if self.perturbation == "lowrank":
            if self.emulate_tpu:
                raise ConfigError(
                    "--perturbation: lowrank is not on the TPU engine yet (its JAX workers run full); vLLM's "
                    "CPU and CUDA engines and the transformers backend run it"
                )
            if self.restore_mode == "subtract":
                raise ConfigError("--restore-mode: subtract is not for --perturbation lowrank (use master)")
            if self.member_slots() and self.cpu_linear == "repack":
                raise ConfigError(
                    "--cpu-linear: repack is not for LoRA member batches yet (vLLM's LoRA layers wrap the "
                    "packed linear layers, and the engine's start-up check refuses them); use read"
                )
            if self.member_slots() and self.tensor_parallel_size != 1:
                raise ConfigError(
                    "--member-batch: LoRA member batches need --tensor-parallel-size 1 (or --member-batch 1, "
                    f"one member at a time), got {self.tensor_parallel_size}"
                )
        if self.member_batch and not (self.perturbation == "lowrank" and self.backend == "vllm"):
            raise ConfigError(
                "--member-batch: only with --perturbation lowrank on vLLM engines (--backend vllm)"
            )
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

    def strategy_config(self) -> StrategyConfig:
        """The ES hyper-parameters of this run."""
        return StrategyConfig(
            population=self.population,
            sigma=self.sigma,
            alpha=self.alpha,
            shaping=self.shaping,
            antithetic=self.antithetic,
        )

    def perturbation_spec(self) -> Perturbation:
        """How this run's members perturb the weights (what each engine loads with)."""
        return Perturbation(mode=self.perturbation, rank=self.rank)

    def member_slots(self) -> int:
        """Low-rank members one vLLM engine scores in one batch (its LoRA member slots): `member_batch`,
        or with 0 the population split over the engines (rounded up); 0 where members run one at a time
        (full-rank members, the transformers backend, or `member_batch` 1)."""
        if self.perturbation != "lowrank" or self.backend != "vllm" or self.member_batch == 1:
            return 0
        return self.member_batch or -(-self.population // self.num_engines)

    def rollout_request(self) -> RolloutRequest:
        """The unperturbed request of this run's rollouts (task, prompt rendering, completion length,
        generation batch size), returning one sample: training sets each member on it, held-out
        evaluation uses it as it is. The one place a RolloutRequest is built from the config."""
        return RolloutRequest(
            max_new_tokens=self.max_new_tokens,
            task=self.task,
            chat_template=self.chat_template,
            batch_size=self.batch_size,
            num_samples=1,
        )

    def to_dict(self) -> dict[str, Any]:
        """All fields, JSON-serialisable (what config.json holds)."""
        return self.model_dump()


FIELDS = TrainConfig.model_fields
# Options a resumed run may change (declared on the fields: `option(..., resumable=True)`).
RESUMABLE_OVERRIDES = frozenset(name for name, f in FIELDS.items() if f.json_schema_extra["resumable"])
