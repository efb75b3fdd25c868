"""`./pants run src/release:prepare-engine -- [--engine-pex P] [--engine-python PY] [--pex-root R]`

Pre-extracts the engine PEX into its venv under PEX_ROOT on this node, so that engine actors started later
with the same PEX, interpreter and PEX_ROOT skip extraction (a multi-GB engine PEX takes minutes to
extract on an empty PEX_ROOT). Run it once per node after shipping a new engine PEX. It also runs the
preflight checks, so a node that cannot start engines is found here rather than by a hung actor.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from driver.engine_preflight import EnginePreflightError, preflight
from driver.engine_spec import EngineSpec, default_engine_pex, default_pex_root, default_python


def main(argv: list[str] | None = None) -> int:
    """Runs the command; returns the exit status (0 prepared, 1 preflight failed)."""
    parser = argparse.ArgumentParser(prog="prepare-engine", description=__doc__.split("\n\n")[1])
    parser.add_argument(
        "--engine-pex", default=str(default_engine_pex()), help="engine PEX (default: %(default)s)"
    )
    parser.add_argument(
        "--engine-python", default=default_python(), help="interpreter (default: %(default)s)"
    )
    parser.add_argument("--pex-root", default=default_pex_root(), help="PEX_ROOT (default: %(default)s)")
    parser.add_argument(
        "--timeout", type=float, default=1800.0, help="seconds allowed for extraction (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    spec = EngineSpec(pex=args.engine_pex, python=args.engine_python, pex_root=args.pex_root)
    started = time.monotonic()
    try:
        report = preflight(spec, timeout_s=args.timeout)
    except EnginePreflightError as e:
        print(f"prepare-engine: {e}", file=sys.stderr)
        return 1
    print(
        f"prepared {spec.pex} in {time.monotonic() - started:.1f} s\n"
        f"  venv:   {report['prefix']}\n"
        f"  python: {report['python']}, ray {report['ray']}\n"
        f"  PEX_ROOT={os.path.expandvars(spec.pex_root)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
