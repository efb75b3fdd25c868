"""Training configuration: defaults, files, command line, and errors before anything starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray

from driver import train
from driver.checkpointing import Anchor
from driver.config_sources import build_parser, config_from_args, load_config_file, merge_for_resume
from driver.engine_fleet import load_request
from driver.engine_spec import DEFAULT_ENGINE_PEX
from driver.train_config import PAPER_ALPHA, PAPER_SIGMA, TINY_SIGMA, ConfigError, TrainConfig
from shared.engine_pex import pex_path


def parse(*argv: str) -> TrainConfig:
    return config_from_args(build_parser().parse_args(list(argv)))[0]


def test_defaults_are_the_papers_for_a_given_model_and_tiny_values_for_the_tiny_model():
    given = parse("--model-dir", "/models/qwen")
    assert (given.population, given.sigma, given.alpha, given.shaping) == (
        30,
        PAPER_SIGMA,
        PAPER_ALPHA,
        "zscore",
    )
    assert parse().sigma == TINY_SIGMA
    assert parse("--sigma", "0.02").sigma == 0.02


def test_help_lists_every_option_with_default_and_unit(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--population", "--sigma", "--alpha", "--num-engines", "--max-new-tokens", "--resume"):
        assert flag in text
    assert "[members] (default: 30)" in text
    assert "[tokens] (default: 128)" in text


def test_engine_weight_options():
    default = parse()
    assert (default.restore_mode, default.deterministic) == ("master", True)
    config = parse("--restore-mode", "device", "--no-deterministic")
    assert (config.restore_mode, config.deterministic) == ("device", False)
    with pytest.raises(SystemExit):
        parse("--restore-mode", "undo")


def test_vllm_engines_come_from_the_pex_of_their_platform():
    gpu = parse("--backend", "vllm", "--engine-gpus", "2", "--tensor-parallel-size", "2")
    tpu = parse("--backend", "vllm", "--engine-resources", "TPU=4", "--tensor-parallel-size", "4")
    assert (gpu.engine_target, tpu.engine_target) == ("src/engine:engine-gpu", "src/engine:engine")
    assert parse("--backend", "cuda", "--engine-gpus", "1").engine_target == "src/engine:engine"
    assert pex_path(gpu.engine_target) == Path("dist/src.engine/engine-gpu.pex")
    assert pex_path(tpu.engine_target) == DEFAULT_ENGINE_PEX
    # Neither GPUs nor TPU chips: vLLM's CPU backend from the engine-cpu PEX; a packaged model too.
    cpu = parse("--backend", "vllm")
    assert (cpu.vllm_on_cpu, cpu.engine_target) == (True, "src/engine:engine-cpu")
    assert (cpu.cpu_kv_cache_gib, cpu.cpu_linear) == (1.0, "read")
    assert pex_path(cpu.engine_target) == Path("dist/src.engine/engine-cpu.pex")
    smollm2 = parse("--model", "smollm2-135m-instruct")
    assert (smollm2.engine_target, smollm2.sigma, smollm2.alpha) == ("src/engine:engine-cpu", 0.001, 0.0005)
    assert not gpu.vllm_on_cpu and not tpu.vllm_on_cpu
    # A TPU emulated on CPUs runs the TPU engine PEX (vllm-tpu) and tells its engines so.
    emulated = parse("--backend", "vllm", "--emulate-tpu")
    assert (emulated.engine_target, emulated.device_type) == ("src/engine:engine", "cpu")
    assert load_request(emulated, Anchor(0, "/models/m")).vllm.emulate_tpu
    assert not load_request(cpu, Anchor(0, "/models/m")).vllm.emulate_tpu


@pytest.mark.parametrize(
    "argv, device",
    [
        ([], "cpu"),
        (["--backend", "cuda", "--engine-gpus", "1"], "cuda"),
        (["--backend", "vllm"], "cpu"),
        (["--backend", "vllm", "--engine-gpus", "1"], "cuda"),
        (["--backend", "vllm", "--engine-resources", "TPU=4", "--tensor-parallel-size", "4"], "tpu"),
    ],
)
def test_engines_load_for_the_runs_device(argv, device):
    """Engines get the run's device type, which their manifest entry reports (vLLM engines on GPUs and
    TPUs once reported "cpu"); the transformers backend uses it as its torch device."""
    config = parse(*argv)
    request = load_request(config, Anchor(0, "/models/m"))
    assert (config.device_type, request.device) == (device, device)
    assert request.backend == ("vllm" if "vllm" in argv else "transformers")


@pytest.mark.parametrize(
    ("argv", "slots"),
    [
        ([], 0),
        (["--perturbation", "lowrank"], 0),
        (["--backend", "vllm"], 0),
        (["--backend", "vllm", "--perturbation", "lowrank"], 15),
        (["--backend", "vllm", "--perturbation", "lowrank", "--num-engines", "4"], 8),
        (["--backend", "vllm", "--perturbation", "lowrank", "--member-batch", "5"], 5),
        (["--backend", "vllm", "--perturbation", "lowrank", "--member-batch", "1"], 0),
    ],
)
def test_low_rank_members_on_vllm_are_batched_as_lora_adapters(argv, slots):
    """An engine's LoRA member slots: its share of the population (30 members over the engines, rounded
    up) unless --member-batch says otherwise; none where members run one at a time."""
    config = parse(*argv)
    assert config.member_slots() == slots
    assert load_request(config, Anchor(0, "/models/m")).vllm.member_slots == slots


def test_file_then_command_line(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('population = 8\nsigma = 0.5\nengine_resources = { TPU = 4 }\ndataset = "generated"\n')
    config = parse("--config", str(toml), "--sigma", "0.25")
    assert (config.population, config.sigma, config.engine_resources) == (8, 0.25, {"TPU": 4.0})
    yaml = tmp_path / "run.yaml"
    yaml.write_text("population: 6\nantithetic: true\n")
    assert parse("--config", str(yaml)).antithetic is True


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--population", "0"], "--population: must be > 0"),
        (["--sigma", "-1"], "--sigma: must be a finite number > 0"),
        (["--sigma", "nan"], "--sigma: must be a finite number > 0"),
        (["--antithetic", "--population", "5"], "--population: must be even with --antithetic"),
        (["--dataset", "reference"], "--dataset-path: required with --dataset reference"),
        (["--engine-gpus", "1"], "--engine-gpus: must be 0 with --backend cpu"),
        (["--resume"], "--resume: needs --output-dir"),
        (
            ["--backend", "vllm", "--engine-gpus", "1", "--engine-resources", "TPU=4"],
            "or neither .CPUs., not both",
        ),
        (["--backend", "vllm", "--tensor-parallel-size", "2"], "vLLM engines on CPUs run unsharded"),
        (["--model", "gpt-5"], "--model: expected one of smollm2-135m-instruct, got 'gpt-5'"),
        (["--model", "smollm2-135m-instruct", "--model-dir", "m"], "--model: give either --model or"),
        (
            ["--model", "smollm2-135m-instruct", "--backend", "cuda", "--engine-gpus", "1"],
            "ships in the CPU engine only",
        ),
        (["--cpu-kv-cache-gib", "0"], "--cpu-kv-cache-gib: must be > 0"),
        (
            ["--backend", "vllm", "--engine-gpus", "1", "--tensor-parallel-size", "2"],
            "--tensor-parallel-size: 2 devices per engine, but each engine gets 1",
        ),
        (["--tensor-parallel-size", "2"], "--tensor-parallel-size: only with --backend vllm"),
        (
            ["--backend", "vllm", "--engine-resources", "TPU=4", "--restore-mode", "device"],
            "--restore-mode: device is for GPUs",
        ),
        (["--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization: must be in (0, 1]"),
        (["--emulate-tpu"], "--emulate-tpu: emulates a TPU with vLLM on CPUs"),
        (["--backend", "vllm", "--engine-resources", "TPU=4", "--emulate-tpu"], "on a TPU VM run without it"),
        (["--backend", "vllm", "--emulate-tpu", "--restore-mode", "device"], "an emulated TPU uses master"),
        (["--train-size", "4", "--prompts-per-member", "8"], "--train-size: must be >= --prompts-per-member"),
        (
            ["--perturbation", "lowrank", "--backend", "vllm", "--emulate-tpu"],
            "--perturbation: lowrank is not on the TPU engine",
        ),
        (
            [
                "--perturbation",
                "lowrank",
                "--backend",
                "vllm",
                "--engine-gpus",
                "2",
                "--tensor-parallel-size",
                "2",
            ],
            "--member-batch: LoRA member batches need --tensor-parallel-size 1",
        ),
        (
            ["--perturbation", "lowrank", "--backend", "vllm", "--cpu-linear", "repack"],
            "--cpu-linear: repack is not for LoRA member batches yet",
        ),
        (["--member-batch", "4"], "--member-batch: only with --perturbation lowrank on vLLM"),
        (["--member-batch", "-1"], "--member-batch: must be >= 0"),
        (["--perturbation", "lowrank", "--restore-mode", "subtract"], "--restore-mode: subtract is not for"),
        (["--perturbation", "lowrank", "--rank", "0"], "--rank: must be > 0"),
    ],
)
def test_invalid_values_name_the_option(argv, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        parse(*argv)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("population = 'many'\n", "key 'population': expected int"),
        ("sigmaa = 0.1\n", r"unknown key\(s\) \['sigmaa'\]"),
        ("population = \n", "not valid TOML"),
        ("antithetic = 1\n", "key 'antithetic': expected bool"),
    ],
)
def test_bad_config_files_name_file_and_key(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as error:
        load_config_file(path)
    assert str(path) in str(error.value)


def test_resume_keeps_the_runs_hyper_parameters():
    saved = parse("--output-dir", "runs/a").to_dict()
    longer = merge_for_resume(
        saved, parse("--output-dir", "runs/a", "--iterations", "40"), {"iterations"}, "c"
    )
    assert (longer.iterations, longer.sigma, longer.resume) == (40, saved["sigma"], True)
    with pytest.raises(ConfigError, match="--sigma: 0.5 differs from the run being resumed"):
        merge_for_resume(saved, parse("--output-dir", "runs/a", "--sigma", "0.5"), {"sigma"}, "c")
    # A run started before an option existed resumes with the option's default.
    older = {k: v for k, v in saved.items() if k != "tensor_parallel_size"}
    assert merge_for_resume(older, parse("--output-dir", "runs/a"), set(), "c").tensor_parallel_size == 1
    with pytest.raises(ConfigError, match=r"c: unknown keys \['sigmaa'\]"):
        merge_for_resume({**saved, "sigmaa": 1}, parse("--output-dir", "runs/a"), set(), "c")


def run_main(capsys, *argv: str) -> tuple[int, str]:
    status = train.main(list(argv))
    return status, capsys.readouterr().err


def test_bad_config_fails_before_ray_starts(capsys, tmp_path):
    status, err = run_main(capsys, "--population", "-3", "--output-dir", str(tmp_path / "run"))
    assert status == train.EXIT_INVALID
    assert "--population: must be > 0" in err
    assert not ray.is_initialized()
    assert not (tmp_path / "run").exists()


def test_bad_dataset_file_fails_before_ray_starts(capsys, tmp_path):
    rows = [{"id": 0, "context": "p", "numbers": [1, 2, 3], "target": "6", "solution": None}]
    rows.append({"id": 1, "context": "p", "numbers": [1, "two", 3], "target": "6", "solution": None})
    bad = tmp_path / "countdown.json"
    bad.write_text(json.dumps(rows))
    status, err = run_main(
        capsys, "--dataset", "reference", "--dataset-path", str(bad), "--output-dir", str(tmp_path / "r")
    )
    assert status == train.EXIT_INVALID
    assert f"{bad}: row 1: field 'numbers'" in err
    assert not ray.is_initialized()

    status, err = run_main(capsys, "--dataset", "hf", "--dataset-path", str(tmp_path / "missing.parquet"))
    assert status == train.EXIT_INVALID
    assert "missing.parquet: no such file" in err
    assert not ray.is_initialized()


def test_existing_run_needs_resume_and_resume_needs_a_run(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    status, err = run_main(capsys, "--output-dir", str(run), "--resume")
    assert status == train.EXIT_INVALID
    assert "holds no run" in err
    (run / "config.json").write_text(json.dumps(parse("--output-dir", str(run)).to_dict()))
    status, err = run_main(capsys, "--output-dir", str(run))
    assert status == train.EXIT_INVALID
    assert "already holds a run; pass --resume" in err
    assert not ray.is_initialized()


def test_only_where_and_how_long_engines_run_may_change_on_resume():
    saved = parse("--output-dir", "runs/a").to_dict()
    moved = merge_for_resume(
        saved,
        parse("--output-dir", "runs/a", "--num-engines", "4", "--engine-cpus", "2", "--pex-root", "/x"),
        {"num_engines", "engine_cpus", "pex_root"},
        "c",
    )
    assert (moved.num_engines, moved.engine_cpus, moved.pex_root) == (4, 2.0, "/x")
    for flag, value in (
        ("--population", "8"),
        ("--dtype", "bfloat16"),
        ("--max-new-tokens", "7"),
        ("--seed", "3"),
    ):
        with pytest.raises(ConfigError, match=f"{flag}: .* differs from the run being resumed"):
            merge_for_resume(
                saved, parse("--output-dir", "runs/a", flag, value), {flag[2:].replace("-", "_")}, "c"
            )
