"""Checks the engine PEX before any actor exists (`preflight`), which also pre-extracts it.

When a Ray worker cannot start from the engine PEX (missing file, bad interpreter, entry-point PEX, a Ray
version that crashes at import), the raylet retries forever and the driver hangs. So before any actor
exists the PEX is checked: readable, no entry point, room to extract it, runs as an interpreter, same Ray
version and Python minor as the driver. Running it extracts it into its venv under PEX_ROOT, which makes
later actor starts warm (`preflight(spec)["prefix"]` is that venv).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import ray

from driver.engine_spec import EngineSpec
from shared.engine_pex import ENGINE_PEX_ENV, ENGINE_PYTHON_ENV, PEX_ROOT_ENV, without_pex_vars

# Run inside the PEX by `inspect_pex`: stdlib only, so it reports even a PEX that lacks Ray or `shared`.
_INSPECT_SCRIPT = """
import json, sys
report = {"python": "%d.%d" % sys.version_info[:2], "executable": sys.executable, "prefix": sys.prefix}
try:
    import ray
    report["ray"] = ray.__version__
except Exception as e:
    report["ray"] = None
    report["ray_error"] = "%s: %s" % (type(e).__name__, e)
try:
    import shared.engine_host
    report["engine_host"] = True
except Exception as e:
    report["engine_host"] = False
    report["engine_host_error"] = "%s: %s" % (type(e).__name__, e)
