"""Starts engine actors from the engine PEX and fails fast, with a reason, when they cannot start.

Ray starts each actor with the engine PEX as its interpreter (`engine_spec.EngineSpec.py_executable`).
Ray never copies the PEX, and when the worker cannot start the raylet retries forever and the driver
hangs. The pool therefore
  1. checks the PEX before any actor exists (`engine_preflight.preflight`);
  2. fails at once when no node can hold an engine (`engine_diagnostics.missing_resources`);
  3. waits for every actor's readiness probe under a deadline and, when it passes, kills the actors and
     raises `EngineStartError` carrying the causes found (`engine_diagnostics`: Ray's log lines about the
     failed worker starts, the cluster's capacity, each node's disk).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from driver.engine_diagnostics import (
    EngineStartError,
    capacity_shortage,
    missing_resources,
    node_disk_shortages,
    ray_log_excerpt,
    ray_log_offsets,
)
from driver.engine_preflight import preflight
from driver.engine_spec import EngineSpec
from shared.engine_host import EngineHost

__all__ = ["EnginePool", "EngineSpec", "EngineStartError"]


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
            engine_preflight.EnginePreflightError: see `engine_preflight.preflight`.
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
