"""Starts engine actors from the engine PEX and fails fast, with a reason, when they cannot start.

Ray starts an actor whose runtime_env is `{"py_executable": CMD}` by running
`bash -c "exec CMD <ray>/_private/workers/default_worker.py ..."` on the node: the engine PEX acts as the
interpreter of Ray's worker script, so `import ray`, `jax` or `vllm` inside the actor resolve to the PEX's
locked copies. Ray never copies the PEX, and when the worker cannot start (missing file, bad interpreter,
entry-point PEX, a Ray version that crashes at import) the raylet retries forever and the driver hangs.
This module therefore
  1. checks the PEX before any actor exists (`preflight`): readable, no entry point, runs as an
     interpreter, same Ray version and Python minor as the driver;
  2. waits for every actor's readiness probe under a deadline and, when it passes, kills the actors and
     raises `EngineStartError` carrying the tail of what Ray logged about the failed worker starts;
  3. can pre-extract the PEX into its venv under PEX_ROOT (`prepare`), so that actor starts are warm.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from shared.engine_host import DEFAULT_ENGINE_TARGET, EngineHost
from shared.engine_pex import (
    DEFAULT_PEX_ROOT,
    ENGINE_PEX_ENV,
    ENGINE_PYTHON_ENV,
    ENGINE_TARGET,
    PEX_ROOT_ENV,
    PEX_RUNTIME_VARS,
    pex_path,
    without_pex_vars,
)

# Where `./pants package src/engine:engine` writes the engine PEX, relative to the repository root.
DEFAULT_ENGINE_PEX = pex_path(ENGINE_TARGET)

# Run inside the PEX by `inspect_pex`: stdlib only, so it reports even a PEX that lacks Ray or `shared`.
_INSPECT_SCRIPT = """
import json, sys
report = {"python": "%d.%d" % sys.version_info[:2], "executable": sys.executable, "prefix": sys.prefix}
try:
    import ray
    report["ray"] = ray.__version__
except Exception as e:
    report["ray"] = None
    report["ray_error"] = "%s: %s" % (type(e).__name__, e)
try:
    import shared.engine_host
    report["engine_host"] = True
except Exception as e:
    report["engine_host"] = False
    report["engine_host_error"] = "%s: %s" % (type(e).__name__, e)
print("HERMETIC_ES_REPORT=" + json.dumps(report))
"""

# Lines of Ray's logs that explain a worker that never registered.
_LOG_PATTERN = re.compile(
    r"No such file|not found|Permission denied|not registered within the timeout|Traceback|Error|"
    r"error:|exec |Failed to start|Version mismatch|exited",
)


class EnginePreflightError(RuntimeError):
    """The engine PEX or its interpreter cannot work; raised before any actor is created."""


class EngineStartError(RuntimeError):
    """Engine actors did not become ready: one failed while starting, or the start deadline passed."""


@dataclass(frozen=True)
class EngineSpec:
    """How to start the engines.

    Attributes:
        pex: path of the engine PEX (a file, or a directory for the packed layout); made absolute.
        python: the CPython 3.12 that runs the PEX on every node (named explicitly, never the PEX shebang).
        pex_root: PEX_ROOT on every node; may contain `$VARS`, expanded by bash on each node.
        num_engines: number of engine actors.
        num_cpus / num_gpus: Ray resources per engine actor (logical units).
        resources: extra custom Ray resources per engine actor, e.g. {"TPU": 4}.
        target: "module:Class" of the engine, imported inside the actor.
        startup_timeout_s: seconds, from actor creation to all ready, for a node whose PEX is extracted.
        cold_start_allowance_s: extra seconds allowed when the PEX may still need extracting into
            PEX_ROOT on some node (a multi-GB engine PEX takes minutes on an empty PEX_ROOT); 0 when
            every node was prepared with `prepare`.
        venv: the PEX's venv relative to PEX_ROOT (`venvs/1/<pex_hash>/<interpreter>`), as `preflight`
            found and verified it; None to always start through the PEX. Where a node has it, workers
            start from the venv's interpreter directly, so no PEX bootstrap runs per worker; where it
            does not, they start through the PEX, which extracts it. The path holds the PEX's hash, so a
            venv of another PEX is never used.
    """

    pex: Path
    python: str
    pex_root: str = DEFAULT_PEX_ROOT
    num_engines: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)
    target: str = DEFAULT_ENGINE_TARGET
    startup_timeout_s: float = 45.0
    cold_start_allowance_s: float = 0.0
    venv: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "pex", Path(self.pex).absolute())
        if self.num_engines < 1:
            raise ValueError(f"num_engines must be >= 1, got {self.num_engines}")
        if self.startup_timeout_s <= 0 or self.cold_start_allowance_s < 0:
            raise ValueError("startup_timeout_s must be > 0 and cold_start_allowance_s >= 0")

    @property
    def deadline_s(self) -> float:
        """Seconds the pool waits for all engines to be ready."""
        return self.startup_timeout_s + self.cold_start_allowance_s

    def py_executable(self) -> str:
        """The command Ray execs as the worker's interpreter (bash expands `$VARS` on the node): the
        venv's interpreter if `venv` is set and exists on the node, else `python engine.pex`."""
        unset = " ".join(f"-u {name}" for name in PEX_RUNTIME_VARS)
        run = f"env {unset} PEX_ROOT={_dq(self.pex_root)}"
        through_pex = f"{_dq(self.python)} {_dq(str(self.pex))}"
        if self.venv is None:
            return f"{run} {through_pex}"
        venv_python = _dq(f"{self.pex_root}/{self.venv}/bin/python")
        return f"{run} /bin/sh -c '{_VENV_OR_PEX}' {_dq(self.python)} {venv_python} {_dq(str(self.pex))}"


