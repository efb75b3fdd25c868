"""Release bundle and shipping: the manifest describes the files, hosts install only verified bundles,
unchanged files are not copied again, and the ssh/gcloud transports build the right commands."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from engine_pex_root import pex_env
from locked import locked
from release import bundle as bundle_mod
from release import host_install, ship

from shared import engine_pex

# Real PEX files built by Pants. The toy engine (Ray plus the shared engine host, no entry point) stands in
# for the 5 GB engine PEX, whose copies would need ~15 GB of disk per test run.
ARTIFACTS = {
    "train.pex": ("src/driver:train", "src.driver/train.pex"),
    "prepare-engine.pex": ("src/release:prepare-engine", "src.release/prepare-engine.pex"),
    "engine.pex": ("tests:toy-engine", "tests/toy-engine.pex"),
}
PEX_ROOT = os.path.expanduser("~/.cache/hermetic-es/test-ship-pex-root")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> ship.Bundle:
    out = tmp_path_factory.mktemp("bundle") / "bundle"
    bundle_mod.assemble(Path.cwd(), out, Path.cwd(), sys.executable, ARTIFACTS)
    return ship.Bundle.open(out)


def test_the_stdlib_installer_agrees_with_shared_engine_pex():
    """install.py runs alone on the hosts (no `shared`): its copies of the PEX settings must match."""
    assert host_install.DEFAULT_PEX_ROOT == engine_pex.DEFAULT_PEX_ROOT
    assert host_install.PEX_RUNTIME_VARS == engine_pex.PEX_RUNTIME_VARS
    assert "import shared" not in Path(host_install.__file__).read_text()


def test_manifest_describes_every_file(built):
    manifest = built.manifest
    assert set(manifest["files"]) == {
        p.relative_to(built.path).as_posix()
        for p in built.path.rglob("*")
        if p.is_file() and p.name != host_install.MANIFEST
    }
    for rel, meta in manifest["files"].items():
        assert host_install.sha256_file(built.path / rel) == meta["sha256"]
        assert (built.path / rel).stat().st_size == meta["size"]
    assert manifest["id"] == host_install.bundle_id(manifest["files"])
    for project in ("jax", "libtpu", "vllm-tpu"):
        assert manifest["locked"]["engine"][project] == locked("engine", project)
    assert manifest["locked"]["driver"]["ray"] == manifest["locked"]["engine"]["ray"]
    resolves = ("driver", "engine", "engine-gpu", "engine-cpu", "tools")
    assert set(manifest["lockfiles"]) == {f"3rdparty/python/{r}.lock" for r in resolves}
    assert manifest["vm_python"] == sys.executable
    assert manifest["python"] == json.loads(Path("3rdparty/pins.json").read_text())["python"]
    assert manifest["artifacts"]["engine.pex"]["files"] >= 1


def ship_local(bundle: ship.Bundle, *dests: Path, prepare: bool = True) -> int:
    args = ["--bundle", str(bundle.path), "--transport", "local", "--python", sys.executable]
    args += ["--pex-root", PEX_ROOT] + [f"--dest={d}" for d in dests]
    return ship.main(args if prepare else [*args, "--no-prepare"])


def test_a_symlink_in_an_artifact_ships_as_a_regular_file(tmp_path):
    """A packed PEX holds `pex` -> `__main__.py`: copied or hard-linked, the bundle holds a regular file
    with its bytes, which the installer (regular files only) accepts."""
    packed = tmp_path / "dist" / "engine.pex"
    packed.mkdir(parents=True)
    (packed / "__main__.py").write_text("print('engine')\n")
    (packed / "pex").symlink_to("__main__.py")
    for link in (True, False):
        out = tmp_path / f"bundle-link-{link}"
        manifest = bundle_mod.assemble(
            tmp_path / "dist", out, Path.cwd(), sys.executable, {"engine.pex": ("t", "engine.pex")}, link=link
        )
        shipped = out / "engine.pex" / "pex"
        assert not shipped.is_symlink() and shipped.read_text() == "print('engine')\n"
        assert host_install.verify(out, manifest) == []


def test_ship_to_two_hosts_installs_verified_and_prepared(built, tmp_path, capfd):
    hosts = [tmp_path / "host-a", tmp_path / "host-b"]
    assert ship_local(built, *hosts) == 0
    out = capfd.readouterr().out
    for host in hosts:
        current = host / "current"
        assert current.resolve() == (host / "releases" / built.id).resolve()
        assert host_install.verify(current, built.manifest) == []
        assert not list(host.glob(".staging-*"))
    assert out.count("engine venv ready:") == 2
    assert "ray_head: PEX_SCRIPT=ray" in out
    assert f"--pex-root {PEX_ROOT}" in out and "~" not in out
    # The shipped driver PEX runs on the host's interpreter.
    env = pex_env(PEX_ROOT)
    train_pex = str(hosts[0] / "current" / "train.pex")
    proc = subprocess.run([sys.executable, train_pex, "--help"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "--population" in proc.stdout
    # The printed Ray start commands use the driver PEX's own `ray` console script.
    proc = subprocess.run(
        [sys.executable, train_pex, "--version"],
        capture_output=True,
        text=True,
        env=env | {"PEX_SCRIPT": "ray"},
    )
    assert proc.returncode == 0, proc.stderr
    assert built.manifest["locked"]["driver"]["ray"] in proc.stdout


def changed_copy(bundle: ship.Bundle, dest: Path, changed: str = host_install.INSTALLER) -> ship.Bundle:
    """A copy of `bundle` in which one file differs (a new release): a comment appended to the installer,
    or bytes appended to another file."""
    shutil.copytree(bundle.path, dest, copy_function=shutil.copy2)
    if changed == host_install.INSTALLER:
        (dest / changed).write_text((dest / changed).read_text() + "# release 2\n")
    else:
        data = (dest / changed).read_bytes()
        (dest / changed).unlink()
        (dest / changed).write_bytes(data + b"release 2")
    manifest = dict(bundle.manifest, files=host_install.file_table(dest))
    manifest["id"] = host_install.bundle_id(manifest["files"])
    (dest / host_install.MANIFEST).write_text(json.dumps(manifest))
    return ship.Bundle.open(dest)


def test_an_update_sends_only_changed_files(built, tmp_path):
    host = tmp_path / "host"
    assert ship_local(built, host, prepare=False) == 0
    second = changed_copy(built, tmp_path / "bundle-2")
    staging, copied, linked = ship.stage_local(second, host)
    assert copied == 1 and linked == len(second.manifest["files"]) - 1
    same = next(rel for rel in second.manifest["files"] if rel != host_install.INSTALLER)
    assert (staging / same).stat().st_ino == (host / "current" / same).stat().st_ino
    assert host_install.main(["--staging", str(staging), "--dest", str(host)]) == 0
    assert (host / "current").resolve().name == second.id


def test_a_tampered_file_is_refused_and_the_previous_release_kept(built, tmp_path, capsys):
    host = tmp_path / "host"
    assert ship_local(built, host, prepare=False) == 0
    second = changed_copy(built, tmp_path / "bundle-2")
    staging, _, _ = ship.stage_local(second, host)
    victim = staging / "prepare-engine.pex"
    victim.unlink()  # a hard link to the installed file: replace it rather than write through it
    data = bytearray((built.path / "prepare-engine.pex").read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    assert host_install.main(["--staging", str(staging), "--dest", str(host)]) == 1
    err = capsys.readouterr().err
    assert "prepare-engine.pex: sha256 differs from the manifest" in err
    assert (host / "current").resolve().name == built.id
    assert host_install.verify(host / "current", built.manifest) == []
    assert not staging.exists()


def installer(staging: Path, host: Path, bundle: ship.Bundle, *extra: str) -> int:
    """The host's installer told to expect `bundle`, as `ship` runs it."""
    return host_install.main(
        [*ship.installer_args(bundle, str(staging), str(host), sys.executable)[2:], *extra]
    )


