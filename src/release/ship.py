"""`./pants run src/release:ship -- --bundle dist/bundle --transport T --dest DIR ...`: ship a bundle.

Each host receives the bundle into DEST/.staging-<id>/, then runs the bundle's own `install.py` there,
told which bundle to expect (`--expect-id`, `--expect-manifest-sha256`: this machine's), which refuses any
other, verifies every file against the manifest before anything runs, renames the staging directory to
DEST/releases/<id>, points DEST/current at it and (with --prepare, the default) extracts the engine PEX so
that actors start warm. A host whose files do not verify is reported, with the installer's reason, and
keeps its previous release.

Transports:
  local   DEST is a directory on this machine (shared filesystems, tests); files unchanged since the
          current release are hard-linked from it instead of copied.
  ssh     rsync over ssh to each --host; `--link-dest` makes unchanged files (by checksum) links to the
          current release, so only changed files cross the network.
  gcloud  TPU VM workers of --tpu in --zone, with `gcloud compute tpus tpu-vm scp/ssh --worker=all`: worker
          0 lists what its current release lacks, only those files are sent (one tar), and each worker
          hard-links the rest from its current release before verifying (see `gcloud_ship`).
`--dry-run` prints the commands without running them.
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
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from release import host_install
from shared.engine_pex import DEFAULT_PEX_ROOT

TRANSPORTS = ("local", "ssh", "gcloud")


class ShipError(RuntimeError):
    """The bundle could not be read, or a command of the transport failed."""


@dataclass(frozen=True)
class Bundle:
    """A bundle directory, its manifest and the manifest file's sha256 (hex)."""

    path: Path
    manifest: dict
    manifest_sha256: str

    @classmethod
    def open(cls, path: Path) -> Bundle:
        """Reads and checks a bundle directory.

        Raises:
            ShipError: no manifest, or the files do not match it (the problems listed).
        """
        try:
            data = (path / host_install.MANIFEST).read_bytes()
            manifest = json.loads(data)
            problems = host_install.verify(path, manifest)
        except (OSError, ValueError, host_install.BundleRefused) as e:
            raise ShipError(f"{path}: not a bundle ({host_install.MANIFEST}: {e})") from e
        if problems:
            raise ShipError(f"{path} does not match its manifest:\n" + "\n".join(f"  {p}" for p in problems))
        return cls(path.absolute(), manifest, hashlib.sha256(data).hexdigest())

    @property
    def id(self) -> str:
        return self.manifest["id"]


def installer_args(bundle: Bundle, staging: str, dest: str, python: str) -> list[str]:
    """argv of the bundle's installer on a host (run with the host's `python`), told to accept only
    `bundle` (its id and manifest sha256, as built here)."""
    args = [python, f"{staging}/{host_install.INSTALLER}", "--staging", staging, "--dest", dest]
    return [*args, "--expect-id", bundle.id, "--expect-manifest-sha256", bundle.manifest_sha256]


def install_args(
    bundle: Bundle, staging: str, dest: str, python: str, pex_root: str, prepare: bool
) -> list[str]:
    """argv of the installation on a host: `installer_args` plus the engine PEX's PEX_ROOT and --prepare."""
    args = [*installer_args(bundle, staging, dest, python), "--python", python, "--pex-root", pex_root]
    return [*args, "--prepare"] if prepare else args


