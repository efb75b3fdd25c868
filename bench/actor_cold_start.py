"""Actor cold start to first method result: plain Ray workers vs the engine PEX vs runtime_env pip.

    ./pants run bench:actor_cold_start -- [--engine-pex P] [--pex-root R] [--skip-cold] [--skip-pip]

Without --engine-pex it finds or builds the engine PEX as `train` does (`./pants package
src/engine:engine` from the source tree), and checks it with the pool's preflight, so a missing or broken
PEX gives the preflight's error. Scenarios, each on a fresh local Ray cluster, timed from actor creation
to the result of its first call:
  plain         an actor in the driver's own environment; Ray usually hands it a prestarted idle worker;
  fresh         the same, but with its own env_vars, so Ray must start a new worker process for it (the
                fair baseline for any environment that is not the driver's);
  prepared-pex  an engine actor started through the engine PEX (`python3.12 engine.pex`) after the
                preflight extracted it into PEX_ROOT (how engines started before EngineSpec.venv);
  prepared      an engine actor as the pool starts it now: from the interpreter of the PEX's venv under
                PEX_ROOT, with no PEX bootstrap;
  cold          an engine actor from the engine PEX on an empty PEX_ROOT (includes extraction);
  pip           the approach this project replaces: runtime_env={"pip": <engine requirements>}, run from
                a driver in an ordinary virtualenv with ray installed by pip (Ray's pip plugin clones the
                driver's virtualenv, which a PEX venv does not support), time-boxed.
Each figure is printed as it is measured; a scenario that fails is reported as failed and the others
still run. Then the ratios (prepared/fresh, prepared-pex/fresh, pip/prepared, ...); `--json FILE` also
writes them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ray

from driver.engine_build import EngineBuildError, resolve_engine_pex
from driver.engine_pool import EnginePool, EngineSpec
from driver.engine_preflight import EnginePreflightError, preflight
from driver.engine_spec import default_python

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
requirements, box, temp_dir = json.loads(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
# Ray's session directory holds the pip environment it builds (~11 GB for the engine requirements):
# keep it inside the benchmark's temporary directory, which is removed afterwards.
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=temp_dir)

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
        [
            str(venv / "bin" / "python"),
            "-c",
            _PIP_DRIVER,
            json.dumps(requirements),
            str(box_s),
            str(workdir / "ray"),
        ],
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


def _measure(name: str, run, results: dict[str, float | None], failed: dict[str, str]) -> None:
    """Runs one scenario, prints its figure at once, and records it (or why it failed)."""
    try:
        results[name] = run()
    except Exception as e:  # a failed scenario is reported; the others still run
        failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        print(f"{name:<13} FAILED: {failed[name]}", flush=True)
        return
    seconds = results[name]
    shown = f"{seconds:10.2f} s" if seconds is not None else "   over the time box"
    print(f"{name:<13} {shown}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine-pex", help="default: build or find it as train does")
    parser.add_argument("--no-build-engine", action="store_true", help="never run ./pants package")
    parser.add_argument("--engine-python", default=default_python())
    parser.add_argument("--pex-root", help="PEX_ROOT of the prepared scenarios (default: a temporary one)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each warm scenario (median)")
    parser.add_argument("--pip-box", type=float, default=900.0, help="seconds allowed for the pip scenario")
    parser.add_argument("--skip-cold", action="store_true", help="skip the empty-PEX_ROOT scenario")
    parser.add_argument("--skip-pip", action="store_true")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)

    requirements = [
        line.strip()
        for line in ENGINE_REQUIREMENTS.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    results: dict[str, float | None] = {}
    failed: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="bench-pex-root-") as tmp:
        try:
            pex = resolve_engine_pex(args.engine_pex, build=not args.no_build_engine)
            through_pex = EngineSpec(
                pex=pex,
                python=args.engine_python,
                pex_root=args.pex_root or f"{tmp}/warm",
                startup_timeout_s=600,
            )
            report = preflight(through_pex, timeout_s=1800)
        except (EngineBuildError, EnginePreflightError) as e:
            print(f"actor_cold_start: {e}", file=sys.stderr)
            return 1
        direct = dataclasses.replace(through_pex, venv=report["venv"])
        print(f"engine PEX {pex}; venv {report['prefix']}", flush=True)
        print(f"{'scenario':<13} {'seconds':>12}", flush=True)
        _measure(
            "plain", lambda: statistics.median(time_plain() for _ in range(args.repeats)), results, failed
        )
        _measure(
            "fresh", lambda: statistics.median(time_fresh(i) for i in range(args.repeats)), results, failed
        )
        _measure(
            "prepared-pex",
            lambda: statistics.median(time_engine(through_pex) for _ in range(args.repeats)),
            results,
            failed,
        )
        _measure(
            "prepared",
            lambda: statistics.median(time_engine(direct) for _ in range(args.repeats)),
            results,
            failed,
        )
        if not args.skip_cold:
            cold = EngineSpec(
                pex=pex, python=args.engine_python, pex_root=f"{tmp}/cold", startup_timeout_s=1800
            )
            _measure("cold", lambda: time_engine(cold), results, failed)
    ray.shutdown()
    if not args.skip_pip:
        with tempfile.TemporaryDirectory(prefix="bench-pip-") as tmp:
            _measure(
                "pip",
                lambda: time_pip(requirements, args.pip_box, args.engine_python, Path(tmp)),
                results,
                failed,
            )

    ratios = {}
    for a, b in (
        ("prepared", "fresh"),
        ("prepared-pex", "fresh"),
        ("prepared", "plain"),
        ("pip", "prepared"),
    ):
        if results.get(a) is not None and results.get(b):
            ratios[f"{a}/{b}"] = results[a] / results[b]
    if "pip" in results and results["pip"] is None and results.get("prepared"):
        ratios["pip/prepared (lower bound)"] = args.pip_box / results["prepared"]
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}x")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"seconds": results, "ratios": ratios, "failed": failed}, indent=2) + "\n"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
