"""TPU chips per engine: on a Ray cluster whose node has 4 TPU chips, engines that ask for 2 each
(`--engine-resources TPU=2`) see disjoint chips in `TPU_VISIBLE_CHIPS` inside the engine PEX's
interpreter, which libtpu (and so tpu-inference) reads at start-up. The chips are Ray's bookkeeping here
(no TPU is needed): what is tested is that Ray's per-actor chip assignment reaches the engine process that
Ray starts from the PEX through `py_executable`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import ray

from driver.engine_pool import EnginePool, EngineSpec

TOY_PEX = Path("tests/toy-engine.pex")


@pytest.fixture(scope="module")
def tpu_cluster():
    """A local Ray cluster whose node declares 4 TPU chips."""
    ray.init(num_cpus=4, resources={"TPU": 4}, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


def test_each_engine_sees_only_its_own_tpu_chips(tpu_cluster, tmp_path):
    spec = EngineSpec(
        pex=TOY_PEX,
        python=sys.executable,
        pex_root=str(tmp_path / "pex_root"),
        num_engines=2,
        num_cpus=1,
        resources={"TPU": 2},
        target="toy_engine:ToyEngine",
        startup_timeout_s=30,
    )
    pool = EnginePool.start(spec)
    try:
        chips = [set(where["tpu_visible_chips"].split(",")) for where in pool.call("where")]
    finally:
        pool.shutdown()
    assert [len(c) for c in chips] == [2, 2]
    assert chips[0] | chips[1] == {"0", "1", "2", "3"}
