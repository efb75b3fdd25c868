"""Why engine actors did not start: what Ray logged about the failed worker starts, the cluster's free
capacity, each node's disk for PEX_ROOT, and resources no node has.

Ray keeps retrying a worker that cannot start instead of failing; `engine_pool.EnginePool` gives up at a
deadline and raises `EngineStartError` with what these find. Ray's session log directory is reached
through one function (`ray_logs_dir`), the only use of Ray's private API in the project
(tests/test_engine_pool.py checks that it still exists in the locked Ray).
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import ray

from driver.engine_preflight import (
    EnginePreflightError,
    extraction_bytes,
    no_space_message,
    read_pex_info,
)
from driver.engine_spec import EngineSpec

# Lines of Ray's logs that explain a worker that never registered.
_LOG_PATTERN = re.compile(
    r"No such file|not found|Permission denied|not registered within the timeout|Traceback|Error|"
    r"error:|exec |Failed to start|Version mismatch|exited",
)


class EngineStartError(RuntimeError):
    """Engine actors did not become ready: one failed while starting, or the start deadline passed."""


def ray_logs_dir() -> Path | None:
    """The log directory of the Ray session this process joined (Ray's private
    `ray._private.worker._global_node`), else the newest session's on this machine, else None."""
    node = getattr(ray._private.worker, "_global_node", None)
    if node is not None:
        return Path(node.get_logs_dir_path())
    latest = Path("/tmp/ray/session_latest/logs")
    return latest if latest.is_dir() else None


# Ray logs that record worker starts: the raylet's (its stderr holds the failed exec's stderr) and the
# workers' own stderr.
_WORKER_START_LOGS = ("raylet.err", "raylet.out", "worker-*.err")


def ray_log_offsets() -> dict[Path, int]:
    """Current sizes (bytes) of the local Ray session's worker-start logs, for `ray_log_excerpt`."""
    logs = ray_logs_dir()
    if logs is None:
        return {}
    offsets = {}
    for pattern in _WORKER_START_LOGS:
        for path in logs.glob(pattern):
            with contextlib.suppress(OSError):
                offsets[path] = path.stat().st_size
    return offsets


def ray_log_excerpt(offsets: dict[Path, int], max_lines: int = 20) -> str:
    """Returns what the local Ray session logged about failed worker starts after `offsets` were taken.

    Reads only the bytes appended to the worker-start logs since `ray_log_offsets()` returned `offsets`
    (new files from their start), keeps lines matching known failure patterns, drops repeats, and returns
    the last `max_lines` of them, each prefixed with its file name. Empty when nothing was found.
    """
    logs = ray_logs_dir()
    if logs is None:
        return ""
    found: dict[str, None] = {}
    for pattern in _WORKER_START_LOGS:
        for path in sorted(logs.glob(pattern)):
            try:
                with path.open("rb") as f:
                    f.seek(offsets.get(path, 0))
                    text = f.read().decode(errors="replace")
            except OSError:
                continue
            for line in text.splitlines():
                if _LOG_PATTERN.search(line):
                    found.setdefault(f"{path.name}: {line.strip()}")
    return "\n".join("    " + line for line in list(found)[-max_lines:])


def _amounts(resources: dict[str, float]) -> str:
    return ", ".join(f"{name}={amount:g}" for name, amount in sorted(resources.items()))


def capacity_shortage(spec: EngineSpec, engines: int, free: dict[str, float]) -> str | None:
    """Why `engines` more engines of `spec` do not fit in the cluster's `free` resources
    (`ray.available_resources()` before they were requested), or None."""
    need = {"CPU": spec.num_cpus, "GPU": spec.num_gpus, **spec.resources}
    need = {name: amount * engines for name, amount in need.items() if amount}
    if all(free.get(name, 0.0) >= amount for name, amount in need.items()):
        return None
    return (
        f"the cluster had no free capacity for {engines} engine(s) when they were requested: they need "
        f"{_amounts(need)}, free were {_amounts({name: free.get(name, 0.0) for name in need})} (a node "
        "may have died, or other work holds the resources)"
    )


def node_disk_shortages(spec: EngineSpec, timeout_s: float = 10.0) -> list[str]:
    """One line per alive node whose PEX_ROOT filesystem has less free space than extracting the engine
    PEX needs (and has not extracted it yet), from a small task on every node; nodes that do not answer
    within `timeout_s` are left out."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    try:
        info = read_pex_info(spec.pex)
    except EnginePreflightError:
        return []
    needed = extraction_bytes(spec.pex, None, info)

    def probe(pex_root: str, pex_hash: str) -> tuple[str, str, int | None]:
        import os
        import shutil
        import socket
        from pathlib import Path

        root = Path(os.path.expandvars(pex_root)).absolute()
        if (root / "venvs" / "1" / pex_hash).is_dir():
            return socket.gethostname(), str(root), None
        existing = next(p for p in (root, *root.parents) if p.exists())
        return socket.gethostname(), str(root), shutil.disk_usage(existing).free

    task = ray.remote(num_cpus=0)(probe)
    refs = [
        task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote(
            spec.pex_root, str(info.get("pex_hash"))
        )
        for node in ray.nodes()
        if node.get("Alive")
    ]
    ready, late = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    for ref in late:
        ray.cancel(ref, force=True)
    lines = []
    for ref in ready:
        try:
            host, root, free = ray.get(ref)
        except ray.exceptions.RayError:
            continue
        if free is not None and free < needed:
            lines.append(f"node {host}: {no_space_message(root, free, needed, spec.pex)}")
    return lines


def missing_resources(spec: EngineSpec) -> None:
    """Fails fast when no node of the Ray cluster can ever hold one engine: Ray would keep such an actor
    pending without an error (an "infeasible" task), and the pool would wait for its deadline.

    Raises:
        EngineStartError: one engine needs more of a resource (CPU, GPU, TPU, ...) than the cluster has in
            total, naming the resource, both amounts and the option that asked for it.
    """
    wanted = {"CPU": spec.num_cpus, "GPU": spec.num_gpus, **spec.resources}
    total = ray.cluster_resources()
    for name, amount in wanted.items():
        if amount and total.get(name, 0.0) < amount:
            raise EngineStartError(
                f"each engine asks for {name}={amount:g}, but the Ray cluster has {name}="
                f"{total.get(name, 0.0):g} in total (nodes: {len(ray.nodes())}); lower the request "
                "(--engine-cpus, --engine-gpus, --engine-resources) or start the engines' nodes first"
            )
