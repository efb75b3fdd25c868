"""Keeping the engines consistent: every engine holds the run's weights, or is brought back to them.

The fleet loads the run's weights into every engine (an anchor, a model directory, plus the updates since,
replayed), applies each update to all and checks that their weight fingerprints agree (the majority
holds the run's weights; ties: the lowest engine index). An engine whose fingerprint differs is resynced
from a live engine that holds the run's weights (its fp32 master is copied, with a warning). An engine
actor that dies is restarted from the engine PEX, loaded with the anchor plus the updates since and
checked, so the run's result does not depend on the failure: every engine computes the same weights from
the same (seed, coefficient) pairs (Qiu et al. 2025, Sec. 3: seeded noise, exact restore).
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable
from typing import Any

import ray
from tqdm import tqdm

from driver.checkpointing import Anchor, CheckpointError, LoadPlan
from driver.engine_pool import EnginePool, EngineSpec
from driver.stop_request import Stopped, StopRequest
from driver.train_config import TrainConfig
from shared.protocol import LoadRequest, VLLMOptions

# Restarts allowed per engine before the run gives up.
MAX_RESTARTS_PER_ENGINE = 3
# Seconds to wait for an engine's phase timings after an update (they are only metrics).
_SECONDS_TIMEOUT_S = 5.0

# One ES update: (seed, coefficient) pairs (`driver.strategy.Strategy.tell`).
Update = list[tuple[int, float]]


class EngineSyncError(RuntimeError):
    """Engines disagree on the weights and could not be resynced."""


def load_request(config: TrainConfig, anchor: Anchor) -> LoadRequest:
    """What every engine of the run loads: `anchor`'s weights with the run's backend, dtype and options.
    `device` is the run's `TrainConfig.device_type` ("cpu", "cuda" or "tpu"): the transformers backend's
    torch device, and for vLLM (which picks its own platform) the device its manifest entry reports."""
    return LoadRequest(
        model_dir=anchor.model_dir,
        backend="vllm" if config.backend == "vllm" else "transformers",
        dtype=config.dtype,
        device=config.device_type,
        restore_mode=config.restore_mode,
        master_path=anchor.master_path,
        deterministic=config.deterministic,
        vllm=VLLMOptions(
            tensor_parallel_size=config.tensor_parallel_size,
            gpu_memory_utilization=config.gpu_memory_utilization,
            max_model_len=config.max_model_len,
            cpu_kv_cache_gib=config.cpu_kv_cache_gib,
            cpu_linear=config.cpu_linear,
            emulate_tpu=config.emulate_tpu,
            member_slots=config.member_slots(),
        ),
        perturbation=config.perturbation_spec(),
    )


class EngineFleet:
    """The run's engine actors and the weights they hold.

    Args:
        config: the run's configuration (what each engine loads: `load_request`).
        spec: how to start the engines (from the engine PEX).
        updates_since: the updates made since `anchor.updates` (the argument), oldest first: what a
            restarted engine replays.
        stop: the run's stop request (once requested, no restart is begun: `Stopped`); None: never.

    Attributes:
        pool: the running actors (`driver.engine_pool.EnginePool`), None before `start`.
        anchor: the weights the updates since are replayed onto (the newest full checkpoint or the base
            model), None before `load_weights`.
        fingerprint: the run's weight fingerprint (hex), None before the weights are loaded.
        machines: each engine's `LoadResult.machine`, for the manifest.
    """

    def __init__(
        self,
        config: TrainConfig,
        spec: EngineSpec,
        updates_since: Callable[[int], list[Update]],
        stop: StopRequest | None = None,
    ) -> None:
        self.config = config
        self.spec = spec
        self.updates_since = updates_since
        self.stop = stop
        self.pool: EnginePool | None = None
        self.anchor: Anchor | None = None
        self.fingerprint: str | None = None
        self.machines: list[dict[str, Any]] = []
        self.restarts: Counter[int] = Counter()

    @property
    def handles(self) -> list[Any]:
        """The engine actors' handles, by engine index."""
        return self.pool.handles

    def start(self, report_packages: tuple[str, ...] = ()) -> None:
        """Starts the engine actors (`EnginePool.start`). Raises EngineStartError."""
        self.pool = EnginePool.start(self.spec, check=False, report_packages=report_packages)

    def shutdown(self) -> None:
        """Stops the engine actors, if started."""
        if self.pool is not None:
            self.pool.shutdown()

    def _load(self, index: int, anchor: Anchor) -> Any:
        """Starts loading `anchor` into engine `index`; returns the ObjectRef of its `LoadResult`."""
        return self.handles[index].load_model.remote(load_request(self.config, anchor))

    def _replay(self, indices: list[int], updates: list[Update]) -> list[str]:
        """Applies `updates` (oldest first) to the engines `indices`, all together; returns their
        fingerprints after the last one (no updates: [])."""
        fingerprints: list[str] = []
        for pairs in updates:
            fingerprints = ray.get([self.handles[i].apply_update.remote(pairs) for i in indices])
        return fingerprints

    def load_weights(self, plan: LoadPlan, where: str) -> int:
        """Loads `plan`'s anchor into every engine, replays its updates and checks the weights against
        its fingerprint (`where` names the checkpoint in errors); sets the anchor and the fingerprint.
        Returns the number of parameters.

        Raises:
            CheckpointError: the replayed weights differ from the checkpoint's. EngineSyncError: engines
                loaded different weights.
        """
        self.anchor = plan.anchor
        loaded = ray.get([self._load(i, plan.anchor) for i in range(len(self.handles))])
        fingerprints = [r.fingerprint for r in loaded]
        self.machines = [r.machine for r in loaded]
        if plan.updates:
            tqdm.write(f"replaying {len(plan.updates)} updates onto {plan.anchor.model_dir}")
            fingerprints = self._replay(list(range(len(self.handles))), plan.updates)
            if plan.fingerprint is not None and plan.fingerprint not in fingerprints:
                raise CheckpointError(
                    f"{where}: replaying its {len(plan.updates)} updates onto {plan.anchor.model_dir} "
                    f"gave weights {fingerprints[0][:12]}, the run recorded {plan.fingerprint[:12]}: "
                    "these engines compute differently from the ones that wrote it (compare the manifest's "
                    "engine machines)"
                )
        self.fingerprint = plan.fingerprint
        self._check_agreement(fingerprints, "after loading the model")
        return loaded[0].parameters

    def bring_up(self, index: int, reason: str) -> None:
        """Restarts engine `index` from the PEX and brings it to the run's weights (anchor + updates
        since), resyncing it from a healthy engine if its fingerprint still differs.

        Raises:
            Stopped: a stop was requested. EngineStartError: the actor could not be restarted.
            EngineSyncError: too many restarts.
        """
        if self.stop is not None and self.stop.requested:
            raise Stopped
        self.restarts[index] += 1
        if self.restarts[index] > MAX_RESTARTS_PER_ENGINE:
            raise EngineSyncError(f"engine {index} failed {self.restarts[index]} times; giving up ({reason})")
        tqdm.write(f"warning: engine {index} {reason}; restarting it from {self.spec.pex}")
        self.pool.restart(index)
        loaded = ray.get(self._load(index, self.anchor))
        since = self.updates_since(self.anchor.updates)
        fingerprint = (self._replay([index], since) or [loaded.fingerprint])[0]
        if fingerprint != self.fingerprint:
            self._resync([index], f"after restart it has {fingerprint[:12]}")
        updates = self.anchor.updates + len(since)
        tqdm.write(f"engine {index} restarted at {self.fingerprint[:12]} (updates {updates})")

    def _resync_source(self, exclude: list[int]) -> int:
        """The first engine outside `exclude` that is alive and holds the run's weights: the only engines
        a resync may copy from.

        Raises:
            EngineSyncError: no engine qualifies.
        """
        for i, handle in enumerate(self.handles):
            if i in exclude:
                continue
            try:
                if ray.get(handle.fingerprint.remote()) == self.fingerprint:
                    return i
            except ray.exceptions.RayActorError:
                continue
        raise EngineSyncError(
            f"no live engine holds the run's weights {self.fingerprint[:12]} to resync engines {exclude} from"
        )

    def _resync(self, indices: list[int], why: str) -> None:
        """Copies the fp32 master of an engine that holds the run's weights into the engines `indices` and
        checks them."""
        source = self._resync_source(indices)
        warnings.warn(
            f"engines {indices} diverged ({why}); resyncing their weights from engine {source}",
            RuntimeWarning,
            stacklevel=2,
        )
        master = self.handles[source].export_master.remote()
        got = ray.get([self.handles[i].import_master.remote(master) for i in indices])
        if any(fp != self.fingerprint for fp in got):
            raise EngineSyncError(f"engines {indices} still differ after a resync: {got}")

    def call_one(self, index: int, method: str, *args: Any, **kwargs: Any) -> Any:
        """Calls the `shared.protocol.Engine` method `method` on engine `index`; if the engine died, brings
        it up and calls once more."""
        try:
            return ray.get(getattr(self.handles[index], method).remote(*args, **kwargs))
        except ray.exceptions.RayActorError as e:
            self.bring_up(index, f"died during {method} ({type(e).__name__})")
            return ray.get(getattr(self.handles[index], method).remote(*args, **kwargs))

    def apply_update(self, update: Update) -> None:
        """Applies `update` on every engine and checks that all fingerprints agree; the majority becomes
        the run's fingerprint. An engine that died is brought up afterwards: `updates_since` must already
        hold the update, which it replays.

        Raises:
            EngineSyncError: every engine died, or a resync failed.
        """
        refs = [h.apply_update.remote(update) for h in self.handles]
        fingerprints: list[str | None] = []
        dead = []
        for i, ref in enumerate(refs):
            try:
                fingerprints.append(ray.get(ref))
            except ray.exceptions.RayActorError as e:
                fingerprints.append(None)
                dead.append((i, e))
        if len(dead) == len(refs):
            raise EngineSyncError("every engine died while applying the update")
        self._check_agreement(fingerprints, "update")
        for i, e in dead:
            self.bring_up(i, f"died during apply_update ({type(e).__name__})")

    def take_update_seconds(self) -> dict[str, float]:
        """Seconds the engines spent in `apply_update` since the last call, summed over engines:
        {"update": s, "fingerprint": s}. An engine that does not answer within a few seconds counts 0."""
        totals = {"update": 0.0, "fingerprint": 0.0}
        refs = [h.take_update_seconds.remote() for h in self.handles]
        for ref in refs:
            try:
                seconds = ray.get(ref, timeout=_SECONDS_TIMEOUT_S)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                continue
            for phase in totals:
                totals[phase] += float(seconds.get(phase, 0.0))
        return totals

    def _check_agreement(self, fingerprints: list[str | None], when: str) -> None:
        """Sets the run's fingerprint to the majority (ties: the lowest engine index) and resyncs the
        engines that differ."""
        votes = Counter(fp for fp in fingerprints if fp is not None)
        majority = votes.most_common(1)[0][0]
        if self.fingerprint is not None and majority != self.fingerprint and when != "update":
            raise EngineSyncError(f"engines hold {majority[:12]} {when}, expected {self.fingerprint[:12]}")
        self.fingerprint = majority
        odd = [i for i, fp in enumerate(fingerprints) if fp is not None and fp != majority]
        if odd:
            self._resync(odd, f"fingerprints {[fingerprints[i][:12] for i in odd]} != {majority[:12]} {when}")