# Run by /bin/sh with $0 = python, $1 = the venv's interpreter, $2 = the PEX, then Ray's worker arguments.
_VENV_OR_PEX = 'if [ -x "$1" ]; then v="$1"; shift 2; exec "$v" "$@"; fi; shift; exec "$0" "$@"'


def venv_of(spec: EngineSpec, report: dict[str, Any], pex_hash: str | None) -> str | None:
    """The venv `inspect_pex` reported (`report["prefix"]`), relative to the spec's PEX_ROOT, if it is
    the venv of the PEX whose PEX-INFO has `pex_hash` (its own PEX-INFO has the same); else None."""
    prefix, root = Path(report["prefix"]), Path(os.path.expandvars(spec.pex_root)).absolute()
    try:
        venv_info = json.loads((prefix / "PEX-INFO").read_text())
        relative = prefix.relative_to(root)
    except (OSError, ValueError):
        return None
    same = pex_hash is not None and venv_info.get("pex_hash") == pex_hash
    return str(relative) if same and (prefix / "bin" / "python").exists() else None


def _dq(value: str) -> str:
    """Double-quotes for bash: protects spaces, keeps `$VAR` expansion."""
    return '"' + re.sub(r'(["\\`])', r"\\\1", value) + '"'


def default_engine_pex() -> Path:
    """$HERMETIC_ES_ENGINE_PEX, else `DEFAULT_ENGINE_PEX` under the current directory."""
    return Path(os.environ.get(ENGINE_PEX_ENV) or DEFAULT_ENGINE_PEX).absolute()


def default_python() -> str:
    """$HERMETIC_ES_ENGINE_PYTHON, else the base interpreter under the driver (same Python minor)."""
    if os.environ.get(ENGINE_PYTHON_ENV):
        return os.environ[ENGINE_PYTHON_ENV]
    base = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    return str(base if base.exists() else Path(sys._base_executable))


def default_pex_root() -> str:
    """$HERMETIC_ES_PEX_ROOT, else `$HOME/.cache/hermetic-es/pex_root` (expanded on each node)."""
    return os.environ.get(PEX_ROOT_ENV) or DEFAULT_PEX_ROOT