def test_a_consistently_rewritten_file_and_manifest_are_refused(built, tmp_path, capsys):
    """Someone between build machine and host rewrote a file and the manifest to match (a new id): the
    files verify against that manifest, but the installer expects the build's bundle and refuses."""
    host = tmp_path / "host"
    assert ship_local(built, host, prepare=False) == 0
    forged = changed_copy(built, tmp_path / "forged", changed="train.pex")
    staging, _, _ = ship.stage_local(forged, host)
    staging = staging.rename(host / f".staging-{built.id}")
    assert host_install.verify(staging, forged.manifest) == [], "the files match the forged manifest"
    assert installer(staging, host, built) == 1
    err = capsys.readouterr().err
    assert f"holds bundle {forged.id!r}, but the build machine sent bundle {built.id!r}" in err
    assert (host / "current").resolve().name == built.id and not staging.exists()
    # The same manifest id with other manifest bytes (e.g. another vm_python) is refused by its sha256.
    staging, _, _ = ship.stage_local(built, host)
    manifest = dict(built.manifest, vm_python="/tmp/evil/python3.12")
    (staging / host_install.MANIFEST).write_text(json.dumps(manifest))
    assert installer(staging, host, built) == 1
    assert f"but the build machine's manifest has {built.manifest_sha256}" in capsys.readouterr().err
    assert (host / "current").resolve().name == built.id