print("HERMETIC_ES_REPORT=" + json.dumps(report))
"""


class EnginePreflightError(RuntimeError):
    """The engine PEX or its interpreter cannot work; raised before any actor is created."""


def venv_of(spec: EngineSpec, report: dict[str, Any], pex_hash: str | None) -> str | None:
    """The venv `inspect_pex` reported (`report["prefix"]`), relative to the spec's PEX_ROOT, if it is
    the venv of the PEX whose PEX-INFO has `pex_hash` (its own PEX-INFO has the same); else None."""
    prefix, root = Path(report["prefix"]), Path(os.path.expandvars(spec.pex_root)).absolute()
    try:
        venv_info = json.loads((prefix / "PEX-INFO").read_text())
        relative = prefix.relative_to(root)
    except (OSError, ValueError):
        return None
    same = pex_hash is not None and venv_info.get("pex_hash") == pex_hash
    return str(relative) if same and (prefix / "bin" / "python").exists() else None


def read_pex_info(pex: Path) -> dict[str, Any]:
    """Reads PEX-INFO from a PEX file (zipapp) or directory (packed/loose layout).

    Raises:
        EnginePreflightError: `pex` does not exist, is not readable, or has no readable PEX-INFO.
    """
    if not pex.exists():
        raise EnginePreflightError(
            f"engine PEX not found: {pex}. Build it with `./pants package src/engine:engine` "
            f"or point --engine-pex / ${ENGINE_PEX_ENV} at it."
        )
    try:
        if pex.is_dir():
            return json.loads((pex / "PEX-INFO").read_text())
        with zipfile.ZipFile(pex) as zf:
            return json.loads(zf.read("PEX-INFO"))
    except (OSError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as e:
        raise EnginePreflightError(f"{pex} is not a readable PEX (no valid PEX-INFO: {e})") from e


def extraction_bytes(pex: Path, pex_root: Path | None, info: dict[str, Any]) -> int:
    """Bytes that extracting `pex` into `pex_root` writes: the installed size of each of its wheels
    (PEX-INFO "distributions") not yet under PEX_ROOT/installed_wheels (every wheel when `pex_root` is
    None: an empty one), read from the zip directories (nothing is extracted)."""
    missing = {
        name
        for name, digest in info.get("distributions", {}).items()
        if pex_root is None or not (pex_root / "installed_wheels" / "0" / digest / name).exists()
    }
    total = 0
    if pex.is_dir():  # packed (.deps/<wheel> is a zip) or loose (.deps/<wheel>/ is a directory) layout
        for name in missing:
            wheel = pex / ".deps" / name
            if wheel.is_file():
                with zipfile.ZipFile(wheel) as zf:
                    total += sum(entry.file_size for entry in zf.infolist())
            elif wheel.is_dir():
                total += sum(f.stat().st_size for f in wheel.rglob("*") if f.is_file())
    else:  # zipapp: .deps/<wheel>/<file> entries
        with zipfile.ZipFile(pex) as zf:
            for entry in zf.infolist():
                parts = entry.filename.split("/")
                if len(parts) > 2 and parts[0] == ".deps" and parts[1] in missing:
                    total += entry.file_size
    return total


def check_free_space(spec: EngineSpec, info: dict[str, Any]) -> None:
    """Before a first extraction: the filesystem of PEX_ROOT on this node must have room for it
    (`extraction_bytes`), else Ray's worker start fails later with an unrelated-looking error.

    Raises:
        EnginePreflightError: naming PEX_ROOT, the free and the needed bytes.
    """
    root = Path(os.path.expandvars(spec.pex_root)).absolute()
    if (root / "venvs" / "1" / str(info.get("pex_hash"))).is_dir():
        return  # extracted already
    needed = extraction_bytes(spec.pex, root, info)
    existing = next(p for p in (root, *root.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise EnginePreflightError(no_space_message(str(root), free, needed, spec.pex))


def no_space_message(pex_root: str, free: int, needed: int, pex: Path) -> str:
    return (
        f"no space to extract the engine PEX {pex} into PEX_ROOT {pex_root}: {free / 1e9:.2f} GB free on "
        f"its filesystem, extracting needs about {needed / 1e9:.2f} GB. Free space there or point "
        f"--pex-root / ${PEX_ROOT_ENV} at a larger disk."
    )


def inspect_pex(spec: EngineSpec, timeout_s: float) -> dict[str, Any]:
    """Runs the PEX as an interpreter on this machine and returns what it reports about itself.

    The report has: python ("3.12"), executable, prefix, ray (version or None), ray_error,
    engine_host (bool). This also extracts the PEX into PEX_ROOT if it was not yet.

    Raises:
        EnginePreflightError: the interpreter does not exist, the PEX does not run, or it timed out.
    """
    cmd = [spec.python, str(spec.pex), "-c", _INSPECT_SCRIPT]
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=without_pex_vars(os.environ, os.path.expandvars(spec.pex_root)),
        )
    except FileNotFoundError as e:
        raise EnginePreflightError(
            f"engine interpreter {spec.python!r} does not exist ({e.strerror}). Install CPython "
            f"{sys.version_info.major}.{sys.version_info.minor} there or pass --engine-python / "
            f"${ENGINE_PYTHON_ENV}."
        ) from e
    except PermissionError as e:
        raise EnginePreflightError(f"engine interpreter {spec.python!r} is not executable: {e}") from e
    except subprocess.TimeoutExpired as e:
        raise EnginePreflightError(
            f"running {spec.pex} with {spec.python} did not finish within {timeout_s:.0f} s "
            "(a first extraction of a large PEX can take minutes: pre-extract it with "
            "`./pants run src/release:prepare-engine`)"
        ) from e
    for line in proc.stdout.splitlines():
        if line.startswith("HERMETIC_ES_REPORT="):
            return json.loads(line.split("=", 1)[1])
    raise EnginePreflightError(
        f"{spec.python} {spec.pex} does not run as an interpreter (exit code {proc.returncode}).\n"
        f"stderr (tail):\n{_tail(proc.stderr)}"
    )


def preflight(spec: EngineSpec, timeout_s: float | None = None) -> dict[str, Any]:
    """Checks that `spec` can start engines, before any actor is created. Returns `inspect_pex`'s report.

    Checks: the PEX exists and has a PEX-INFO; it has no entry point (Ray passes its worker arguments to
    an entry point); PEX_ROOT's filesystem has room to extract it (`check_free_space`); the interpreter
    runs it; Ray inside equals the driver's Ray; the Python minor inside
    equals the driver's; `shared.engine_host` imports inside. The report's "venv" is the PEX's venv on
    this node (`venv_of`), for `EngineSpec.venv`.

    Raises:
        EnginePreflightError: naming what is wrong and how to fix it.
    """
    info = read_pex_info(spec.pex)
    entry = info.get("entry_point") or info.get("script")
    if entry:
        raise EnginePreflightError(
            f"engine PEX {spec.pex} has an entry point ({entry!r}); Ray runs the PEX as an interpreter and "
            "would pass its worker arguments to it. Build the engine pex_binary without entry_point/script "
            "(src/engine:engine has none)."
        )
    check_free_space(spec, info)
    report = inspect_pex(spec, timeout_s if timeout_s is not None else max(60.0, spec.deadline_s))
    driver_python = f"{sys.version_info.major}.{sys.version_info.minor}"
    if report["python"] != driver_python:
        raise EnginePreflightError(
            f"engine PEX runs on Python {report['python']} ({spec.python}), the driver on {driver_python}; "
            "Ray needs the same Python minor version on both sides. Pass an interpreter of "
            f"Python {driver_python} with --engine-python / ${ENGINE_PYTHON_ENV}."
        )
    if report["ray"] is None:
        raise EnginePreflightError(
            f"engine PEX {spec.pex} cannot import ray ({report.get('ray_error')}); it must be built from "
            "the engine resolve, which locks the same ray as the driver: ./pants package src/engine:engine"
        )
    if report["ray"] != ray.__version__:
        raise EnginePreflightError(
            f"engine PEX has ray {report['ray']}, driver has {ray.__version__}: rebuild with "
            "./pants package src/engine:engine (both resolves must lock the same ray; see "
            "tests/test_lockfile_policy.py)"
        )
    if not report["engine_host"]:
        raise EnginePreflightError(
            f"engine PEX {spec.pex} lacks the shared engine host ({report.get('engine_host_error')}); "
            "build it from src/engine:engine, which includes src/shared"
        )
    report["venv"] = venv_of(spec, report, info.get("pex_hash"))
    return report


def _tail(text: str, lines: int = 20) -> str:
    return "\n".join("    " + line for line in text.strip().splitlines()[-lines:])
