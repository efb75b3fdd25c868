"""Finds the engine PEX for a run, building it with Pants when the driver runs from the source tree.

`./pants run src/driver:train` runs the driver PEX with the repository root as working directory. There the
engine PEX is (re)built with `./pants package src/engine:engine` (`src/engine:engine-gpu` for vLLM
on GPUs), which is a cache hit (~30 s, mostly
writing the ~5 GB PEX to dist/) unless engine code or the engine lockfile changed, so a run never uses a
stale engine. The nested Pants runs with PANTS_CONCURRENT=True: the outer `./pants run` still holds
pantsd, and a second client would otherwise wait for it and give up.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from driver.engine_pool import ENGINE_PEX_ENV, default_engine_pex

ENGINE_TARGET = "src/engine:engine"
# The CUDA vLLM engine (`engine-gpu` resolve), for `--backend vllm` on GPUs.
GPU_ENGINE_TARGET = "src/engine:engine-gpu"
# vLLM's CPU backend (`engine-cpu` resolve), for `--backend vllm` without accelerators and `--model`.
CPU_ENGINE_TARGET = "src/engine:engine-cpu"
# Variables of the driver's own PEX runtime that must not reach the nested Pants.
_PEX_VARS_PREFIX = "PEX"


class EngineBuildError(RuntimeError):
    """`./pants package src/engine:engine` failed."""


def source_tree(cwd: Path | None = None) -> Path | None:
    """The repository root if `cwd` (default: the working directory) is one: it has pants.toml, an
    executable ./pants and src/engine/BUILD. Else None."""
    root = (cwd or Path.cwd()).absolute()
    launcher = root / "pants"
    if (
        (root / "pants.toml").is_file()
        and (root / "src/engine/BUILD").is_file()
        and os.access(launcher, os.X_OK)
    ):
        return root
    return None


def pex_path(target: str) -> Path:
    """Where `./pants package TARGET` writes a pex_binary, relative to the repository root:
    "src/engine:engine-gpu" -> dist/src.engine/engine-gpu.pex."""
    directory, _, name = target.partition(":")
    return Path("dist") / directory.replace("/", ".") / f"{name}.pex"


def build_engine_pex(root: Path, target: str = ENGINE_TARGET) -> Path:
    """Runs `./pants package TARGET` in `root`, its output going to this process's stdout and stderr, and
    returns the built PEX (`root / pex_path(target)`).

    Raises:
        EngineBuildError: Pants failed (its exit status included).
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(_PEX_VARS_PREFIX)}
    env["PANTS_CONCURRENT"] = "True"
    started = time.monotonic()
    proc = subprocess.run(["./pants", "package", target], cwd=root, env=env, check=False)
    if proc.returncode != 0:
        raise EngineBuildError(
            f"`./pants package {target}` failed (exit status {proc.returncode}); see its output "
            "above, or pass --engine-pex with a prebuilt engine PEX and --no-build-engine"
        )
    print(f"engine PEX built in {time.monotonic() - started:.0f} s")
    return root / pex_path(target)


def resolve_engine_pex(engine_pex: str | None, build: bool, target: str = ENGINE_TARGET) -> Path:
    """The engine PEX to use: `engine_pex` if given; else, when `build` and running from the source
    tree, a fresh build of `target`; else $HERMETIC_ES_ENGINE_PEX or the target's PEX under dist/.

    Raises:
        EngineBuildError: the build failed.
    """
    if engine_pex:
        return Path(engine_pex).absolute()
    root = source_tree()
    if build and root is not None:
        print(f"building the engine PEX: ./pants package {target} (first build: ~8 min)")
        return build_engine_pex(root, target)
    if target == ENGINE_TARGET:
        return default_engine_pex()
    return Path(os.environ.get(ENGINE_PEX_ENV) or pex_path(target)).absolute()