def forge(bundle: ship.Bundle, staging: Path, rel: str) -> None:
    """Adds `rel` (pointing at a file the test put there) to the staged manifest, with its true sha256 and
    size and a matching id, so that only the path rules can refuse it."""
    manifest = json.loads((staging / host_install.MANIFEST).read_text())
    target = Path(rel) if rel.startswith("/") else staging / rel
    manifest["files"][rel] = {"sha256": host_install.sha256_file(target), "size": target.stat().st_size}
    manifest["id"] = host_install.bundle_id(manifest["files"])
    (staging / host_install.MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("kind", "why"),
    [
        ("traversal", "not a normalised relative path"),
        ("absolute", "an absolute path"),
        ("symlink", "not a regular file"),
        ("symlinked-directory", "extra/payload.py: missing"),
    ],
)
def test_unsafe_manifest_paths_are_refused(built, tmp_path, capsys, kind, why):
    host = tmp_path / "host"
    assert ship_local(built, host, prepare=False) == 0
    staging, _, _ = ship.stage_local(built, host)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "payload.py").write_text("print('not from the build machine')\n")
    rel = {
        "traversal": f"../../{outside.name}/payload.py",
        "absolute": str(outside / "payload.py"),
        "symlink": "payload.py",
        "symlinked-directory": "extra/payload.py",
    }[kind]
    if kind == "symlink":
        (staging / rel).symlink_to(outside / "payload.py")
    if kind == "symlinked-directory":
        (staging / "extra").symlink_to(outside)
    forge(built, staging, rel)
    manifest = json.loads((staging / host_install.MANIFEST).read_text())
    args = ["--staging", str(staging), "--dest", str(host), "--expect-id", manifest["id"]]
    assert host_install.main([*args, "--fill-from-current"]) == 1
    err = capsys.readouterr().err
    assert why in err and "nothing was installed" in err, err
    assert (host / "current").resolve().name == built.id and not staging.exists()
    assert sorted(p.name for p in outside.iterdir()) == ["payload.py"], "nothing written outside"


def test_ship_reports_a_refusing_host_and_installs_the_others(built, tmp_path, capfd, monkeypatch):
    """Host b's staging is rewritten (consistently) before its installer runs: ship names host b and the
    installer's reason, host a gets the bundle, host b keeps its release."""
    hosts = [tmp_path / "host-a", tmp_path / "host-b"]
    assert ship_local(built, hosts[1], prepare=False) == 0
    forged = changed_copy(built, tmp_path / "forged", changed="train.pex")
    real_stage = ship.stage_local

    def stage_forged_on_host_b(bundle, dest):
        if dest != hosts[1]:
            return real_stage(bundle, dest)
        staging, copied, linked = real_stage(forged, dest)
        return staging.rename(dest / f".staging-{bundle.id}"), copied, linked

    monkeypatch.setattr(ship, "stage_local", stage_forged_on_host_b)
    capfd.readouterr()
    assert ship_local(built, *hosts, prepare=False) == 1
    err = capfd.readouterr().err
    assert f"ship: {hosts[1]}: failed with exit status 1" in err
    assert f"| install: {hosts[1]}/.staging-{built.id} holds bundle {forged.id!r}, but the build " in err
    assert f"ship: not installed on ['{hosts[1]}']" in err
    assert (hosts[0] / "current").resolve().name == built.id
    assert (hosts[1] / "current").resolve().name == built.id
    assert host_install.verify(hosts[1] / "current", built.manifest) == []