def read_pex_info(pex: Path) -> dict[str, Any]:
    """Reads PEX-INFO from a PEX file (zipapp) or directory (packed/loose layout).

    Raises:
        EnginePreflightError: `pex` does not exist, is not readable, or has no readable PEX-INFO.
    """
    if not pex.exists():
        raise EnginePreflightError(
            f"engine PEX not found: {pex}. Build it with `./pants package src/engine:engine` "
            f"or point --engine-pex / ${ENGINE_PEX_ENV} at it."
        )
    try:
        if pex.is_dir():
            return json.loads((pex / "PEX-INFO").read_text())
        with zipfile.ZipFile(pex) as zf:
            return json.loads(zf.read("PEX-INFO"))
    except (OSError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as e:
        raise EnginePreflightError(f"{pex} is not a readable PEX (no valid PEX-INFO: {e})") from e


def extraction_bytes(pex: Path, pex_root: Path | None, info: dict[str, Any]) -> int:
    """Bytes that extracting `pex` into `pex_root` writes: the installed size of each of its wheels
    (PEX-INFO "distributions") not yet under PEX_ROOT/installed_wheels (every wheel when `pex_root` is
    None: an empty one), read from the zip directories (nothing is extracted)."""
    missing = {
        name
        for name, digest in info.get("distributions", {}).items()
        if pex_root is None or not (pex_root / "installed_wheels" / "0" / digest / name).exists()
    }
    total = 0
    if pex.is_dir():  # packed (.deps/<wheel> is a zip) or loose (.deps/<wheel>/ is a directory) layout
        for name in missing:
            wheel = pex / ".deps" / name
            if wheel.is_file():
                with zipfile.ZipFile(wheel) as zf:
                    total += sum(entry.file_size for entry in zf.infolist())
            elif wheel.is_dir():
                total += sum(f.stat().st_size for f in wheel.rglob("*") if f.is_file())
    else:  # zipapp: .deps/<wheel>/<file> entries
        with zipfile.ZipFile(pex) as zf:
            for entry in zf.infolist():
                parts = entry.filename.split("/")
                if len(parts) > 2 and parts[0] == ".deps" and parts[1] in missing:
                    total += entry.file_size
    return total


def check_free_space(spec: EngineSpec, info: dict[str, Any]) -> None:
    """Before a first extraction: the filesystem of PEX_ROOT on this node must have room for it
    (`extraction_bytes`), else Ray's worker start fails later with an unrelated-looking error.

    Raises:
        EnginePreflightError: naming PEX_ROOT, the free and the needed bytes.
    """
    root = Path(os.path.expandvars(spec.pex_root)).absolute()
    if (root / "venvs" / "1" / str(info.get("pex_hash"))).is_dir():
        return  # extracted already
    needed = extraction_bytes(spec.pex, root, info)
    existing = next(p for p in (root, *root.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise EnginePreflightError(no_space_message(str(root), free, needed, spec.pex))


def no_space_message(pex_root: str, free: int, needed: int, pex: Path) -> str:
    return (
        f"no space to extract the engine PEX {pex} into PEX_ROOT {pex_root}: {free / 1e9:.2f} GB free on "
        f"its filesystem, extracting needs about {needed / 1e9:.2f} GB. Free space there or point "
        f"--pex-root / ${PEX_ROOT_ENV} at a larger disk."
    )


def inspect_pex(spec: EngineSpec, timeout_s: float) -> dict[str, Any]:
    """Runs the PEX as an interpreter on this machine and returns what it reports about itself.

    The report has: python ("3.12"), executable, prefix, ray (version or None), ray_error,
    engine_host (bool). This also extracts the PEX into PEX_ROOT if it was not yet.

    Raises:
        EnginePreflightError: the interpreter does not exist, the PEX does not run, or it timed out.
    """
    cmd = [spec.python, str(spec.pex), "-c", _INSPECT_SCRIPT]
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=without_pex_vars(os.environ, os.path.expandvars(spec.pex_root)),
        )
    except FileNotFoundError as e:
        raise EnginePreflightError(
            f"engine interpreter {spec.python!r} does not exist ({e.strerror}). Install CPython "
            f"{sys.version_info.major}.{sys.version_info.minor} there or pass --engine-python / "
            f"${ENGINE_PYTHON_ENV}."
        ) from e
    except PermissionError as e:
        raise EnginePreflightError(f"engine interpreter {spec.python!r} is not executable: {e}") from e
    except subprocess.TimeoutExpired as e:
        raise EnginePreflightError(
            f"running {spec.pex} with {spec.python} did not finish within {timeout_s:.0f} s "
            "(a first extraction of a large PEX can take minutes: pre-extract it with "
            "`./pants run src/release:prepare-engine`)"
        ) from e
    for line in proc.stdout.splitlines():
        if line.startswith("HERMETIC_ES_REPORT="):
            return json.loads(line.split("=", 1)[1])
    raise EnginePreflightError(
        f"{spec.python} {spec.pex} does not run as an interpreter (exit code {proc.returncode}).\n"
        f"stderr (tail):\n{_tail(proc.stderr)}"
    )


def preflight(spec: EngineSpec, timeout_s: float | None = None) -> dict[str, Any]:
    """Checks that `spec` can start engines, before any actor is created. Returns `inspect_pex`'s report.

    Checks: the PEX exists and has a PEX-INFO; it has no entry point (Ray passes its worker arguments to
    an entry point); PEX_ROOT's filesystem has room to extract it (`check_free_space`); the interpreter
    runs it; Ray inside equals the driver's Ray; the Python minor inside
    equals the driver's; `shared.engine_host` imports inside. The report's "venv" is the PEX's venv on
    this node (`venv_of`), for `EngineSpec.venv`.

    Raises:
        EnginePreflightError: naming what is wrong and how to fix it.
    """
    info = read_pex_info(spec.pex)
    entry = info.get("entry_point") or info.get("script")
    if entry:
        raise EnginePreflightError(
            f"engine PEX {spec.pex} has an entry point ({entry!r}); Ray runs the PEX as an interpreter and "
            "would pass its worker arguments to it. Build the engine pex_binary without entry_point/script "
            "(src/engine:engine has none)."
        )
    check_free_space(spec, info)
    report = inspect_pex(spec, timeout_s if timeout_s is not None else max(60.0, spec.deadline_s))
    driver_python = f"{sys.version_info.major}.{sys.version_info.minor}"
    if report["python"] != driver_python:
        raise EnginePreflightError(
            f"engine PEX runs on Python {report['python']} ({spec.python}), the driver on {driver_python}; "
            "Ray needs the same Python minor version on both sides. Pass an interpreter of "
            f"Python {driver_python} with --engine-python / ${ENGINE_PYTHON_ENV}."
        )
    if report["ray"] is None:
        raise EnginePreflightError(
            f"engine PEX {spec.pex} cannot import ray ({report.get('ray_error')}); it must be built from "
            "the engine resolve, which locks the same ray as the driver: ./pants package src/engine:engine"
        )
    if report["ray"] != ray.__version__:
        raise EnginePreflightError(
            f"engine PEX has ray {report['ray']}, driver has {ray.__version__}: rebuild with "
            "./pants package src/engine:engine (both resolves must lock the same ray; see "
            "tests/test_lockfile_policy.py)"
        )
    if not report["engine_host"]:
        raise EnginePreflightError(
            f"engine PEX {spec.pex} lacks the shared engine host ({report.get('engine_host_error')}); "
            "build it from src/engine:engine, which includes src/shared"
        )
    report["venv"] = venv_of(spec, report, info.get("pex_hash"))
    return report


def prepare(spec: EngineSpec, timeout_s: float = 1800.0) -> str:
    """Pre-extracts the engine PEX into its venv under PEX_ROOT on this node, with every `preflight`
    check (so a missing or broken PEX gives the preflight's error). Returns the venv prefix.

    Later actor starts with the same PEX, interpreter and PEX_ROOT find the venv and skip extraction.

    Raises:
        EnginePreflightError: as `preflight`.
    """
    return preflight(spec, timeout_s)["prefix"]


def _tail(text: str, lines: int = 20) -> str:
    return "\n".join("    " + line for line in text.strip().splitlines()[-lines:])


def _ray_logs_dir() -> Path | None:
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
    logs = _ray_logs_dir()
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
    logs = _ray_logs_dir()
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


@dataclass
class EnginePool:
    """Running engine actors. `handles[i]` is a Ray actor handle of `EngineHost`; `reports[i]` its
    readiness report (environment_report of the actor plus the engine target)."""

    spec: EngineSpec
    handles: list[Any]
    reports: list[dict[str, Any]]
    report_packages: tuple[str, ...] = ()

    @classmethod
    def start(cls, spec: EngineSpec, check: bool = True, report_packages: tuple[str, ...] = ()) -> EnginePool:
        """Preflights `spec` (unless `check` is False), starts `spec.num_engines` actors and waits until
        each is ready, at most `spec.deadline_s` seconds. Ray must be initialised. The engine class of
        `spec.target` receives `engine_id=i` (0-based index in the pool).

        Args:
            report_packages: distributions whose versions each actor reports in `reports`.

        Raises:
            EnginePreflightError: see `preflight`.
            EngineStartError: the Ray cluster lacks a resource an engine asks for (`missing_resources`),
                an engine failed to start (its error included) or the deadline passed (the tail of Ray's
                logs about the failed worker starts included). No actor is left running.
        """
        if check:
            spec = dataclasses.replace(spec, venv=preflight(spec)["venv"])
        pool = cls(spec, [], [], tuple(report_packages))
        pool.handles, pool.reports = pool._create(list(range(spec.num_engines)))
        return pool

    def _create(self, engine_ids: list[int]) -> tuple[list[Any], list[dict[str, Any]]]:
        """Creates one actor per engine id and waits for all to be ready (see `start`)."""
        spec = self.spec
        missing_resources(spec)
        remote_host = ray.remote(EngineHost).options(
            num_cpus=spec.num_cpus,
            num_gpus=spec.num_gpus,
            resources=dict(spec.resources),
            runtime_env={"py_executable": spec.py_executable()},
            max_restarts=0,
        )
        log_offsets = ray_log_offsets()
        free = ray.available_resources()
        started = time.time()
        handles = [remote_host.remote(spec.target, engine_id=i) for i in engine_ids]
        pending = {handle.ready.remote(self.report_packages): k for k, handle in enumerate(handles)}
        reports: list[dict[str, Any] | None] = [None] * len(handles)
        deadline = started + spec.deadline_s
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.time()))
                if not done:
                    shortage = capacity_shortage(spec, len(engine_ids), free)
                    raise EngineStartError(self._timeout_message(spec, log_offsets, len(pending), shortage))
                k = pending.pop(done[0])
                try:
                    reports[k] = ray.get(done[0])
                except ray.exceptions.RayError as e:
                    raise EngineStartError(
                        f"engine {engine_ids[k]} ({spec.target}) failed while starting from {spec.pex}:\n{e}"
                    ) from e
        except BaseException:
            for handle in handles:
                ray.kill(handle, no_restart=True)
            raise
        return handles, reports

    def restart(self, index: int) -> dict[str, Any]:
        """Replaces engine `index` (dead or alive) with a new actor from the same PEX, with
        `engine_id=index`; returns its readiness report. The new engine has no state: the
        caller loads the model into it.

        Raises:
            EngineStartError: as `start`.
        """
        with contextlib.suppress(Exception):
            ray.kill(self.handles[index], no_restart=True)
        (handle,), (report,) = self._create([index])
        self.handles[index] = handle
        self.reports[index] = report
        return report

    @staticmethod
    def _timeout_message(
        spec: EngineSpec, log_offsets: dict[Path, int], waiting: int, shortage: str | None
    ) -> str:
        excerpt = ray_log_excerpt(log_offsets)
        causes = [shortage, *node_disk_shortages(spec)]
        found = "".join(f"Cause: {cause}.\n" for cause in causes if cause)
        return found + (
            f"{waiting} of {spec.num_engines} engine actors did not start within {spec.deadline_s:.0f} s "
            f"(--engine-start-timeout {spec.startup_timeout_s:.0f} s + {spec.cold_start_allowance_s:.0f} s "
            "allowed for extracting the PEX on other nodes). Ray keeps retrying a worker that cannot start "
            "instead of failing, so the pool gave up. Check that every node has the engine PEX at "
            f"{spec.pex}, the interpreter {spec.python}, and a writable PEX_ROOT ({spec.pex_root}); "
            "a first extraction of a large PEX needs a larger --engine-start-timeout or a "
            "pre-extracted PEX (./pants run src/release:prepare-engine).\n"
            + (f"Ray logged:\n{excerpt}" if excerpt else "Ray logged nothing about it on this node.")
        )

    def call(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """Calls the engine method `method` (any public one, through `EngineHost.call`) on every engine and
        returns their results in engine order."""
        return ray.get([h.call.remote(method, *args, **kwargs) for h in self.handles])

    def shutdown(self) -> None:
        """Kills the engine actors."""
        for handle in self.handles:
            ray.kill(handle, no_restart=True)
        self.handles = []
