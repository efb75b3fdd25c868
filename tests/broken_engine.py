"""An engine module that fails at import time, as a broken engine environment would."""

raise RuntimeError("broken_engine: simulated import-time failure of the engine module")
