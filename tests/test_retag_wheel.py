"""tools/retag_wheel.py: the re-tagged wheels are rebuilt byte for byte from their pinned PyPI inputs, and
the re-tag changes only what its spec says."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import zipfile
from pathlib import Path

import pytest
from retag_wheel import RetagError, retag

SPECS = sorted(Path("3rdparty/wheels").glob("*.json"))
# Where ./pants keeps the downloaded inputs' outputs: the local find-links repository.
WHEELS = Path(os.path.expanduser("~/.cache/hermetic-es/wheels"))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fake_wheel(directory: Path, metadata: str) -> Path:
    path = directory / "demo-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(zipfile.ZipInfo("demo/__init__.py", (2024, 1, 2, 3, 4, 6)), "VALUE = 1\n" * 50)
        zf.writestr("demo-1.0.dist-info/METADATA", metadata)
        zf.writestr("demo-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nTag: py3-none-any\n")
        zf.writestr("demo-1.0.dist-info/RECORD", "")
    return path


SPEC = {
    "project": "demo",
    "version": "1.0",
    "local_version": "fixed",
    "requirements": [{"from": "torch==2.13.0+cpu", "to": "torch==2.13.0"}, {"from": "llm", "to": None}],
}
METADATA = (
    "Metadata-Version: 2.1\nName: demo\nVersion: 1.0\nRequires-Dist: numpy\n"
    'Requires-Dist: torch==2.13.0+cpu; platform_machine == "x86_64"\nRequires-Dist: llm\n'
)


def test_only_the_named_requirements_the_version_and_the_record_change(tmp_path):
    wheel = _fake_wheel(tmp_path, METADATA)
    (tmp_path / "a").mkdir()
    out = retag(SPEC, wheel, tmp_path / "a")
    assert out.name == "demo-1.0+fixed-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as old, zipfile.ZipFile(out) as new:
        assert new.testzip() is None
        assert [i.filename for i in new.infolist()] == [
            "demo/__init__.py",
            "demo-1.0+fixed.dist-info/METADATA",
            "demo-1.0+fixed.dist-info/WHEEL",
            "demo-1.0+fixed.dist-info/RECORD",
        ]
        assert new.read("demo/__init__.py") == old.read("demo/__init__.py")
        assert new.getinfo("demo/__init__.py").date_time == (2024, 1, 2, 3, 4, 6)
        assert new.read("demo-1.0+fixed.dist-info/METADATA").decode() == (
            "Metadata-Version: 2.1\nName: demo\nVersion: 1.0+fixed\nRequires-Dist: numpy\n"
            'Requires-Dist: torch==2.13.0; platform_machine == "x86_64"\n'
        )
        record = new.read("demo-1.0+fixed.dist-info/RECORD").decode().splitlines()
        for line in record[:-1]:
            name, digest, size = line.split(",")
            data = new.read(name)
            expected = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            assert digest == f"sha256={expected}" and int(size) == len(data)
        assert record[-1] == "demo-1.0+fixed.dist-info/RECORD,,"
    # Deterministic: a second run gives the same bytes.
    (tmp_path / "b").mkdir()
    assert retag(SPEC, wheel, tmp_path / "b").read_bytes() == out.read_bytes()


def test_a_requirement_the_wheel_lacks_is_an_error(tmp_path):
    wheel = _fake_wheel(tmp_path, METADATA.replace("torch==2.13.0+cpu", "torch==2.12.0"))
    with pytest.raises(RetagError, match=r"0 lines 'Requires-Dist: torch==2.13.0\+cpu', expected 1"):
        retag(SPEC, wheel, tmp_path)


@pytest.mark.parametrize("spec_path", SPECS, ids=[p.stem for p in SPECS])
def test_the_pinned_wheel_is_rebuilt_byte_for_byte(spec_path, tmp_path):
    """./pants downloads each pinned input (hash-checked), re-tags it and checks the output's pin; this
    rebuilds it from the input ./pants kept and must give exactly the pinned bytes."""
    spec = json.loads(spec_path.read_text())
    source = WHEELS / "inputs" / spec["input"]["filename"]
    assert source.is_file(), f"{source} is missing: run ./pants once (it downloads the pinned input)"
    assert _sha256(source) == spec["input"]["sha256"]
    out = retag(spec, source, tmp_path)
    assert out.name == spec["output"]["filename"]
    assert _sha256(out) == spec["output"]["sha256"]
