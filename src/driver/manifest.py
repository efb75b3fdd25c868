"""The run manifest: what exactly ran, so that a result can be traced to code, lockfiles and binaries.

One session entry per start (a resumed run adds one): the git revision (and whether the tree was dirty),
sha256 of the lockfiles found under 3rdparty/python/, the engine PEX's identity, the Python, Ray and
package versions seen in the driver and inside every engine actor, and what every engine computes on
(CPU model and instruction-set flags, torch's CPU kernel capability, thread counts, device), which decides
whether two runs can be bit-identical, the noise version (`shared.seeds.NOISE_VERSION`), and where the
session's weights started (`start`: the updates already applied and the weights' fingerprint).
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray

from shared.lockfile import LOCKFILES_DIR
from shared.run_layout import write_json_atomic
from shared.seeds import NOISE_VERSION


def sha256_file(path: Path) -> str:
    """The SHA-256 (hex) of a file's bytes."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def git_revision(cwd: Path) -> dict[str, Any] | None:
    """{"commit": sha, "dirty": bool} of the git checkout containing `cwd`, or None outside one."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(status.strip())}


def lockfile_hashes(cwd: Path) -> dict[str, str]:
    """sha256 of each 3rdparty/python/*.lock under `cwd` (empty outside the source tree)."""
    return {str(p.relative_to(cwd)): sha256_file(p) for p in sorted((cwd / LOCKFILES_DIR).glob("*.lock"))}


def engine_pex_identity(pex: Path) -> dict[str, Any]:
    """Identity of the engine PEX: path; sha256 of the file (zipapp layout) or, for the packed and loose
    (directory) layouts, sha256 of its PEX-INFO, which pins every wheel by hash and the project code by
    `code_hash`; plus PEX-INFO's pex_hash and code_hash."""
    info_path = pex / "PEX-INFO" if pex.is_dir() else None
    identity: dict[str, Any] = {"path": str(pex), "layout": "directory" if pex.is_dir() else "file"}
    if info_path is not None:
        identity["pex_info_sha256"] = sha256_file(info_path)
        info = json.loads(info_path.read_text())
    else:
        import zipfile

        identity["sha256"] = sha256_file(pex)
        with zipfile.ZipFile(pex) as zf:
            info = json.loads(zf.read("PEX-INFO"))
    identity["pex_hash"] = info.get("pex_hash")
    identity["code_hash"] = info.get("code_hash")
    identity["distributions"] = len(info.get("distributions", {}))
    return identity


def session_entry(
    argv: list[str],
    pex: Path,
    engine_reports: list[dict[str, Any]],
    engine_modules: list[dict[str, Any]],
    engine_machines: list[dict[str, Any]],
    start: dict[str, Any],
) -> dict[str, Any]:
    """One session of the manifest (see the module docstring). `engine_reports` are the pool's
    readiness reports, `engine_modules` each engine's `module_versions()`, `engine_machines` each
    engine's `LoadResult.machine` (CPU model and flags, torch's CPU kernels and threads, device);
    `start` is where the session's weights began: {"updates": int, "fingerprint": hex str}."""
    cwd = Path.cwd()
    return {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "argv": argv,
        "cwd": str(cwd),
        "git": git_revision(cwd),
        "lockfiles": lockfile_hashes(cwd),
        "engine_pex": engine_pex_identity(pex),
        "noise_version": NOISE_VERSION,
        "start": start,
        "driver": {
            "python": platform.python_version(),
            "executable": sys.executable,
            "hostname": platform.node(),
            "ray": ray.__version__,
            "numpy": np.__version__,
        },
        "engines": [
            {
                "hostname": report.get("hostname"),
                "python": report.get("python_full"),
                "prefix": report.get("prefix"),
                "ray": report.get("ray"),
                "packages": report.get("packages"),
                "modules": modules,
                "machine": machine,
            }
            for report, modules, machine in zip(engine_reports, engine_modules, engine_machines, strict=True)
        ],
    }


def append_session(path: Path, entry: dict[str, Any]) -> None:
    """Appends `entry` (`session_entry`) to the manifest at `path` ({"sessions": [...]}, created when
    missing), written atomically."""
    manifest = json.loads(path.read_text()) if path.exists() else {"sessions": []}
    manifest["sessions"].append(entry)
    write_json_atomic(path, manifest)
