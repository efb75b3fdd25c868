"""The PEX_ROOT that tests run the engine PEX files with.

Default: Pants' own pex cache (`~/.cache/pants/named_caches/pex_root`, Pants' default named-caches
directory). Building a packed engine PEX already installed each of its wheels there, under the same
install hash the PEX's runtime looks for, so the engines' venvs are made of links to those installed
wheels instead of a second copy of them (5-10 GB per engine PEX; pex's cache is safe to share between
concurrent processes). `HERMETIC_ES_TEST_PEX_ROOT` overrides it.
"""

from __future__ import annotations

import os

ENGINE_PEX_ROOT = os.environ.get("HERMETIC_ES_TEST_PEX_ROOT") or os.path.expanduser(
    "~/.cache/pants/named_caches/pex_root"
)
