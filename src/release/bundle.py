"""`./pants run src/release:bundle -- [--out dist/bundle] [--vm-python PATH]`: the release bundle.

A bundle is a directory that holds everything a TPU VM needs besides its CPython 3.12:
    train.pex                the driver PEX (zipapp)
    prepare-engine.pex       pre-extracts the engine PEX (zipapp)
    engine.pex/              the engine PEX (packed layout: one zip per wheel, so that an update that
                             changes only project code re-sends only the small code zip)
    install.py               the stdlib-only installer that verifies the bundle on each host
    bundle-manifest.json     sha256 and size of every file, the bundle id, lockfile hashes, git revision,
                             the versions locked (Python, Ray, JAX, libtpu, vLLM), the interpreter path the
                             hosts must have
The PEX files are built by `./pants package` (nested, as `train` builds the engine). A bundle is
reproducible: the same commit and lockfiles give the same file table and id (tools/check_reproducible.sh
rebuilds with empty caches and compares sha256s).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from driver.engine_build import EngineBuildError, pants_package, source_tree
from driver.manifest import git_revision, lockfile_hashes
from release import host_install
from shared.engine_pex import ENGINE_TARGET, pex_path
from shared.lockfile import LOCKFILES_DIR, LockfileError, locked_versions
from shared.run_layout import atomic_dir, write_json_atomic


def _artifact(target: str) -> tuple[str, str]:
    """(target, path under dist/) of a pex_binary target."""
    return target, str(pex_path(target).relative_to("dist"))


# Bundle file name -> (Pants target, path under dist/).
ARTIFACTS = {
    "train.pex": _artifact("src/driver:train"),
    "prepare-engine.pex": _artifact("src/release:prepare-engine"),
    "engine.pex": _artifact(ENGINE_TARGET),
}
# Distributions whose locked versions the manifest records, per resolve.
LOCKED = {
    "driver": ("ray", "numpy"),
    "engine": ("ray", "jax", "jaxlib", "libtpu", "vllm-tpu", "tpu-inference", "torch"),
}
# The single source of the Python versions and the hosts' interpreter path (see tests/test_pins.py).
PINS = Path("3rdparty/pins.json")


class BundleError(RuntimeError):
    """The bundle could not be built or described."""


def read_pins(root: Path) -> dict[str, str]:
    """The pins file of the source tree at `root`: {"python", "pants_python", "vm_python"}.

    Raises:
        BundleError: missing or unreadable.
    """
    try:
        return json.loads((root / PINS).read_text())
    except (OSError, ValueError) as e:
        raise BundleError(f"{root / PINS}: unreadable pins file: {e}") from e


def locked(root: Path) -> dict[str, dict[str, str | None]]:
    """{resolve: {distribution: locked version}} of the `LOCKED` distributions in `root`'s lockfiles.

    Raises:
        BundleError: a lockfile is unreadable.
    """
    try:
        return {
            resolve: locked_versions(root / LOCKFILES_DIR / f"{resolve}.lock", names)
            for resolve, names in LOCKED.items()
        }
    except (OSError, LockfileError, KeyError) as e:
        raise BundleError(f"not a readable Pants lockfile: {e}") from e


def make_manifest(bundle: Path, root: Path, vm_python: str, artifacts: list[str]) -> dict[str, Any]:
    """The manifest of the bundle directory `bundle` (whose artifacts are named `artifacts`), built from
    the source tree at `root`."""
    files = host_install.file_table(bundle)
    return {
        "format": 1,
        "id": host_install.bundle_id(files),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git": git_revision(root),
        "lockfiles": lockfile_hashes(root),
        "locked": locked(root),
        "python": read_pins(root)["python"],
        "vm_python": vm_python,
        "artifacts": {
            name: {
                "files": sum(1 for rel in files if rel == name or rel.startswith(name + "/")),
                "size": sum(
                    f["size"] for rel, f in files.items() if rel == name or rel.startswith(name + "/")
                ),
            }
            for name in artifacts
        },
        "files": files,
    }


def _link_target(source: str, target: str) -> None:
    """Hard-links the file `source` names, following a symlink (Linux's link(2), which `os.link` uses
    here, would link the symlink itself)."""
    os.link(os.path.realpath(source), target)


def assemble(
    dist: Path,
    out: Path,
    root: Path,
    vm_python: str,
    artifacts: dict[str, tuple[str, str]] = ARTIFACTS,
    link: bool = False,
) -> dict[str, Any]:
    """Copies the built artifacts from `dist` and the installer into a new bundle at `out` (replacing
    an older one atomically) and writes its manifest. Returns the manifest.

    Args:
        artifacts: bundle name -> (Pants target, path under `dist`); tests substitute small PEX files.
        link: hard-link instead of copying, for a `dist` that is never modified in place (a test
            sandbox); never for ./dist, which Pants rewrites.

    A symlink in an artifact (a packed PEX's `pex` -> `__main__.py`) becomes a regular file with its
    target's bytes: hosts install regular files only (`host_install.verify`).

    Raises:
        BundleError: an artifact is missing from `dist`.
    """
    missing = [str(dist / rel) for _, rel in artifacts.values() if not (dist / rel).exists()]
    if missing:
        targets = " ".join(t for t, _ in artifacts.values())
        raise BundleError(f"not built: {missing}; run ./pants package {targets}")
    with atomic_dir(out) as tmp:
        for name, (_, rel) in artifacts.items():
            source = dist / rel
            copy = _link_target if link else shutil.copy2
            if source.is_dir():
                shutil.copytree(source, tmp / name, symlinks=False, copy_function=copy)
            else:
                copy(source, tmp / name)
        shutil.copy2(host_install.__file__, tmp / host_install.INSTALLER)
        manifest = make_manifest(tmp, root, vm_python, list(artifacts))
        write_json_atomic(tmp / host_install.MANIFEST, manifest)
    return manifest


def build(root: Path) -> Path:
    """Runs `./pants package` of every artifact in `root`; returns root/dist.

    Raises:
        EngineBuildError: Pants failed.
    """
    pants_package(root, [target for target, _ in ARTIFACTS.values()])
    return root / "dist"


def main(argv: list[str] | None = None) -> int:
    """Runs the command; returns the exit status (0 built, 1 failed, 2 not in the source tree)."""
    parser = argparse.ArgumentParser(prog="bundle", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=Path("dist/bundle"), help="bundle directory (default: %(default)s)"
    )
    parser.add_argument(
        "--vm-python", help="CPython 3.12 on the hosts (default: vm_python of 3rdparty/pins.json)"
    )
    args = parser.parse_args(argv)
    root = source_tree()
    if root is None:
        print("bundle: run from the repository root (./pants run src/release:bundle)", file=sys.stderr)
        return 2
    try:
        vm_python = args.vm_python or read_pins(root)["vm_python"]
        manifest = assemble(build(root), args.out.absolute(), root, vm_python)
    except (BundleError, EngineBuildError, OSError) as e:
        print(f"bundle: {e}", file=sys.stderr)
        return 1
    total = sum(f["size"] for f in manifest["files"].values())
    print(f"bundle {manifest['id']}: {len(manifest['files'])} files, {total / 1e9:.2f} GB in {args.out}")
    for name, artifact in manifest["artifacts"].items():
        print(f"  {name}: {artifact['files']} files, {artifact['size'] / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
