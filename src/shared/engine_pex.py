"""Where engine PEX files come from and how one runs: Pants targets, their paths under dist/, PEX_ROOT and
the PEX runtime variables that must not leak from one PEX (the driver's) into another (the engine's).

The driver (pool, preflight, build), the release tools (bundle, ship, prepare-engine) and the tests all
read these names from here. The stdlib-only installer (`release.host_install`) cannot import them and
keeps its own copy of `DEFAULT_PEX_ROOT`; a test checks that the two agree.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

# The engine pex_binary targets, one per engine resolve (src/engine/BUILD).
ENGINE_TARGET = "src/engine:engine"  # TPU VMs (vllm-tpu, JAX, libtpu) and the transformers backend
GPU_ENGINE_TARGET = "src/engine:engine-gpu"  # CUDA vLLM
CPU_ENGINE_TARGET = "src/engine:engine-cpu"  # vLLM's CPU backend and the packaged pretrained model

# Environment variables that choose the engine PEX, its interpreter and PEX_ROOT.
ENGINE_PEX_ENV = "HERMETIC_ES_ENGINE_PEX"
ENGINE_PYTHON_ENV = "HERMETIC_ES_ENGINE_PYTHON"
PEX_ROOT_ENV = "HERMETIC_ES_PEX_ROOT"

# PEX_ROOT on every node; `$HOME` is expanded there (by bash, or by the installer), so each node uses its
# own persistent cache of extracted engine venvs.
DEFAULT_PEX_ROOT = "$HOME/.cache/hermetic-es/pex_root"

# Variables a running PEX sets or reads that would change what another PEX runs: the driver is itself a
# PEX, and an engine PEX started with these from its environment would run the driver's entry point or
# path. PEX_ROOT is set explicitly wherever a PEX is started.
PEX_RUNTIME_VARS = (
    "PEX",
    "PEX_ROOT",
    "PEX_PATH",
    "PEX_INTERPRETER",
    "PEX_SCRIPT",
    "PEX_MODULE",
    "PEX_INHERIT_PATH",
)


def pex_path(target: str) -> Path:
    """Where `./pants package TARGET` writes a pex_binary, relative to the repository root:
    "src/engine:engine-gpu" -> dist/src.engine/engine-gpu.pex."""
    directory, _, name = target.partition(":")
    return Path("dist") / directory.replace("/", ".") / f"{name}.pex"


def without_pex_vars(environ: Mapping[str, str], pex_root: str | None = None) -> dict[str, str]:
    """A copy of `environ` without `PEX_RUNTIME_VARS`, with PEX_ROOT set to `pex_root` when given (used
    as is: expand `$VARS` first where no shell will)."""
    env = {k: v for k, v in environ.items() if k not in PEX_RUNTIME_VARS}
    if pex_root is not None:
        env["PEX_ROOT"] = pex_root
    return env
