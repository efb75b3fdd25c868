"""Installs a shipped bundle on a host: verify every file, then switch to it; never half-updated.

This file is copied into every bundle as `install.py` and runs on the target host with the host's CPython
3.12 before anything else from the bundle runs, so it uses the standard library only. Layout on a host:

    DEST/releases/<bundle id>/   verified bundles (driver PEX, engine PEX, manifest, this installer)
    DEST/current                 symlink to the release in use, switched atomically
    DEST/.staging-<bundle id>/   where a transport writes an incoming bundle

`python3.12 install.py --staging DEST/.staging-ID --dest DEST --expect-id ID --expect-manifest-sha256 H
[--prepare] [--fill-from-current]`:
  0. checks that the staged bundle is the one the build machine made: its manifest's id is --expect-id
     and the manifest file's sha256 is --expect-manifest-sha256 (`ship` passes both; anything that
     rewrote a file and the manifest together, consistently, changes them); and that every path the
     manifest names is relative, normalised and inside the staging directory;
  1. with --fill-from-current, hard-links the files the current release has unchanged (same sha256), so a
     sender only transfers the others (`--missing` prints their list, as JSON, and does nothing else);
  2. checks every file listed in staging's bundle-manifest.json (a regular file, no symlink; sha256 and
     size) and that nothing else is there; on any mismatch (or a failed check of step 0) it prints what
     fails, deletes the staging directory and exits 1, leaving DEST/current as it was;
  3. renames the staging directory to DEST/releases/<id> and points DEST/current at it;
  4. with --prepare, extracts the engine PEX into its venv under PEX_ROOT so that engine actors start warm;
  5. prints the commands that start the Ray head and workers and the training run on this host.
Exit status: 0 installed, 1 verification or preparation failed, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import posixpath
import shlex
import shutil
import stat
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


class BundleRefused(RuntimeError):
    """The staged bundle is not the one expected, or its manifest is malformed; nothing was installed."""


def path_problem(rel: object) -> str | None:
    """Why `rel` cannot be a file path of a manifest, or None: it must be a non-empty, relative,
    normalised POSIX path (no "..", ".", empty or absolute parts), so it stays inside the bundle."""
    if not isinstance(rel, str) or not rel:
        return f"{rel!r}: a path must be a non-empty string"
    if rel.startswith("/"):
        return f"{rel!r}: an absolute path; paths are relative to the bundle"
    parts = rel.split("/")
    if ".." in parts or "." in parts or "" in parts or posixpath.normpath(rel) != rel or "\0" in rel:
        return f"{rel!r}: not a normalised relative path (no '..', '.', '//' or trailing '/')"
    return None


def manifest_files(manifest: object) -> dict[str, dict[str, object]]:
    """The file table of a manifest, checked: {path: {"sha256": 64 hex digits, "size": bytes}}, every
    path safe (`path_problem`).

    Raises:
        BundleRefused: the manifest or a row of its table is malformed (each problem named).
    """
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise BundleRefused(f'{MANIFEST}: expected an object with a "files" table')
    problems = []
    for rel, meta in manifest["files"].items():
        why = path_problem(rel)
        if why is None and rel in UNLISTED:
            why = f"{rel!r}: the manifest cannot list itself"
        if why is None and not (
            isinstance(meta, dict)
            and isinstance(meta.get("sha256"), str)
            and len(meta["sha256"]) == 64
            and isinstance(meta.get("size"), int)
            and meta["size"] >= 0
        ):
            why = f'{rel!r}: expected {{"sha256": 64 hex digits, "size": bytes}}, found {meta!r}'
        if why is not None:
            problems.append(why)
    if problems:
        raise BundleRefused(
            f"{MANIFEST}: unsafe or malformed file table:\n" + "\n".join(f"  {p}" for p in problems)
        )
    return manifest["files"]


def _entries(root: Path) -> list[tuple[str, os.stat_result]]:
    """(relative POSIX path, lstat) of every entry under `root` that is not a real directory: regular
    files, and symlinks (to files or directories), devices, FIFOs and sockets, none of them followed."""
    found = []
    for top, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            path = Path(top) / name
            info = path.lstat()
            if not stat.S_ISDIR(info.st_mode):
                found.append((path.relative_to(root).as_posix(), info))
    return sorted(found, key=lambda entry: entry[0])


def verify(root: Path, manifest: dict) -> list[str]:
    """Problems of the entries under `root` against `manifest["files"]`: missing, not a regular file (a
    symlink, a device, ...), wrong size, wrong sha256, or not listed; and a manifest whose id does not
    match its file table. Empty when the directory is exactly the bundle.

    Raises:
        BundleRefused: the manifest's file table is malformed or names an unsafe path (`manifest_files`).
    """
    problems = []
    listed = manifest_files(manifest)
    entries = dict(_entries(root))
    for rel, expected in sorted(listed.items()):
        info = entries.get(rel)
        if info is None:
            problems.append(f"{rel}: missing")
        elif not stat.S_ISREG(info.st_mode):
            problems.append(
                f"{rel}: not a regular file ({stat.filemode(info.st_mode)}); symlinks are refused"
            )
        elif info.st_size != expected["size"]:
            problems.append(f"{rel}: size {info.st_size}, expected {expected['size']}")
        elif sha256_file(root / rel) != expected["sha256"]:
            problems.append(f"{rel}: sha256 differs from the manifest")
    for rel, info in entries.items():
        if rel not in listed and rel not in UNLISTED:
            problems.append(f"{rel}: not in the manifest")
        elif rel in UNLISTED and not stat.S_ISREG(info.st_mode):
            problems.append(f"{rel}: not a regular file")
    if bundle_id(listed) != manifest.get("id"):
        problems.append(f"manifest id {manifest.get('id')!r} does not match its file table")
    return problems


def expected_bundle(staging: Path, expect_id: str | None, expect_manifest_sha256: str | None) -> dict:
    """The staged manifest, after checking that it is the bundle the build machine made: its id is
    `expect_id` and the manifest file's sha256 is `expect_manifest_sha256` (each checked when given).

    Raises:
        BundleRefused: another bundle (both ids, or both digests, named), or an unreadable manifest.
    """
    try:
        data = (staging / MANIFEST).read_bytes()
        manifest = json.loads(data)
    except (OSError, ValueError) as e:
        raise BundleRefused(f"{staging / MANIFEST}: unreadable ({e})") from e
    manifest_files(manifest)
    if expect_id is not None and manifest.get("id") != expect_id:
        raise BundleRefused(
            f"{staging} holds bundle {manifest.get('id')!r}, but the build machine sent bundle "
            f"{expect_id!r} (--expect-id): refused"
        )
    digest = hashlib.sha256(data).hexdigest()
    if expect_manifest_sha256 is not None and digest != expect_manifest_sha256:
        raise BundleRefused(
            f"{staging / MANIFEST} has sha256 {digest}, but the build machine's manifest has "
            f"{expect_manifest_sha256} (--expect-manifest-sha256): refused"
        )
    return manifest


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
        return manifest_files(json.loads((dest / "current" / MANIFEST).read_text()))
    except (OSError, ValueError, BundleRefused):
        return {}


def missing_files(
    staging: Path, dest: Path, expect_id: str | None = None, expect_sha256: str | None = None
) -> list[str]:
    """Files of the staged manifest that neither staging nor the current release (same sha256) has:
    what a sender must still transfer.

    Raises:
        BundleRefused: the staged manifest is not the expected one, or malformed (`expected_bundle`).
    """
    wanted = expected_bundle(staging, expect_id, expect_sha256)["files"]
    current = _current_files(dest)
    return [
        rel
        for rel, meta in sorted(wanted.items())
        if not (staging / rel).exists() and current.get(rel) != meta
    ]


def fill_from_current(staging: Path, dest: Path, manifest: dict) -> int:
    """Hard-links into `staging` each file of `manifest` (staging's, checked by `expected_bundle`) that is
    absent there and that the current release has with the same sha256 (per the current manifest), as a
    regular file inside the current release; returns how many. `verify` still checks every byte
    afterwards."""
    current = _current_files(dest)
    release = (dest / "current").resolve()
    linked = 0
    for rel, meta in manifest_files(manifest).items():
        target = staging / rel
        source = dest / "current" / rel
        if target.exists() or target.is_symlink() or current.get(rel) != meta:
            continue
        if source.is_symlink() or not source.is_file() or not source.resolve().is_relative_to(release):
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(source, target)
        linked += 1
    return linked


def install(
    staging: Path,
    dest: Path,
    expect_id: str | None = None,
    expect_manifest_sha256: str | None = None,
    fill: bool = False,
) -> Path:
    """Checks that `staging` holds the expected bundle (`expected_bundle`), with `fill` links unchanged
    files from the current release (`fill_from_current`), verifies every file and makes it the current
    release; returns the release directory.

    Raises:
        RuntimeError: another bundle, an unsafe manifest, or verification failed (the message says what);
            staging is removed and dest/current is left as it was.
    """
    try:
        manifest = expected_bundle(staging, expect_id, expect_manifest_sha256)
        if fill:
            print(
                f"linked {fill_from_current(staging, dest, manifest)} unchanged files from {dest / 'current'}"
            )
        problems = verify(staging, manifest)
    except (BundleRefused, OSError) as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise RuntimeError(f"{e}; nothing was installed, {dest / 'current'} is unchanged") from e
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
    parser.add_argument("--expect-id", help="refuse any bundle but this id (ship passes the build's)")
    parser.add_argument(
        "--expect-manifest-sha256", help="refuse any manifest but this sha256 (ship passes the build's)"
    )
    args = parser.parse_args(argv)
    # Expanded here, on the host: the printed commands must not carry a quoted, unexpandable "~".
    args.pex_root = os.path.expandvars(os.path.expanduser(args.pex_root))
    staging, dest = args.staging.absolute(), args.dest.absolute()
    if args.missing:
        try:
            print(json.dumps(missing_files(staging, dest, args.expect_id, args.expect_manifest_sha256)))
        except BundleRefused as e:
            print(f"install: {e}", file=sys.stderr)
            return 1
        return 0
    try:
        release = install(staging, dest, args.expect_id, args.expect_manifest_sha256, args.fill_from_current)
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
