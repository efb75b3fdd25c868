"""Installs a shipped bundle on a host: verify every file, then switch to it; never half-updated.

This file is copied into every bundle as `install.py` and runs on the target host with the host's CPython
3.12 before anything else from the bundle runs, so it uses the standard library only. Layout on a host:

    DEST/releases/<bundle id>/   verified bundles (driver PEX, engine PEX, manifest, this installer)
    DEST/current                 symlink to the release in use, switched atomically
    DEST/.staging-<bundle id>/   where a transport writes an incoming bundle

`python3.12 install.py --staging DEST/.staging-ID --dest DEST [--prepare] [--fill-from-current]`:
  0. with --fill-from-current, hard-links the files the current release has unchanged (same sha256), so a
     sender only transfers the others (`--missing` prints their list, as JSON, and does nothing else);
  1. checks every file listed in staging's bundle-manifest.json (sha256 and size) and that nothing else is
     there; on any mismatch it prints the files that fail, deletes the staging directory and exits 1,
     leaving DEST/current as it was;
  2. renames the staging directory to DEST/releases/<id> and points DEST/current at it;
  3. with --prepare, extracts the engine PEX into its venv under PEX_ROOT so that engine actors start warm;
  4. prints the commands that start the Ray head and workers and the training run on this host.
Exit status: 0 installed, 1 verification or preparation failed, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

MANIFEST = "bundle-manifest.json"
INSTALLER = "install.py"
# This file is copied alone into every bundle and runs with the hosts' bare CPython (stdlib only), so it
# cannot import `shared`: these two are copies of shared.engine_pex's, which tests/test_ship.py compares.
DEFAULT_PEX_ROOT = "$HOME/.cache/hermetic-es/pex_root"
PEX_RUNTIME_VARS = (
    "PEX",
    "PEX_ROOT",
    "PEX_PATH",
    "PEX_INTERPRETER",
    "PEX_SCRIPT",
    "PEX_MODULE",
    "PEX_INHERIT_PATH",
)
# Files the manifest cannot list about itself.
UNLISTED = (MANIFEST,)


def sha256_file(path: Path) -> str:
    """SHA-256 (hex) of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_table(root: Path) -> dict[str, dict[str, object]]:
    """{relative POSIX path: {"sha256", "size" (bytes)}} of every regular file under `root`, sorted,
    without the manifest itself."""
    table = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel not in UNLISTED:
            table[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return table


def bundle_id(files: dict[str, dict[str, object]]) -> str:
    """The id of a bundle: the first 16 hex digits of sha256 over its sorted file table."""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]


def verify(root: Path, manifest: dict) -> list[str]:
    """Problems of the files under `root` against `manifest["files"]`: missing, wrong size, wrong sha256,
    or not listed. Empty when the directory is exactly the bundle."""
    problems = []
    listed = manifest["files"]
    for rel, expected in sorted(listed.items()):
        path = root / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
        elif path.stat().st_size != expected["size"]:
            problems.append(f"{rel}: size {path.stat().st_size}, expected {expected['size']}")
        elif sha256_file(path) != expected["sha256"]:
            problems.append(f"{rel}: sha256 differs from the manifest")
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel not in listed and rel not in UNLISTED:
            problems.append(f"{rel}: not in the manifest")
    if bundle_id(listed) != manifest.get("id"):
        problems.append(f"manifest id {manifest.get('id')!r} does not match its file table")
    return problems


def switch_current(dest: Path, release: Path) -> None:
    """Points dest/current at `release` atomically (a new symlink renamed over the old one)."""
    link = dest / "current"
    tmp = dest / f".current.{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(Path("releases") / release.name)
    os.replace(tmp, link)


