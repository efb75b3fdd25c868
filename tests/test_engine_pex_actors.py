"""Engine actors start from the real engine PEX (built by Pants) and see the engine resolve's packages,
while the driver process does not."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import ray

from driver.engine_pool import EnginePool, EngineSpec

ENGINE_PEX = Path("src.engine/engine.pex")
# Persistent across runs (the engine PEX is ~5 GB of wheels): the first run extracts, later ones reuse.
PEX_ROOT = os.path.expanduser("~/.cache/hermetic-es/test-pex-root")


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
            assert report["packages"]["jax"] == "0.11.2"
            assert report["packages"]["libtpu"] == "0.0.48"
            assert report["packages"]["vllm-tpu"] == "0.32.0"
            # Engine and shared code come from the PEX, never from the driver's paths.
            assert {"engine.actor", "shared.engine_host", "shared.countdown"} <= report["module_files"].keys()
            for name, path in report["module_files"].items():
                assert Path(path).is_relative_to(report["prefix"]), f"{name} loaded from {path}"
        versions = pool.call("module_versions", ("ray", "jax", "vllm", "transformers"))
        for v in versions:
            assert v["ray"] == ray.__version__
            assert v["jax"] == "0.11.2"
            assert v["vllm"] is not None
        assert [p["engine_id"] for p in pool.call("ping")] == [0, 1]
    finally:
        pool.shutdown()
