"""The engine object that `shared.engine_host.EngineHost` hosts inside each engine actor.

It runs in the engine PEX's environment (vLLM, JAX, libtpu, torch, transformers). The driver reaches it
only through `EngineHost.call(method, ...)`, by method name.
"""

from __future__ import annotations

import importlib
from typing import Any

# Modules whose presence and version the engine reports (module name, not distribution name).
ENGINE_MODULES = ("ray", "jax", "jaxlib", "vllm", "tpu_inference", "torch", "transformers", "numpy")


class EngineActor:
    """One rollout engine.

    Args:
        engine_id: index of this engine in the pool (0-based), used in logs and reports.
    """

    def __init__(self, engine_id: int = 0) -> None:
        self.engine_id = engine_id

    def module_versions(self, modules: tuple[str, ...] = ENGINE_MODULES) -> dict[str, str | None]:
        """Imports each module and returns module -> `__version__` (None where it has none).

        Raises:
            ImportError: a module is missing, i.e. the engine PEX is not the engine resolve.
        """
        versions = {}
        for name in modules:
            module = importlib.import_module(name)
            versions[name] = getattr(module, "__version__", None)
        return versions

    def ping(self) -> dict[str, Any]:
        """Returns {"engine_id": int}; a cheap liveness probe."""
        return {"engine_id": self.engine_id}
