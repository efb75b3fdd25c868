"""Engine code comes from the engine PEX even when the driver's paths hold modules of the same name.

Ray prepends the driver's working directory and script directory to every worker's sys.path; a driver
started from a directory containing `toy_engine.py` would otherwise shadow the PEX's own module.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import ray

from driver.engine_pool import EnginePool, EngineSpec

TOY_PEX = Path("tests/toy-engine.pex").absolute()


@pytest.fixture(scope="module")
def driver_in_shadowing_directory(tmp_path_factory):
    shadow = tmp_path_factory.mktemp("shadow")
    (shadow / "toy_engine.py").write_text(
        "class ToyEngine:\n"
        "    def __init__(self, engine_id=0):\n"
        "        pass\n"
        "    def where(self):\n"
        "        return {'shadowed': True}\n"
    )
    previous = os.getcwd()
    os.chdir(shadow)
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield shadow
    ray.shutdown()
    os.chdir(previous)


def test_engine_modules_come_from_the_pex_not_the_driver(driver_in_shadowing_directory, tmp_path):
    spec = EngineSpec(
        pex=TOY_PEX,
        python=sys.executable,
        pex_root=str(tmp_path / "pex_root"),
        target="toy_engine:ToyEngine",
        startup_timeout_s=60,
    )
    pool = EnginePool.start(spec)
    try:
        assert "shadowed" not in pool.call("where")[0]
        report = pool.reports[0]
        assert str(driver_in_shadowing_directory) in report["removed_sys_path"]
        for name, path in report["module_files"].items():
            assert Path(path).is_relative_to(report["prefix"]), f"{name} loaded from {path}"
    finally:
        pool.shutdown()
