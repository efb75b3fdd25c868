"""The PEX_ROOT that tests run the engine PEX files with.

Default: Pants' own pex cache (`~/.cache/pants/named_caches/pex_root`, Pants' default named-caches
directory). Building a packed engine PEX already installed each of its wheels there, under the same
install hash the PEX's runtime looks for, so the engines' venvs are made of links to those installed
wheels instead of a second copy of them (5-10 GB per engine PEX; pex's cache is safe to share between
concurrent processes). `HERMETIC_ES_TEST_PEX_ROOT` overrides it. Also how tests run a PEX file as a
process (`pex_env`, `run_engine_pex`).
"""

from __future__ import annotations

import os
import subprocess
import sys

ENGINE_PEX_ROOT = os.environ.get("HERMETIC_ES_TEST_PEX_ROOT") or os.path.expanduser(
    "~/.cache/pants/named_caches/pex_root"
)


def pex_env(pex_root: str = ENGINE_PEX_ROOT, **extra: str) -> dict[str, str]:
    """This process's environment for running a PEX: without any PEX* variable (the test runner is itself
    a PEX, and Pants sets PEX_EXTRA_SYS_PATH and friends for it), with PEX_ROOT and `extra` set."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PEX")} | {"PEX_ROOT": pex_root, **extra}


def run_engine_pex(
    pex: str | os.PathLike, args: list[str], timeout: float, **extra: str
) -> subprocess.CompletedProcess:
    """Runs `<this interpreter> PEX ARGS` with `pex_env(**extra)` (e.g. PEX_MODULE=engine.doctor);
    stdout and stderr captured as text."""
    return subprocess.run(
        [sys.executable, str(pex), *args],
        capture_output=True,
        text=True,
        env=pex_env(**extra),
        timeout=timeout,
    )
