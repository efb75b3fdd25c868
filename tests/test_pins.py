"""One pins file (3rdparty/pins.json) decides the Python versions: pants.toml, the TPU VM complete
platform, the launcher, the bundle manifest and the Nix files must agree with it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

PINS = json.loads(Path("3rdparty/pins.json").read_text())
NIX_FILES = sorted(Path("nix").glob("*.nix"))


def test_pants_toml_interpreter_constraints_follow_the_pins():
    config = tomllib.loads(Path("pants.toml").read_text())
    constraints = [config["python"]["interpreter_constraints"]]
    constraints += [
        s["interpreter_constraints"]
        for s in config.values()
        if isinstance(s, dict) and "interpreter_constraints" in s
    ]
    assert constraints and all(c == [f"CPython=={PINS['python']}.*"] for c in constraints), constraints


def test_complete_platform_follows_the_pins():
    platform = json.loads(Path("3rdparty/platforms/tpu-vm-cp312.json").read_text())
    assert platform["marker_environment"]["python_version"] == PINS["python"]
    abi = "cp" + PINS["python"].replace(".", "")
    assert platform["compatible_tags"][0].startswith(f"{abi}-{abi}-")


def test_launcher_runs_pants_on_the_pinned_python():
    launcher = Path("pants").read_text()
    assert f"python{PINS['pants_python']}" in launcher


def test_vm_python_is_the_nix_profile_interpreter():
    assert re.fullmatch(rf"/.+/bin/python{re.escape(PINS['python'])}", PINS["vm_python"])


def test_flake_lock_pins_nixpkgs_by_revision_and_hash():
    lock = json.loads(Path("nix/flake.lock").read_text())
    node = lock["nodes"]["nixpkgs"]
    assert re.fullmatch(r"[0-9a-f]{40}", node["locked"]["rev"])
    assert node["locked"]["narHash"].startswith("sha256-")
    assert f'github:NixOS/nixpkgs/{node["original"]["ref"]}"' in Path("nix/flake.nix").read_text()


def nix_instantiate(*args: str) -> str:
    binary = shutil.which("nix-instantiate")
    if binary is None:
        pytest.skip("needs nix-instantiate (Debian's nix-bin; .ci/run installs it)")
    proc = subprocess.run([binary, *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.parametrize("path", NIX_FILES, ids=lambda p: p.name)
def test_nix_files_parse(path):
    nix_instantiate("--parse", str(path))


def test_nix_pins_evaluate_to_the_pins_file():
    evaluated = json.loads(nix_instantiate("--eval", "--strict", "--json", "nix/pins.nix"))
    assert {k: evaluated[k] for k in PINS} == PINS
    assert evaluated["pythonAttr"] == "python" + PINS["python"].replace(".", "")
    assert evaluated["pantsPythonAttr"] == "python" + PINS["pants_python"].replace(".", "")
    assert PINS["vm_python"].startswith(evaluated["vmProfile"] + "/")
