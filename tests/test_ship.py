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

from driver import bundle as bundle_mod
from driver import host_install, ship

# Real PEX files built by Pants. The toy engine (Ray plus the shared engine host, no entry point) stands in
# for the 5 GB engine PEX, whose copies would need ~15 GB of disk per test run.
ARTIFACTS = {
    "train.pex": ("src/driver:train", "src.driver/train.pex"),
    "prepare-engine.pex": ("src/driver:prepare-engine", "src.driver/prepare-engine.pex"),
    "engine.pex": ("tests:toy-engine", "tests/toy-engine.pex"),
}
PEX_ROOT = os.path.expanduser("~/.cache/hermetic-es/test-ship-pex-root")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> ship.Bundle:
    out = tmp_path_factory.mktemp("bundle") / "bundle"
    bundle_mod.assemble(Path.cwd(), out, Path.cwd(), sys.executable, ARTIFACTS)
    return ship.Bundle.open(out)


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
    assert manifest["locked"]["engine"]["jax"] == "0.11.2"
    assert manifest["locked"]["engine"]["libtpu"] == "0.0.48"
    assert manifest["locked"]["engine"]["vllm-tpu"] == "0.32.0"
    assert manifest["locked"]["driver"]["ray"] == manifest["locked"]["engine"]["ray"]
    assert set(manifest["lockfiles"]) == {f"3rdparty/python/{r}.lock" for r in ("driver", "engine", "tools")}
    assert manifest["vm_python"] == sys.executable
    assert manifest["python"] == json.loads(Path("3rdparty/pins.json").read_text())["python"]
    assert manifest["artifacts"]["engine.pex"]["files"] >= 1


def ship_local(bundle: ship.Bundle, *dests: Path, prepare: bool = True) -> int:
    args = ["--bundle", str(bundle.path), "--transport", "local", "--python", sys.executable]
    args += ["--pex-root", PEX_ROOT] + [f"--dest={d}" for d in dests]
    return ship.main(args if prepare else [*args, "--no-prepare"])


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
    env = {k: v for k, v in os.environ.items() if not k.startswith("PEX")} | {"PEX_ROOT": PEX_ROOT}
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


def changed_copy(bundle: ship.Bundle, dest: Path) -> ship.Bundle:
    """A copy of `bundle` whose installer differs by one comment line (a new release)."""
    import shutil

    shutil.copytree(bundle.path, dest)
    (dest / host_install.INSTALLER).write_text((dest / host_install.INSTALLER).read_text() + "# release 2\n")
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


def test_a_bundle_that_does_not_match_its_manifest_is_not_shipped(built, tmp_path, capsys):
    broken = changed_copy(built, tmp_path / "broken")
    (broken.path / "train.pex").write_bytes(b"not a pex")
    assert ship.main(["--bundle", str(broken.path), "--transport", "local", f"--dest={tmp_path / 'h'}"]) == 1
    assert "train.pex: size" in capsys.readouterr().err
    assert not (tmp_path / "h").exists()


def test_ssh_and_gcloud_commands(built):
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
        f"{python} {staging}/install.py --staging {staging} --dest /opt/hes --python {python} "
        "--pex-root '~/.cache/p' --prepare"
    )
    commands = ship.gcloud_commands(built, "tpu-a", "us-central2-b", "/opt/hes", python, "~/.cache/p", False)
    assert commands[1] == [
        "gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse", "--zone=us-central2-b", "--worker=all",
        str(built.path), f"tpu-a:{staging}",
    ]  # fmt: skip
    assert commands[2][:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "tpu-a", "--zone=us-central2-b"]
    assert commands[2][7] == "--worker=all"
    assert commands[2][8].startswith(f"--command={python} {staging}/install.py")
    assert "--prepare" not in commands[2][8]


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
    os.makedirs("/run/sshd", exist_ok=True)
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