def _current_files(dest: Path) -> dict[str, dict[str, object]]:
    try:
        return json.loads((dest / "current" / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError):
        return {}


def missing_files(staging: Path, dest: Path) -> list[str]:
    """Files of the staged manifest that neither staging nor the current release (same sha256) has:
    what a sender must still transfer."""
    wanted = json.loads((staging / MANIFEST).read_text())["files"]
    current = _current_files(dest)
    return [
        rel
        for rel, meta in sorted(wanted.items())
        if not (staging / rel).exists() and current.get(rel) != meta
    ]


def fill_from_current(staging: Path, dest: Path) -> int:
    """Hard-links into `staging` each file of its manifest that is absent there and that the current
    release has with the same sha256 (per the current manifest); returns how many. `verify` still checks
    every byte afterwards."""
    wanted = json.loads((staging / MANIFEST).read_text())["files"]
    current = _current_files(dest)
    linked = 0
    for rel, meta in wanted.items():
        target = staging / rel
        if not target.exists() and current.get(rel) == meta:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link((dest / "current" / rel).resolve(), target)
            linked += 1
    return linked


def install(staging: Path, dest: Path) -> Path:
    """Verifies `staging` and makes it the current release; returns the release directory.

    Raises:
        RuntimeError: verification failed (the message lists the problems); staging is removed and
            dest/current is left as it was.
    """
    try:
        manifest = json.loads((staging / MANIFEST).read_text())
        problems = verify(staging, manifest)
    except (OSError, ValueError, KeyError) as e:
        manifest, problems = None, [f"{MANIFEST}: unreadable ({e})"]
    if problems:
        shutil.rmtree(staging, ignore_errors=True)
        raise RuntimeError(
            f"{staging} does not match its manifest; nothing was installed, {dest / 'current'} is "
            "unchanged:\n" + "\n".join(f"  {p}" for p in problems)
        )
    releases = dest / "releases"
    releases.mkdir(parents=True, exist_ok=True)
    release = releases / manifest["id"]
    if release.exists():
        shutil.rmtree(staging)
    else:
        os.replace(staging, release)
    switch_current(dest, release)
    return release


def prepare(release: Path, python: str, pex_root: str, timeout_s: float = 1800.0) -> str:
    """Extracts the release's engine PEX into its venv under `pex_root`; returns the venv prefix.

    Raises:
        RuntimeError: the engine PEX does not run with `python` (its stderr included).
    """
    env = {k: v for k, v in os.environ.items() if k not in PEX_RUNTIME_VARS}
    env["PEX_ROOT"] = os.path.expandvars(os.path.expanduser(pex_root))
    cmd = [python, str(release / "engine.pex"), "-c", "import sys; print(sys.prefix)"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return proc.stdout.strip().splitlines()[-1]


def start_commands(dest: Path, python: str, pex_root: str) -> dict[str, str]:
    """The shell commands that start Ray and a run from dest/current on this host."""
    current = dest / "current"
    ray = f"PEX_SCRIPT=ray {shlex.quote(python)} {shlex.quote(str(current / 'train.pex'))}"
    train = (
        f"{shlex.quote(python)} {shlex.quote(str(current / 'train.pex'))} --address auto --no-build-engine "
        f"--engine-pex {shlex.quote(str(current / 'engine.pex'))} --engine-python {shlex.quote(python)} "
        f"--pex-root {shlex.quote(pex_root)}"
    )
    return {
        "ray_head": f"{ray} start --head --port=6379",
        "ray_worker": f"{ray} start --address=HEAD_IP:6379",
        "train": train,
    }


def main(argv: list[str] | None = None) -> int:
    """Runs the installer; returns the exit status (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="install.py", description="Verify and install a shipped bundle.")
    parser.add_argument("--staging", type=Path, required=True, help="directory the bundle was copied to")
    parser.add_argument("--dest", type=Path, required=True, help="install root (releases/, current)")
    parser.add_argument("--python", default=sys.executable, help="CPython 3.12 that runs the PEX files")
    parser.add_argument("--pex-root", default=DEFAULT_PEX_ROOT, help="PEX_ROOT for the engine venv")
    parser.add_argument("--prepare", action="store_true", help="pre-extract the engine PEX")
    parser.add_argument(
        "--missing", action="store_true", help="only print (JSON) the files the sender must still send"
    )
    parser.add_argument(
        "--fill-from-current",
        action="store_true",
        help="first hard-link unchanged files from the current release",
    )
    args = parser.parse_args(argv)
    # Expanded here, on the host: the printed commands must not carry a quoted, unexpandable "~".
    args.pex_root = os.path.expandvars(os.path.expanduser(args.pex_root))
    staging, dest = args.staging.absolute(), args.dest.absolute()
    if args.missing:
        try:
            print(json.dumps(missing_files(staging, dest)))
        except (OSError, ValueError, KeyError) as e:
            print(f"install: {staging / MANIFEST}: {e}", file=sys.stderr)
            return 1
        return 0
    try:
        if args.fill_from_current:
            print(f"linked {fill_from_current(staging, dest)} unchanged files from {dest / 'current'}")
        release = install(staging, dest)
        print(f"installed {release} (verified every file); {args.dest / 'current'} -> {release.name}")
        if args.prepare:
            print(f"engine venv ready: {prepare(release, args.python, args.pex_root)}")
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        print(f"install: {e}", file=sys.stderr)
        return 1
    for name, command in start_commands(args.dest.absolute(), args.python, args.pex_root).items():
        print(f"{name}: {command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
