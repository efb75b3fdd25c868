"""A minimal engine class for engine-pool tests; packaged into tests:toy-engine (driver resolve)."""

from __future__ import annotations

import os
import sys


class ToyEngine:
    """Answers `where()` with the interpreter and prefix the actor runs in, and the TPU chips Ray gave it."""

    def __init__(self, engine_id: int = 0) -> None:
        self.engine_id = engine_id

    def where(self) -> dict[str, str | int]:
        return {
            "engine_id": self.engine_id,
            "executable": sys.executable,
            "prefix": sys.prefix,
            "tpu_visible_chips": os.environ.get("TPU_VISIBLE_CHIPS"),
            # Set by the PEX bootstrap; absent when the worker started from the venv's interpreter.
            "pex": os.environ.get("PEX"),
        }