def test_a_bundle_that_does_not_match_its_manifest_is_not_shipped(built, tmp_path, capsys):
    broken = changed_copy(built, tmp_path / "broken")
    (broken.path / "train.pex").write_bytes(b"not a pex")
    assert ship.main(["--bundle", str(broken.path), "--transport", "local", f"--dest={tmp_path / 'h'}"]) == 1
    assert "train.pex: size" in capsys.readouterr().err
    assert not (tmp_path / "h").exists()


def test_ssh_commands(built):
    python = "/usr/bin/python3.12"
    mkdir, rsync, install = ship.ssh_commands(built, "vm-1", "/opt/hes", python, "~/.cache/p", True)
    staging = f"/opt/hes/.staging-{built.id}"
    assert mkdir == ["ssh", "vm-1", f"mkdir -p {staging}"]
    assert rsync[:4] == ["rsync", "--archive", "--checksum", "--delete"]
    assert rsync[rsync.index("--rsh") + 1] == "ssh"
    assert "--link-dest=/opt/hes/current/" in rsync
    assert rsync[-2:] == [f"{built.path}/", f"vm-1:{staging}/"]
    assert install[:2] == ["ssh", "vm-1"]
    assert install[2] == (
        f"{python} {staging}/install.py --staging {staging} --dest /opt/hes --expect-id {built.id} "
        f"--expect-manifest-sha256 {built.manifest_sha256} --python {python} --pex-root '~/.cache/p' "
        "--prepare"
    )


@pytest.fixture
def sshd(tmp_path):
    """A real OpenSSH server on 127.0.0.1 (Debian's openssh-server) accepting a fresh key for this user;
    yields the ssh command line (`ssh -F config`) and the host alias. Skips when sshd cannot start."""
    sshd_bin, keygen = shutil.which("sshd") or "/usr/sbin/sshd", shutil.which("ssh-keygen")
    if not os.path.exists(sshd_bin) or not keygen or not shutil.which("rsync"):
        pytest.skip("needs sshd (openssh-server), ssh-keygen and rsync; .ci/run installs them")
    for key in ("host_key", "client_key"):
        subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / key)], check=True)
    (tmp_path / "authorized_keys").write_text((tmp_path / "client_key.pub").read_text())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {tmp_path / 'host_key'}\n"
        f"AuthorizedKeysFile {tmp_path / 'authorized_keys'}\nPidFile {tmp_path / 'sshd.pid'}\n"
        "StrictModes no\nUsePAM no\nPasswordAuthentication no\nPermitRootLogin prohibit-password\n"
    )
    (tmp_path / "ssh_config").write_text(
        f"Host shiptest\n  HostName 127.0.0.1\n  Port {port}\n  IdentityFile {tmp_path / 'client_key'}\n"
        "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n  BatchMode yes\n"
    )
    try:
        os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege separation directory
    except OSError as e:
        pytest.skip(f"sshd needs /run/sshd: {e}")
    server = subprocess.Popen(
        [sshd_bin, "-D", "-e", "-f", str(tmp_path / "sshd_config")], stderr=subprocess.PIPE, text=True
    )
    ssh = f"ssh -F {tmp_path / 'ssh_config'}"
    try:
        for _ in range(50):
            if server.poll() is not None:
                pytest.skip(f"sshd did not start: {server.stderr.read()[-500:]}")
            if subprocess.run([*ssh.split(), "shiptest", "true"], capture_output=True).returncode == 0:
                break
            time.sleep(0.2)
        else:
            pytest.skip("sshd did not accept the test key within 10 s")
        yield ssh, "shiptest"
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_ship_over_ssh_to_a_real_sshd(built, sshd, tmp_path):
    ssh, host = sshd
    dest = tmp_path / "remote"
    args = ["--bundle", str(built.path), "--transport", "ssh", "--ssh", ssh, "--host", host, f"--dest={dest}"]
    args += ["--python", sys.executable, "--pex-root", PEX_ROOT]
    assert ship.main(args) == 0
    assert (dest / "current").resolve().name == built.id
    assert host_install.verify(dest / "current", built.manifest) == []
    # A second release: rsync's --link-dest makes unchanged files links to the installed ones.
    second = changed_copy(built, tmp_path / "bundle-2")
    args[args.index("--bundle") + 1] = str(second.path)
    assert ship.main([*args, "--no-prepare"]) == 0
    assert (dest / "current").resolve().name == second.id
    same = "train.pex"
    first_copy = dest / "releases" / built.id / same
    assert (dest / "current" / same).stat().st_ino == first_copy.stat().st_ino


