"""The one reader of Pants lockfiles (3rdparty/python/*.lock), for the doctor, the release bundle and the
lockfile policy tests.

A Pants 2.17 lockfile is a pex lock (JSON) preceded by `//` comment lines holding Pants' metadata header
(between "--- BEGIN PANTS LOCKFILE METADATA" and "--- END PANTS LOCKFILE METADATA ---").
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from packaging.utils import canonicalize_name

# Where the project's lockfiles live, relative to the repository root (one per resolve, pants.toml).
LOCKFILES_DIR = Path("3rdparty/python")


class LockfileError(ValueError):
    """A lockfile cannot be read or does not have the pex lock structure."""


@dataclass(frozen=True)
class LockedPackage:
    """One locked distribution: its version, declared dependencies and artifacts (url, algo, hash)."""

    name: str
    version: str
    requires_dists: tuple[str, ...]
    artifacts: tuple[dict, ...]


@dataclass(frozen=True)
class Lockfile:
    """A parsed Pants lockfile.

    Attributes:
        path: where it was read from (used in messages).
        interpreter_constraints: Pants header `valid_for_interpreter_constraints`, e.g. ("CPython==3.12.*",).
        requires_python: the pex lock's `requires_python`, e.g. ("==3.12.*",).
        packages: canonical project name -> LockedPackage (first locked resolve).
    """

    path: str
    interpreter_constraints: tuple[str, ...]
    requires_python: tuple[str, ...]
    packages: dict[str, LockedPackage] = field(default_factory=dict)

    def version_of(self, project: str) -> str | None:
        pkg = self.packages.get(canonicalize_name(project))
        return pkg.version if pkg else None


def parse_lockfile(text: str, path: str = "<lockfile>") -> Lockfile:
    """Parses the text of a Pants 2.17 lockfile (metadata header in `//` lines, then pex lock JSON).

    Raises:
        LockfileError: naming `path`, when the header or the JSON body is missing or malformed.
    """
    header_lines, body_lines = [], []
    for line in text.splitlines():
        (header_lines if line.startswith("//") else body_lines).append(line)
    header_text = "\n".join(line[2:] for line in header_lines)
    match = re.search(
        r"--- BEGIN PANTS LOCKFILE METADATA: DO NOT EDIT OR REMOVE ---(.*)"
        r"--- END PANTS LOCKFILE METADATA ---",
        header_text,
        re.S,
    )
    if not match:
        raise LockfileError(
            f"{path}: no Pants lockfile metadata header; regenerate it with ./pants generate-lockfiles"
        )
    try:
        header = json.loads(match.group(1))
        body = json.loads("\n".join(body_lines))
    except json.JSONDecodeError as e:
        raise LockfileError(f"{path}: invalid JSON ({e})") from e
    resolves = body.get("locked_resolves") or []
    if len(resolves) != 1:
        raise LockfileError(f"{path}: expected exactly one locked resolve, found {len(resolves)}")
    packages = {}
    for entry in resolves[0].get("locked_requirements", []):
        name = canonicalize_name(entry["project_name"])
        packages[name] = LockedPackage(
            name=name,
            version=entry["version"],
            requires_dists=tuple(entry.get("requires_dists", ())),
            artifacts=tuple(entry.get("artifacts", ())),
        )
    return Lockfile(
        path=path,
        interpreter_constraints=tuple(header.get("valid_for_interpreter_constraints", ())),
        requires_python=tuple(body.get("requires_python", ())),
        packages=packages,
    )


def load_lockfile(path: str | Path) -> Lockfile:
    """Reads and parses the lockfile at `path`. Raises LockfileError (or OSError) naming the path."""
    return parse_lockfile(Path(path).read_text(), str(path))


def locked_versions(path: str | Path, names: tuple[str, ...]) -> dict[str, str | None]:
    """{name: locked version} of distributions `names` in the lockfile at `path` (None where not locked).

    Raises:
        LockfileError, OSError: as `load_lockfile`.
    """
    lock = load_lockfile(path)
    return {name: lock.version_of(name) for name in names}
