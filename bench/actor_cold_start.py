"""Actor cold start to first method result: plain Ray workers vs the engine PEX vs runtime_env pip.

    ./pants package src/engine:engine
    ./pants run bench:actor_cold_start -- [--engine-pex dist/src.engine/engine.pex] [--pip-box 900]

Scenarios, each on a fresh local Ray cluster, timed from actor creation to the result of its first call:
  plain     an actor in the driver's own environment; Ray usually hands it a prestarted idle worker;
  fresh     the same, but with its own env_vars, so Ray must start a new worker process for it (the
            fair baseline for any environment that is not the driver's);
  prepared  an engine actor from the engine PEX after `prepare` extracted it into PEX_ROOT;
  cold      an engine actor from the engine PEX on an empty PEX_ROOT (includes extraction);
  pip       the approach this project replaces: runtime_env={"pip": <engine requirements>}, run from a
            driver in an ordinary virtualenv with ray installed by pip (Ray's pip plugin clones the
            driver's virtualenv, which a PEX venv does not support), time-boxed.
Prints a table and the ratios prepared/plain, prepared/fresh and pip/prepared; `--json FILE` also
writes them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ray

from driver.engine_pool import EnginePool, EngineSpec, default_engine_pex, default_python, prepare

ENGINE_REQUIREMENTS = Path("3rdparty/python/engine-requirements.txt")


def _fresh_ray() -> None:
    if ray.is_initialized():
        ray.shutdown()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)


def _probe_class():
    # Defined in a function so that cloudpickle ships it by value to any worker environment.
    class Probe:
        def ping(self) -> str:
            return sys.prefix

    return Probe


def time_plain() -> float:
    _fresh_ray()
    start = time.perf_counter()
    actor = ray.remote(_probe_class()).options(num_cpus=0).remote()
    ray.get(actor.ping.remote())
    return time.perf_counter() - start


def time_engine(spec: EngineSpec) -> float:
    _fresh_ray()
    start = time.perf_counter()
    pool = EnginePool.start(spec, check=False)
    pool.call("ping")
    elapsed = time.perf_counter() - start
    pool.shutdown()
    return elapsed


def time_fresh(index: int) -> float:
    _fresh_ray()
    start = time.perf_counter()
    env = {"env_vars": {"HERMETIC_ES_BENCH_FRESH_WORKER": str(index)}}
    actor = ray.remote(_probe_class()).options(num_cpus=0, runtime_env=env).remote()
    ray.get(actor.ping.remote())
    return time.perf_counter() - start


_PIP_DRIVER = """
import json, os, sys, time
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
import ray
requirements, box = json.loads(sys.argv[1]), float(sys.argv[2])
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)

@ray.remote(num_cpus=0)
class Probe:
    def ping(self):
        return sys.prefix

start = time.perf_counter()
actor = Probe.options(runtime_env={"pip": requirements}).remote()
try:
    ray.get(actor.ping.remote(), timeout=box)
    result = {"seconds": time.perf_counter() - start}
except ray.exceptions.GetTimeoutError:
    result = {"seconds": None}
print("RESULT=" + json.dumps(result))
"""


def time_pip(requirements: list[str], box_s: float, python: str, workdir: Path) -> float | None:
    """Seconds to first result with runtime_env pip from a pip-installed driver, None past `box_s`.

    Raises:
        RuntimeError: the pip scenario failed (its output is included).
    """
    venv = workdir / "pip-driver"
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", f"ray[default]=={ray.__version__}"], check=True
    )
    proc = subprocess.run(
        [str(venv / "bin" / "python"), "-c", _PIP_DRIVER, json.dumps(requirements), str(box_s)],
        capture_output=True,
        text=True,
        timeout=box_s + 300,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT="):
            return json.loads(line.split("=", 1)[1])["seconds"]
    raise RuntimeError(
        f"pip scenario failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine-pex", default=str(default_engine_pex()))
    parser.add_argument("--engine-python", default=default_python())
    parser.add_argument("--repeats", type=int, default=3, help="runs of plain and prepared (median)")
    parser.add_argument("--pip-box", type=float, default=900.0, help="seconds allowed for the pip scenario")
    parser.add_argument("--skip-pip", action="store_true")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)

    requirements = [
        line.strip()
        for line in ENGINE_REQUIREMENTS.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    results: dict[str, float | None] = {}
    with tempfile.TemporaryDirectory(prefix="bench-pex-root-") as tmp:
        warm = EngineSpec(
            pex=args.engine_pex, python=args.engine_python, pex_root=f"{tmp}/warm", startup_timeout_s=600
        )
        prepare(warm)
        results["plain"] = statistics.median(time_plain() for _ in range(args.repeats))
        results["fresh"] = statistics.median(time_fresh(i) for i in range(args.repeats))
        results["prepared"] = statistics.median(time_engine(warm) for _ in range(args.repeats))
        cold = EngineSpec(
            pex=args.engine_pex, python=args.engine_python, pex_root=f"{tmp}/cold", startup_timeout_s=1800
        )
        results["cold"] = time_engine(cold)
    ray.shutdown()
    if not args.skip_pip:
        with tempfile.TemporaryDirectory(prefix="bench-pip-") as tmp:
            results["pip"] = time_pip(requirements, args.pip_box, args.engine_python, Path(tmp))

    print(f"{'scenario':<10} {'seconds':>10}")
    for name, seconds in results.items():
        shown = f"{seconds:10.2f}" if seconds is not None else f"> {args.pip_box:.0f} (time box)"
        print(f"{name:<10} {shown}")
    ratios = {
        "prepared/plain": results["prepared"] / results["plain"],
        "prepared/fresh": results["prepared"] / results["fresh"],
    }
    if results.get("pip") is not None:
        ratios["pip/prepared"] = results["pip"] / results["prepared"]
    elif "pip" in results:
        ratios["pip/prepared (lower bound)"] = args.pip_box / results["prepared"]
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"seconds": results, "ratios": ratios}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
