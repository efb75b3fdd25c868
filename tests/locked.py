"""The versions the project's lockfiles pin (3rdparty/python/*.lock), for tests that check what a built
PEX, an engine actor or a bundle reports, so that a lockfile update needs no test edit."""

from __future__ import annotations

from shared.lockfile import LOCKFILES_DIR, load_lockfile


def locked(resolve: str, project: str) -> str:
    """The version of `project` in the `resolve` lockfile (e.g. locked("engine", "vllm-tpu")).

    Raises:
        AssertionError: the lockfile does not hold `project`.
    """
    version = load_lockfile(LOCKFILES_DIR / f"{resolve}.lock").version_of(project)
    assert version is not None, f"{project} is not in 3rdparty/python/{resolve}.lock"
    return version
