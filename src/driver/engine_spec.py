"""How engine actors are started: `EngineSpec` (the engine PEX, its interpreter and PEX_ROOT, the Ray
resources per engine, the start deadline) and the command Ray execs as their interpreter.

Ray starts an actor whose runtime_env is `{"py_executable": CMD}` by running
`bash -c "exec CMD <ray>/_private/workers/default_worker.py ..."` on the node: the engine PEX acts as the
interpreter of Ray's worker script, so `import ray`, `jax` or `vllm` inside the actor resolve to the PEX's
locked copies (`EngineSpec.py_executable`).
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from shared.engine_host import DEFAULT_ENGINE_TARGET
from shared.engine_pex import (
    DEFAULT_PEX_ROOT,
    ENGINE_PEX_ENV,
    ENGINE_PYTHON_ENV,
    ENGINE_TARGET,
    PEX_ROOT_ENV,
    PEX_RUNTIME_VARS,
    pex_path,
)

# Where `./pants package src/engine:engine` writes the engine PEX, relative to the repository root.
DEFAULT_ENGINE_PEX = pex_path(ENGINE_TARGET)


@dataclass(frozen=True)
class EngineSpec:
    """How to start the engines.

    Attributes:
        pex: path of the engine PEX (a file, or a directory for the packed layout); made absolute.
        python: the CPython 3.12 that runs the PEX on every node (named explicitly, never the PEX shebang).
        pex_root: PEX_ROOT on every node; may contain `$VARS`, expanded by bash on each node.
        num_engines: number of engine actors.
        num_cpus / num_gpus: Ray resources per engine actor (logical units).
        resources: extra custom Ray resources per engine actor, e.g. {"TPU": 4}.
        target: "module:Class" of the engine, imported inside the actor.
        startup_timeout_s: seconds, from actor creation to all ready, for a node whose PEX is extracted.
        cold_start_allowance_s: extra seconds allowed when the PEX may still need extracting into
            PEX_ROOT on some node (a multi-GB engine PEX takes minutes on an empty PEX_ROOT); 0 when
            every node's PEX was extracted (`engine_preflight.preflight`, `install.py --prepare`).
        venv: the PEX's venv relative to PEX_ROOT (`venvs/1/<pex_hash>/<interpreter>`), as
            `engine_preflight.preflight` found and verified it; None to always start through the PEX. Where a
            node has it, workers start from the venv's interpreter directly, so no PEX bootstrap runs per
            worker; where it does not, they start through the PEX, which extracts it. The path holds the PEX's
            hash, so a venv of another PEX is never used.
    """

    pex: Path
    python: str
    pex_root: str = DEFAULT_PEX_ROOT
    num_engines: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)
    target: str = DEFAULT_ENGINE_TARGET
    startup_timeout_s: float = 45.0
    cold_start_allowance_s: float = 0.0
    venv: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "pex", Path(self.pex).absolute())
        if self.num_engines < 1:
            raise ValueError(f"num_engines must be >= 1, got {self.num_engines}")
        if self.startup_timeout_s <= 0 or self.cold_start_allowance_s < 0:
            raise ValueError("startup_timeout_s must be > 0 and cold_start_allowance_s >= 0")

    @property
    def deadline_s(self) -> float:
        """Seconds the pool waits for all engines to be ready."""
        return self.startup_timeout_s + self.cold_start_allowance_s

    def py_executable(self) -> str:
        """The command Ray execs as the worker's interpreter (bash expands `$VARS` on the node): the
        venv's interpreter if `venv` is set and exists on the node, else `python engine.pex`."""
        unset = " ".join(f"-u {name}" for name in PEX_RUNTIME_VARS)
        run = f"env {unset} PEX_ROOT={_dq(self.pex_root)}"
        through_pex = f"{_dq(self.python)} {_dq(str(self.pex))}"
        if self.venv is None:
            return f"{run} {through_pex}"
        venv_python = _dq(f"{self.pex_root}/{self.venv}/bin/python")
        return f"{run} /bin/sh -c '{_VENV_OR_PEX}' {_dq(self.python)} {venv_python} {_dq(str(self.pex))}"


# Run by /bin/sh with $0 = python, $1 = the venv's interpreter, $2 = the PEX, then Ray's worker arguments.
_VENV_OR_PEX = 'if [ -x "$1" ]; then v="$1"; shift 2; exec "$v" "$@"; fi; shift; exec "$0" "$@"'


def _dq(value: str) -> str:
    """Double-quotes for bash: protects spaces, keeps `$VAR` expansion."""
    return '"' + re.sub(r'(["\\`])', r"\\\1", value) + '"'


def default_engine_pex() -> Path:
    """$HERMETIC_ES_ENGINE_PEX, else `DEFAULT_ENGINE_PEX` under the current directory."""
    return Path(os.environ.get(ENGINE_PEX_ENV) or DEFAULT_ENGINE_PEX).absolute()


def default_python() -> str:
    """$HERMETIC_ES_ENGINE_PYTHON, else the base interpreter under the driver (same Python minor)."""
    if os.environ.get(ENGINE_PYTHON_ENV):
        return os.environ[ENGINE_PYTHON_ENV]
    base = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    return str(base if base.exists() else Path(sys._base_executable))


def default_pex_root() -> str:
    """$HERMETIC_ES_PEX_ROOT, else `$HOME/.cache/hermetic-es/pex_root` (expanded on each node)."""
    return os.environ.get(PEX_ROOT_ENV) or DEFAULT_PEX_ROOT
