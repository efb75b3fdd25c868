"""Engine pool: every way an engine environment can be broken gives a clear error, never a hang.

Uses a real local Ray cluster and small PEX files built by Pants from the driver resolve (tests:toy-engine,
tests:entry-point-engine); one PEX with a different Ray version is made here with the pex CLI.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import ray

import driver.engine_preflight
from driver.config_sources import build_parser
from driver.engine_diagnostics import ray_logs_dir
from driver.engine_pool import EnginePool, EngineSpec, EngineStartError
from driver.engine_preflight import EnginePreflightError, preflight, read_pex_info, venv_of

TOY_PEX = Path("tests/toy-engine.pex")
ENTRY_POINT_PEX = Path("tests/entry-point-engine.pex")
PYTHON = sys.executable


def spec(tmp_path: Path, **overrides) -> EngineSpec:
    values = dict(
        pex=TOY_PEX,
        python=PYTHON,
        pex_root=str(tmp_path / "pex_root"),
        num_engines=2,
        num_cpus=1,
        target="toy_engine:ToyEngine",
        startup_timeout_s=20,
    )
    values.update(overrides)
    return EngineSpec(**values)


def _tree(root: Path, depth: int = 3) -> set[str]:
    """Paths under `root` down to `depth` levels, without bytecode caches."""
    found = set()
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if len(rel.parts) <= depth and "__pycache__" not in rel.parts:
            found.add(str(rel))
    return found


def test_toy_engines_start_and_run_inside_the_pex(ray_cluster, tmp_path):
    pool = EnginePool.start(spec(tmp_path), report_packages=("ray",))
    try:
        assert len(pool.reports) == 2
        for report in pool.reports:
            assert report["ray"] == ray.__version__
            assert report["packages"] == {"ray": ray.__version__}
            # The actor's interpreter is the PEX's venv under our PEX_ROOT, not the driver's environment.
            assert Path(report["prefix"]).is_relative_to(tmp_path / "pex_root")
            assert report["prefix"] != sys.prefix
        where = pool.call("where")
        assert [w["engine_id"] for w in where] == [0, 1]
        assert all(Path(w["prefix"]).is_relative_to(tmp_path / "pex_root") for w in where)
    finally:
        pool.shutdown()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_gpus": 1}, "each engine asks for GPU=1, but the Ray cluster has GPU=0"),
        ({"resources": {"TPU": 4}}, "each engine asks for TPU=4, but the Ray cluster has TPU=0"),
    ],
)
def test_resources_the_cluster_lacks_fail_at_once_instead_of_pending(
    ray_cluster, tmp_path, overrides, message
):
    # The error names the resource (a pending actor would instead end in the deadline's message).
    with pytest.raises(EngineStartError, match=message):
        EnginePool.start(spec(tmp_path, **overrides))


def test_missing_pex_is_a_preflight_error(ray_cluster, tmp_path):
    with pytest.raises(EnginePreflightError, match=r"engine PEX not found: .*nowhere\.pex.*./pants package"):
        EnginePool.start(spec(tmp_path, pex=tmp_path / "nowhere.pex"))
    # Pre-extraction (the benchmarks) gives the same error, not a failed interpreter run.
    with pytest.raises(EnginePreflightError, match=r"engine PEX not found: .*nowhere\.pex"):
        preflight(spec(tmp_path, pex=tmp_path / "nowhere.pex"))


def test_directory_that_is_not_a_pex_is_a_preflight_error(ray_cluster, tmp_path):
    (tmp_path / "not.pex").mkdir()
    with pytest.raises(EnginePreflightError, match=r"not\.pex is not a readable PEX \(no valid PEX-INFO"):
        EnginePool.start(spec(tmp_path, pex=tmp_path / "not.pex"))


def test_entry_point_pex_is_a_preflight_error(ray_cluster, tmp_path):
    with pytest.raises(EnginePreflightError, match=r"has an entry point .*toy_engine"):
        EnginePool.start(spec(tmp_path, pex=ENTRY_POINT_PEX))


def test_missing_interpreter_is_a_preflight_error(ray_cluster, tmp_path):
    with pytest.raises(EnginePreflightError, match=r"interpreter '/nonexistent/python3.12' does not exist"):
        EnginePool.start(spec(tmp_path, python="/nonexistent/python3.12"))


def test_pex_with_another_ray_version_is_a_preflight_error(ray_cluster, tmp_path):
    fake = tmp_path / "src" / "ray"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('__version__ = "2.59.0"\n')
    old_ray_pex = tmp_path / "old-ray.pex"
    subprocess.run(
        [sys.executable, "-m", "pex", "--no-pypi", "-D", str(tmp_path / "src"), "-o", str(old_ray_pex)],
        check=True,
    )
    expected = rf"engine PEX has ray 2\.59\.0, driver has {ray.__version__}: rebuild with ./pants package"
    with pytest.raises(EnginePreflightError, match=expected):
        EnginePool.start(spec(tmp_path, pex=old_ray_pex))


@pytest.mark.timeout(120)
def test_engine_module_failing_at_import_is_reported(ray_cluster, tmp_path):
    with pytest.raises(EngineStartError, match=r"(?s)failed while starting.*simulated import-time failure"):
        EnginePool.start(spec(tmp_path, target="broken_engine:Engine"))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("broken", ["missing-pex", "missing-interpreter"])
def test_unstartable_worker_hits_the_deadline_instead_of_hanging(ray_cluster, tmp_path, broken):
    # Without the preflight, Ray retries the worker start forever; the deadline must end the wait.
    if broken == "missing-pex":
        bad = spec(tmp_path, pex=tmp_path / "gone.pex", num_engines=1, startup_timeout_s=15)
    else:
        bad = spec(tmp_path, python="/nonexistent/python3.12", num_engines=1, startup_timeout_s=15)
    with pytest.raises(EngineStartError, match=r"1 of 1 engine actors did not start within 15 s") as info:
        EnginePool.start(bad, check=False)
    message = str(info.value)
    # What Ray logged about the failed exec is in the error (raylet.err holds the exec's stderr).
    assert "Ray logged:" in message, message
    assert "raylet.err" in message and "No such file or directory" in message, message
    assert ("gone.pex" if broken == "missing-pex" else "/nonexistent/python3.12") in message, message
    # Every option the message tells users to raise exists (it once named --engine-cold-start-allowance).
    assert "--engine-start-timeout 15 s" in message, message
    option = r"(?<![\w-])--[a-z][a-z-]+"
    named = set(re.findall(option, message.split("Ray logged")[0]))  # Ray's own log has its worker's flags
    options = set(re.findall(option, build_parser().format_help()))
    assert named and named <= options, named - options
    # The cluster is still usable: a correct pool starts afterwards.
    EnginePool.start(spec(tmp_path, num_engines=1)).shutdown()


def test_pre_extraction_makes_the_actor_start_skip_extraction(ray_cluster, tmp_path):
    prepared = spec(tmp_path, num_engines=1)
    venv = preflight(prepared)["prefix"]
    assert Path(venv).is_relative_to(tmp_path / "pex_root")
    before = _tree(tmp_path / "pex_root")
    pool = EnginePool.start(prepared, check=False)
    try:
        assert pool.reports[0]["prefix"] == venv
        assert _tree(tmp_path / "pex_root") == before  # nothing was extracted or installed
    finally:
        pool.shutdown()


def test_a_preflighted_pool_starts_workers_from_the_venv_and_falls_back_to_the_pex(ray_cluster, tmp_path):
    """After the preflight, workers start from the PEX's venv interpreter (no PEX bootstrap per worker);
    where that venv is gone (a node that lacks it), they start through the PEX, which extracts it again."""
    pool = EnginePool.start(spec(tmp_path, num_engines=1))
    try:
        venv = tmp_path / "pex_root" / pool.spec.venv
        assert pool.spec.venv.startswith("venvs/") and (venv / "bin" / "python").exists()
        (where,) = pool.call("where")
        assert where["pex"] is None and Path(where["prefix"]) == venv
    finally:
        pool.shutdown()
    shutil.rmtree(venv)
    pool = EnginePool.start(pool.spec, check=False)
    try:
        (where,) = pool.call("where")
        assert where["pex"] == str(TOY_PEX.absolute()) and Path(where["prefix"]) == venv
    finally:
        pool.shutdown()


def test_a_venv_of_another_pex_is_not_used(ray_cluster, tmp_path):
    """The preflight only takes a venv whose PEX-INFO has this PEX's hash."""
    prepared = spec(tmp_path, num_engines=1)
    report = preflight(prepared)
    venv = tmp_path / "pex_root" / report["venv"]
    info = json.loads((venv / "PEX-INFO").read_text())
    (venv / "PEX-INFO").write_text(json.dumps({**info, "pex_hash": "0" * 40}))
    assert venv_of(prepared, report, read_pex_info(prepared.pex)["pex_hash"]) is None