def _link_or_copy(source: Path, target: Path) -> None:
    """Hard-links `source` to `target` when both are on one filesystem, else copies it. Safe because
    bundles and releases are never modified in place (they are replaced as whole directories), and the
    installer verifies every file anyway."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def stage_local(bundle: Bundle, dest: Path) -> tuple[Path, int, int]:
    """Puts the bundle into dest/.staging-<id>: files whose sha256 equals the current release's copy are
    hard links to it; the others come from the bundle (hard-linked on the same filesystem, else copied).
    Returns (staging dir, files from the bundle, files linked to the current release)."""
    staging = dest / f".staging-{bundle.id}"
    shutil.rmtree(staging, ignore_errors=True)
    current = dest / "current"
    try:
        previous = json.loads((current / host_install.MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError):
        previous = {}
    copied = linked = 0
    for rel, meta in bundle.manifest["files"].items():
        target = staging / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if previous.get(rel) == meta:
            os.link((current / rel).resolve(), target)
            linked += 1
        else:
            _link_or_copy(bundle.path / rel, target)
            copied += 1
    shutil.copy2(bundle.path / host_install.MANIFEST, staging / host_install.MANIFEST)
    return staging, copied, linked


def ssh_commands(
    bundle: Bundle, host: str, dest: str, python: str, pex_root: str, prepare: bool, ssh: str = "ssh"
) -> list[list[str]]:
    """The commands that ship `bundle` to `host` over ssh: mkdir, rsync (delta against the current
    release), the installer. `ssh` is the ssh command line (e.g. "ssh -F cfg"), also used by rsync."""
    staging = f"{dest}/.staging-{bundle.id}"
    remote = shlex.split(ssh)
    return [
        [*remote, host, shlex.join(["mkdir", "-p", staging])],
        [
            "rsync", "--archive", "--checksum", "--delete", f"--link-dest={dest}/current/",
            "--rsh", ssh, f"{bundle.path}/", f"{host}:{staging}/",
        ],
        [*remote, host, shlex.join(install_args(bundle, staging, dest, python, pex_root, prepare))],
    ]  # fmt: skip


def gcloud_ship(
    bundle: Bundle,
    tpu: str,
    zone: str,
    dest: str,
    python: str,
    pex_root: str,
    prepare: bool,
    dry_run: bool = False,
    gcloud: str = "gcloud",
) -> None:
    """Ships `bundle` to every worker of TPU VM `tpu` with `gcloud compute tpus tpu-vm scp/ssh`, sending
    only what changed: the manifest and installer go first; worker 0 says which files its current
    release lacks (`install.py --missing`); only those go, as one tar, to every worker, whose installer
    hard-links the rest from its current release (`--fill-from-current`) and verifies every file. A worker
    whose current release differs from worker 0's fails verification and keeps its release.

    Raises:
        ShipError: a gcloud command failed, or worker 0's answer was not a JSON list.
    """
    staging = f"{dest}/.staging-{bundle.id}"
    base = [gcloud, "compute", "tpus", "tpu-vm"]

    def ssh(worker: str, command: list[str]) -> list[str]:
        return [*base, "ssh", tpu, f"--zone={zone}", f"--worker={worker}", f"--command={shlex.join(command)}"]

    def scp(sources: list[str], target: str) -> list[str]:
        return [*base, "scp", f"--zone={zone}", "--worker=all", *sources, f"{tpu}:{target}"]

    installer = installer_args(bundle, staging, dest, python)
    run([ssh("all", ["mkdir", "-p", staging])], dry_run)
    run(
        [
            scp(
                [str(bundle.path / host_install.MANIFEST), str(bundle.path / host_install.INSTALLER)],
                f"{staging}/",
            )
        ],
        dry_run,
    )
    ask = ssh("0", [*installer, "--missing"])
    if dry_run:
        print("$ " + shlex.join(ask))
        missing = sorted(bundle.manifest["files"])
    else:
        print("$ " + shlex.join(ask))
        proc = subprocess.run(ask, capture_output=True, text=True, check=False)
        try:
            missing = json.loads(proc.stdout.strip().splitlines()[-1])
            assert isinstance(missing, list)
        except (IndexError, ValueError, AssertionError):
            raise ShipError(
                f"worker 0 did not list the missing files (exit {proc.returncode}): {proc.stderr[-2000:]}"
            ) from None
    missing = [rel for rel in missing if rel != host_install.INSTALLER]
    size = sum(bundle.manifest["files"][rel]["size"] for rel in missing)
    print(f"sending {len(missing)} of {len(bundle.manifest['files'])} files ({size / 1e6:.1f} MB)")
    unpack: list[str] = []
    if missing:
        with tempfile.TemporaryDirectory() as tmp:
            tar = Path(tmp) / "delta.tar"
            if not dry_run:
                with tarfile.open(tar, "w") as archive:
                    for rel in missing:
                        archive.add(bundle.path / rel, arcname=rel)
            run([scp([str(tar)], f"{staging}/")], dry_run)
        unpack = ["tar", "-x", "-f", f"{staging}/delta.tar", "-C", staging]
    finish = [*installer, "--python", python, "--pex-root", pex_root, "--fill-from-current"]
    finish += ["--prepare"] if prepare else []
    script = " && ".join(
        shlex.join(c) for c in ([unpack, ["rm", f"{staging}/delta.tar"]] if unpack else []) + [finish]
    )
    run([[*base, "ssh", tpu, f"--zone={zone}", "--worker=all", f"--command={script}"]], dry_run)


def run(commands: list[list[str]], dry_run: bool) -> None:
    """Runs each command (or prints it with `dry_run`); its standard error is passed on as it comes and
    kept for the report.

    Raises:
        ShipError: a command failed (its exit status, its last lines of standard error, e.g. the
            installer's refusal, and the command line included).
    """
    for command in commands:
        print("$ " + shlex.join(command), flush=True)
        if dry_run:
            continue
        tail: list[str] = []
        with subprocess.Popen(command, stderr=subprocess.PIPE, text=True, errors="replace") as proc:
            for line in proc.stderr:
                sys.stderr.write(line)
                tail = [*tail[-19:], line.rstrip("\n")]
        if proc.returncode != 0:
            said = "".join(f"\n  | {line}" for line in tail)
            raise ShipError(f"failed with exit status {proc.returncode}: {shlex.join(command)}{said}")


def main(argv: list[str] | None = None) -> int:
    """Runs the command; returns 0 when every host installed the bundle, 1 when any failed."""
    parser = argparse.ArgumentParser(prog="ship", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=Path("dist/bundle"), help="default: %(default)s")
    parser.add_argument("--transport", choices=TRANSPORTS, required=True)
    parser.add_argument(
        "--dest",
        action="append",
        required=True,
        help="install root on the hosts (local: one per host directory, repeatable)",
    )
    parser.add_argument("--host", action="append", default=[], help="ssh: a host (repeatable)")
    parser.add_argument("--ssh", default="ssh", help="ssh: the ssh command line (default: %(default)s)")
    parser.add_argument("--tpu", help="gcloud: TPU VM name")
    parser.add_argument("--zone", help="gcloud: zone")
    parser.add_argument("--python", help="CPython 3.12 on the hosts; default: the manifest's vm_python")
    parser.add_argument("--pex-root", default=DEFAULT_PEX_ROOT, help="default: %(default)s")
    parser.add_argument("--no-prepare", dest="prepare", action="store_false", help="skip engine extraction")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)  # fmt: skip
    if args.transport == "ssh" and (not args.host or len(args.dest) != 1):
        parser.error("--transport ssh needs --host (repeatable) and exactly one --dest")
    if args.transport == "gcloud" and (not args.tpu or not args.zone or len(args.dest) != 1):
        parser.error("--transport gcloud needs --tpu, --zone and exactly one --dest")
    try:
        bundle = Bundle.open(args.bundle)
    except ShipError as e:
        print(f"ship: {e}", file=sys.stderr)
        return 1
    python = args.python or bundle.manifest["vm_python"]
    failed = []
    targets = {"local": args.dest, "ssh": args.host, "gcloud": [args.tpu]}[args.transport]
    for target in targets:
        print(f"== {target}: bundle {bundle.id}")
        try:
            if args.transport == "local":
                dest = Path(target).absolute()
                dest.mkdir(parents=True, exist_ok=True)
                if args.dry_run:
                    print(f"(dry run) would stage {bundle.path} into {dest}/.staging-{bundle.id}")
                    continue
                staging, copied, linked = stage_local(bundle, dest)
                print(f"staged {copied} files copied, {linked} unchanged files linked")
                run(
                    [install_args(bundle, str(staging), str(dest), python, args.pex_root, args.prepare)],
                    False,
                )
            elif args.transport == "ssh":
                run(
                    ssh_commands(bundle, target, args.dest[0], python, args.pex_root, args.prepare, args.ssh),
                    args.dry_run,
                )
            else:
                gcloud_ship(
                    bundle, target, args.zone, args.dest[0], python, args.pex_root, args.prepare, args.dry_run
                )
        except (ShipError, OSError) as e:
            print(f"ship: {target}: {e}", file=sys.stderr)
            failed.append(target)
    if failed:
        print(f"ship: not installed on {failed}; their previous release is unchanged", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
