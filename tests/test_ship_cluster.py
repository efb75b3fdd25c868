"""A shipped bundle runs ES on a 2-node Ray cluster: the real driver and engine PEX files are shipped to
two host directories, each node's Ray is started from its host's driver PEX with the printed command, and
one ES iteration runs with the driver on node A and the engines on node B, from B's shipped engine PEX,
extracted by B's installer."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import ray
from engine_pex_root import ENGINE_PEX_ROOT, pex_env
from locked import locked
from release import bundle as bundle_mod
from release import ship

from shared.run_layout import read_jsonl

PEX_ROOT = ENGINE_PEX_ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    """The real bundle (hard links to the sandbox's PEX files), shipped to host-a and host-b. Deleted
    afterwards: once Pants removes the sandbox, these links would be the engine PEX's only copy (~5 GB)
    and pytest keeps the last three runs' temporary directories."""
    root = tmp_path_factory.mktemp("cluster")
    built = bundle_mod.assemble(Path.cwd(), root / "bundle", Path.cwd(), sys.executable, link=True)
    hosts = [root / "host-a", root / "host-b"]
    args = ["--bundle", str(root / "bundle"), "--transport", "local", "--python", sys.executable]
    assert ship.main([*args, "--pex-root", PEX_ROOT, *(f"--dest={h}" for h in hosts)]) == 0
    yield built, hosts
    shutil.rmtree(root, ignore_errors=True)


def ray_node(host: Path, *args: str, env: dict[str, str]) -> subprocess.Popen:
    """`ray start --block ARGS` from the host's shipped driver PEX (the installer's printed ray_head /
    ray_worker form), in its own session so that the node and everything it started can be stopped."""
    command = [sys.executable, str(host / "current" / "train.pex"), "start", "--block", *args]
    return subprocess.Popen(
        command, env=env | {"PEX_SCRIPT": "ray"}, start_new_session=True, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def stop(node: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.pid, sig)
        try:
            node.wait(timeout=30)
            return
        except subprocess.TimeoutExpired:
            continue


def wait_for_nodes(address: str, count: int, nodes: list[subprocess.Popen]) -> None:
    """Waits until `count` nodes are alive in the cluster at `address` (at most 120 s)."""
    ray.init(address=address, configure_logging=False, log_to_driver=False)
    try:
        deadline = time.monotonic() + 120
        while sum(n["Alive"] for n in ray.nodes()) < count:
            for node in nodes:
                assert node.poll() is None, f"a Ray node exited: {node.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, f"only {sum(n['Alive'] for n in ray.nodes())} nodes came up"
            time.sleep(1)
    finally:
        ray.shutdown()


def test_one_es_iteration_on_two_nodes_with_the_shipped_engine(hosts, tmp_path):
    built, (host_a, host_b) = hosts
    env = pex_env(PEX_ROOT, RAY_AUTH_MODE="disabled")
    port = free_port()
    address = f"127.0.0.1:{port}"
    # Its own temp dir: `ray start --head` records the cluster address in TEMP_DIR/ray_current_cluster,
    # where any other test's `ray.init()` on this machine would find and join it (and it outlives SIGTERM).
    temp_dir = tempfile.mkdtemp(prefix="hes-ray-", dir="/tmp")  # short: Ray's socket paths have a limit
    nodes = [
        ray_node(host_a, "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
                 f"--temp-dir={temp_dir}", "--resources", json.dumps({"host_a": 1}), env=env),
    ]  # fmt: skip
    try:
        wait_for_nodes(address, 1, nodes)
        nodes.append(
            ray_node(
                host_b,
                f"--address={address}",
                "--num-cpus=2",
                "--resources",
                json.dumps({"host_b": 2}),
                env=env,
            )
        )
        wait_for_nodes(address, 2, nodes)
        out = tmp_path / "run"
        engine = host_b / "current" / "engine.pex"
        train = [
            sys.executable, str(host_a / "current" / "train.pex"), "--address", address,
            "--no-build-engine", "--engine-pex", str(engine), "--engine-python", sys.executable,
            "--pex-root", PEX_ROOT, "--engine-resources", "host_b=1", "--num-engines", "2",
            "--iterations", "1", "--population", "4", "--prompts-per-member", "2", "--max-new-tokens", "8",
            "--eval-size", "4", "--no-progress", "--output-dir", str(out),
        ]  # fmt: skip
        proc = subprocess.run(train, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{shlex.join(train)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    finally:
        for node in reversed(nodes):
            stop(node)
        shutil.rmtree(temp_dir, ignore_errors=True)
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["iteration"] for r in rows] == [0]
    manifest = json.loads((out / "manifest.json").read_text())
    (session,) = manifest["sessions"]
    # Both engines ran from node B's shipped engine PEX, extracted into the prepared venv.
    assert session["engine_pex"]["path"] == str(engine)
    assert session["engine_pex"]["pex_info_sha256"] == built["files"]["engine.pex/PEX-INFO"]["sha256"]
    for report in session["engines"]:
        assert Path(report["prefix"]).is_relative_to(PEX_ROOT)
        assert report["packages"]["vllm-tpu"] == locked("engine", "vllm-tpu")