def test_without_pre_extraction_the_actor_start_extracts(ray_cluster, tmp_path):
    # A cold start extracts the PEX first: the pool allows for it (cold_start_allowance_s), as runs do.
    cold = spec(tmp_path, num_engines=1, cold_start_allowance_s=120)
    assert not (tmp_path / "pex_root").exists()
    pool = EnginePool.start(cold, check=False)
    try:
        prefix = Path(pool.reports[0]["prefix"])
        assert prefix.is_relative_to(tmp_path / "pex_root") and prefix.is_dir()
    finally:
        pool.shutdown()


def test_prepare_engine_command(tmp_path, capsys):
    from release.prepare_engine import main

    root = tmp_path / "pex_root"
    args = ["--engine-pex", str(TOY_PEX), "--engine-python", PYTHON, "--pex-root", str(root)]
    assert main(args) == 0
    assert f"venv:   {root}" in capsys.readouterr().out
    assert main([*args[:1], str(tmp_path / "missing.pex"), *args[2:]]) == 1
    assert "engine PEX not found" in capsys.readouterr().err


def test_preflight_refuses_a_pex_root_without_room_to_extract(tmp_path, monkeypatch):
    """The free space of PEX_ROOT's filesystem (made small here) is checked against the installed size of
    the PEX's wheels before anything is extracted."""
    real = shutil.disk_usage
    monkeypatch.setattr(driver.engine_preflight.shutil, "disk_usage", lambda p: real(p)._replace(free=10**6))
    with pytest.raises(
        EnginePreflightError,
        match=r"no space to extract the engine PEX .* into PEX_ROOT .*: 0\.00 GB free on its filesystem, "
        r"extracting needs about [0-9.]+ GB",
    ):
        preflight(spec(tmp_path))
    assert not (tmp_path / "pex_root").exists()


def test_engines_the_cluster_has_no_room_for_time_out_naming_the_capacity(ray_cluster, tmp_path):
    """Each engine asks for 3 of the cluster's 4 CPUs: the second one never starts, and the error says
    that the capacity is missing (the total exists, so it is not refused up front)."""
    with pytest.raises(EngineStartError) as raised:
        EnginePool.start(spec(tmp_path, num_cpus=3, startup_timeout_s=5), check=True)
    message = str(raised.value)
    assert "the cluster had no free capacity for 2 engine(s) when they were requested" in message
    assert "they need CPU=6, free were CPU=4" in message


def test_rays_private_session_api_still_exists_in_the_locked_ray(ray_cluster):
    """`engine_diagnostics.ray_logs_dir`, the one use of Ray's private API, finds the session's logs through
    `ray._private.worker._global_node`: a Ray update that drops it fails here, not in a failed start."""
    node = getattr(ray._private.worker, "_global_node", None)
    assert node is not None, "ray._private.worker._global_node is gone from the locked Ray"
    assert ray_logs_dir() == Path(node.get_logs_dir_path())
    assert ray_logs_dir().is_dir()
