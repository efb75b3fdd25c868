"""Finds the engine PEX for a run, building it with Pants when the driver runs from the source tree.

`./pants run src/driver:train` runs the driver PEX with the repository root as working directory. There the
engine PEX is (re)built with `./pants package TARGET` (`shared.engine_pex`: the TPU/transformers, GPU or
CPU engine), which is a cache hit (mostly writing the PEX to dist/) unless engine code or the engine
lockfile changed, so a run never uses a stale engine. The nested Pants runs with PANTS_CONCURRENT=True:
the outer `./pants run` still holds pantsd, and a second client would otherwise wait for it and give up.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from shared.engine_pex import ENGINE_PEX_ENV, ENGINE_TARGET, pex_path, without_pex_vars


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


def pants_package(root: Path, targets: list[str]) -> None:
    """Runs `./pants package TARGETS` in the source tree `root` (a nested Pants: PANTS_CONCURRENT, no PEX
    runtime variables of this process), its output going to this process's stdout and stderr.

    Raises:
        EngineBuildError: Pants failed (its exit status included).
    """
    env = without_pex_vars(os.environ)
    env["PANTS_CONCURRENT"] = "True"
    proc = subprocess.run(["./pants", "package", *targets], cwd=root, env=env, check=False)
    if proc.returncode != 0:
        raise EngineBuildError(
            f"`./pants package {' '.join(targets)}` failed (exit status {proc.returncode}); "
            "see its output above"
        )


def build_engine_pex(root: Path, target: str = ENGINE_TARGET) -> Path:
    """Builds the engine PEX `target` in `root` (`pants_package`) and returns it (`root / pex_path(target)`).

    Raises:
        EngineBuildError: Pants failed; the message says how to run from a prebuilt PEX instead.
    """
    started = time.monotonic()
    try:
        pants_package(root, [target])
    except EngineBuildError as e:
        raise EngineBuildError(
            f"{e}; or pass --engine-pex with a prebuilt engine PEX and --no-build-engine"
        ) from e
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
        print(f"building the engine PEX: ./pants package {target} (the first build takes minutes)")
        return build_engine_pex(root, target)
    return Path(os.environ.get(ENGINE_PEX_ENV) or pex_path(target)).absolute()