FAKE_GCLOUD = """#!{python}
# Stands in for `gcloud compute tpus tpu-vm scp/ssh`: worker i's filesystem is FAKE_TPU_WORKERS[i] + path.
import os, shlex, shutil, subprocess, sys
args = sys.argv[1:]
assert args[:3] == ["compute", "tpus", "tpu-vm"], args
verb, rest = args[3], args[4:]
roots, dest = os.environ["FAKE_TPU_WORKERS"].split(":"), os.environ["FAKE_TPU_DEST"]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as log:
    log.write(shlex.join(args) + "\\n")
worker = next(a.split("=", 1)[1] for a in rest if a.startswith("--worker="))
chosen = roots if worker == "all" else [roots[int(worker)]]
for root in chosen:
    if verb == "scp":
        *sources, target = [a for a in rest if not a.startswith("--")]
        path = target.split(":", 1)[1].replace(dest, root + dest, 1)
        for source in sources:
            shutil.copy(source, path)
    else:
        command = next(a.split("=", 1)[1] for a in rest if a.startswith("--command="))
        status = subprocess.run(["bash", "-c", command.replace(dest, root + dest)]).returncode
        if status:
            sys.exit(status)
"""


def test_gcloud_ships_only_what_changed_to_every_worker(built, tmp_path, monkeypatch, capfd):
    bin_dir, log = tmp_path / "bin", tmp_path / "gcloud.log"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(FAKE_GCLOUD.format(python=sys.executable))
    (bin_dir / "gcloud").chmod(0o755)
    workers = [tmp_path / "worker-0", tmp_path / "worker-1"]
    dest = "/opt/hes"
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_TPU_WORKERS", ":".join(map(str, workers)))
    monkeypatch.setenv("FAKE_TPU_DEST", dest)
    monkeypatch.setenv("FAKE_GCLOUD_LOG", str(log))

    def ship_gcloud(bundle: ship.Bundle) -> int:
        args = [
            "--bundle",
            str(bundle.path),
            "--transport",
            "gcloud",
            "--tpu",
            "tpu-a",
            "--zone",
            "us-central2-b",
        ]
        return ship.main([*args, f"--dest={dest}", "--python", sys.executable, "--no-prepare"])

    assert ship_gcloud(built) == 0
    files = len(built.manifest["files"])
    assert f"sending {files - 1} of {files} files" in capfd.readouterr().out
    for root in workers:
        assert host_install.verify(root / "opt/hes/current", built.manifest) == []

    second = changed_copy(built, tmp_path / "bundle-2", changed="prepare-engine.pex")
    assert ship_gcloud(second) == 0
    assert f"sending 1 of {files} files" in capfd.readouterr().out
    for root in workers:
        current = root / "opt/hes/current"
        assert current.resolve().name == second.id
        assert (current / "train.pex").stat().st_ino == (
            root / "opt/hes/releases" / built.id / "train.pex"
        ).stat().st_ino
    assert "--worker=0" in log.read_text()

    # A worker whose current release is not worker 0's lacks files: it fails verification, keeps its
    # release, and the ship reports the failure.
    third = changed_copy(second, tmp_path / "bundle-3", changed="train.pex")
    (workers[1] / "opt/hes/current").unlink()
    (workers[1] / "opt/hes/current").symlink_to(Path("releases") / built.id)
    assert ship_gcloud(third) == 1
    assert (workers[0] / "opt/hes/current").resolve().name == third.id
    assert (workers[1] / "opt/hes/current").resolve().name == built.id
    assert "prepare-engine.pex: missing" in capfd.readouterr().err
