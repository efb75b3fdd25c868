"""Engine actors start from the real engine PEX (built by Pants) and see the engine resolve's packages,
while the driver process does not."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import ray
from engine_pex_root import ENGINE_PEX_ROOT, run_engine_pex
from locked import locked

from driver.engine_pool import EnginePool, EngineSpec

ENGINE_PEX = Path("src.engine/engine.pex")
PEX_ROOT = ENGINE_PEX_ROOT


def test_driver_process_lacks_engine_packages():
    for module in ("jax", "jaxlib", "libtpu", "vllm", "tpu_inference", "torch", "torch_xla"):
        assert importlib.util.find_spec(module) is None, f"{module} is importable in the driver"


def test_two_engines_start_from_the_engine_pex(ray_cluster):
    spec = EngineSpec(
        pex=ENGINE_PEX,
        python=sys.executable,
        pex_root=PEX_ROOT,
        num_engines=2,
        startup_timeout_s=120,
        cold_start_allowance_s=1200,
    )
    pool = EnginePool.start(spec, report_packages=("jax", "libtpu", "vllm-tpu", "ray"))
    try:
        for report in pool.reports:
            assert Path(report["executable"]).is_relative_to(PEX_ROOT)
            assert Path(report["prefix"]).is_relative_to(PEX_ROOT)
            assert report["python"] == f"{sys.version_info.major}.{sys.version_info.minor}"
            assert report["ray"] == ray.__version__
            for project in ("jax", "libtpu", "vllm-tpu"):
                assert report["packages"][project] == locked("engine", project)
            # Engine and shared code come from the PEX, never from the driver's paths.
            assert {"engine.actor", "shared.engine_host", "shared.countdown"} <= report["module_files"].keys()
            for name, path in report["module_files"].items():
                assert Path(path).is_relative_to(report["prefix"]), f"{name} loaded from {path}"
        versions = pool.call("module_versions", ("ray", "jax", "vllm", "transformers"))
        for v in versions:
            assert v["ray"] == ray.__version__
            assert v["jax"] == locked("engine", "jax")
            assert v["vllm"] is not None
        assert [p["engine_id"] for p in pool.call("ping")] == [0, 1]
    finally:
        pool.shutdown()


def test_doctor_passes_inside_the_engine_pex():
    proc = run_engine_pex(ENGINE_PEX, ["--driver-ray", ray.__version__], 600, PEX_MODULE="engine.doctor")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for line in (
        "jax           0.11.2",
        "libtpu        0.0.48",
        "vllm-tpu      0.32.0",
        "tpu-inference 0.32.0",
    ):
        assert line in out
    assert "[ok] jax 0.11.2 requires libtpu==0.0.48.*" in out
    assert "[ok] tpu-inference 0.32.0 requires libtpu==0.0.48" in out
    assert "[ok] vLLM flavour: TPU" in out and "[ok] no torch_xla" in out
    # JAX_PLATFORMS=cpu in tests: JAX reports the CPU rather than probing for a TPU.
    assert re.search(r"devices/jax\s+.*cpu", out, re.IGNORECASE), out
