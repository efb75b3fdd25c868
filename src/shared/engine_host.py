"""The Ray actor that hosts an engine inside the engine PEX, loaded by name.

The driver must never import engine code (its resolve lacks vLLM, JAX and torch by construction), yet it
creates the engine actors. It does so by wrapping `EngineHost` with `ray.remote`: Ray pickles this class by
reference (`shared.engine_host.EngineHost`), the worker started from the engine PEX imports it from its own
copy of `shared`, and `EngineHost.__init__` imports the engine class named by `target` there, in the
engine's environment. The host's typed methods are the `shared.protocol.Engine` interface, as Ray actor
methods (`handle.evaluate.remote(problems, request)`); `call` reaches any other public method of the
engine (diagnostics, test engines).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform
import sys
from typing import Any

from shared.protocol import (
    REPORTED_MODULES,
    CheckpointResult,
    LoadRequest,
    LoadResult,
    RolloutRequest,
    RolloutResult,
)

DEFAULT_ENGINE_TARGET = "engine.actor:EngineActor"


def load_target(target: str) -> type:
    """Imports and returns the class named by `target` ("package.module:ClassName").

    Raises:
        ValueError: `target` is not of the form "module:ClassName".
        ImportError / AttributeError: the module or class does not exist; any exception the module
            raises at import time propagates unchanged.
    """
    module_name, sep, class_name = target.partition(":")
    if not sep or not module_name or not class_name:
        raise ValueError(f"engine target {target!r} must look like 'package.module:ClassName'")
    module = importlib.import_module(module_name)
    return getattr(module, class_name)


# Top-level packages of this project; inside an engine they must come from the engine PEX.
PROJECT_PACKAGES = ("shared", "engine")


def _is_project_module(name: str) -> bool:
    return name.split(".")[0] in PROJECT_PACKAGES


def _inside(path: str, roots: set[str]) -> bool:
    real = os.path.realpath(path or os.curdir)
    return any(real == root or real.startswith(root + os.sep) for root in roots)


def isolate_from_driver_paths() -> list[str]:
    """Makes this process import only from its own interpreter and environment (the engine PEX's venv).

    Ray prepends the driver's script directory and working directory to every worker's sys.path (its
    `py_driver_sys_path`), so modules of the driver's environment could shadow the engine PEX's own.
    This removes sys.path entries outside sys.prefix / sys.base_prefix / sys.exec_prefix and unloads
    already-imported project modules (PROJECT_PACKAGES) that came from such entries.

    Returns the removed sys.path entries.
    """
    roots = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    kept: list[str] = []
    removed: list[str] = []
    for entry in sys.path:
        (kept if _inside(entry, roots) else removed).append(entry)
    sys.path[:] = kept
    for name, module in list(sys.modules.items()):
        origin = getattr(module, "__file__", None)
        if _is_project_module(name) and origin and not _inside(origin, roots):
            del sys.modules[name]
    importlib.invalidate_caches()
    return removed


def environment_report(packages: tuple[str, ...] = ()) -> dict[str, Any]:
    """Describes the running Python environment.

    Returns a JSON-serialisable dict: python (major.minor), python_full, executable, prefix, base_prefix,
    pid, hostname, ray (version or None) and `packages`: distribution name -> version, or None where the
    distribution is not installed.
    """
    try:
        import ray

        ray_version = ray.__version__
    except ImportError:
        ray_version = None
    versions = {}
    for name in packages:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "python_full": platform.python_version(),
        "executable": sys.executable,
        "prefix": sys.prefix,
        "base_prefix": sys.base_prefix,
        "pid": os.getpid(),
        "hostname": platform.node(),
        "ray": ray_version,
        "packages": versions,
    }


class EngineHost:
    """Hosts one engine object inside a Ray actor process.

    Args:
        target: "module:ClassName" of the engine class, imported inside the actor's environment.
        *args, **kwargs: passed to the engine class.

    Raises:
        Whatever importing or constructing the target raises; Ray reports it to the driver as the
        actor's creation error (the actor is not restarted).
    """

    def __init__(self, target: str = DEFAULT_ENGINE_TARGET, *args: Any, **kwargs: Any) -> None:
        self._target = target
        self._removed_paths = isolate_from_driver_paths()
        self._engine = load_target(target)(*args, **kwargs)

    def ready(self, packages: tuple[str, ...] = ()) -> dict[str, Any]:
        """The pool's readiness probe: `environment_report(packages)` plus the engine target,
        `module_files` (file of every loaded project module) and `removed_sys_path` (the driver's
        paths that Ray had put on this worker's sys.path)."""
        module_files = {
            name: getattr(module, "__file__", None)
            for name, module in sorted(sys.modules.items())
            if _is_project_module(name) or name == self._target.partition(":")[0]
        }
        return {
            "target": self._target,
            "module_files": module_files,
            "removed_sys_path": self._removed_paths,
            **environment_report(packages),
        }

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Calls `method` on the hosted engine and returns its result.

        Raises:
            AttributeError: the engine has no public method of that name.
        """
        if method.startswith("_"):
            raise AttributeError(f"engine method {method!r} is private")
        return getattr(self._engine, method)(*args, **kwargs)

    # The `shared.protocol.Engine` interface (documented there), delegated to the hosted engine.

    def ping(self) -> dict[str, int]:
        return self._engine.ping()

    def module_versions(self, modules: tuple[str, ...] = REPORTED_MODULES) -> dict[str, str | None]:
        return self._engine.module_versions(modules)

    def make_tiny_model(self, out_dir: str, seed: int = 0, warm_start_steps: int = 0) -> str:
        return self._engine.make_tiny_model(out_dir, seed=seed, warm_start_steps=warm_start_steps)

    def import_model(self, name: str, out_dir: str, dtype: str = "bfloat16") -> str:
        return self._engine.import_model(name, out_dir, dtype=dtype)

    def load_model(self, request: LoadRequest) -> LoadResult:
        return self._engine.load_model(request)

    def evaluate(self, problems: list[Any], request: RolloutRequest) -> RolloutResult:
        return self._engine.evaluate(problems, request)

    def evaluate_members(self, problems: list[Any], request: RolloutRequest) -> list[RolloutResult]:
        return self._engine.evaluate_members(problems, request)

    def apply_update(self, pairs: list[tuple[int, float]]) -> str:
        return self._engine.apply_update(pairs)

    def take_update_seconds(self) -> dict[str, float]:
        return self._engine.take_update_seconds()

    def fingerprint(self) -> str:
        return self._engine.fingerprint()

    def export_master(self) -> dict[str, Any]:
        return self._engine.export_master()

    def import_master(self, master: dict[str, Any]) -> str:
        return self._engine.import_master(master)

    def save_checkpoint(self, checkpoint_dir: str) -> CheckpointResult:
        return self._engine.save_checkpoint(checkpoint_dir)
