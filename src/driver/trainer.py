"""The ES fine-tuning loop on the driver: members out to the engines, rewards in, one update to all.

Per iteration k (Qiu et al. 2025, Alg. 1): the strategy asks N member seeds; every member is scored on the
same batch of `prompts_per_member` training problems (chosen by `shared.seeds.prompt_rank`); members are
handed to the engines dynamically (an engine that finishes takes the next member, as the reference's
accelerated version does); the member reward is the mean Countdown reward over the batch; the strategy
turns the shaped rewards into an update, given to every engine as (seed, coefficient) pairs; then the
engines' weight fingerprints must agree. An engine whose fingerprint differs is resynced from a healthy
engine (with a warning). An engine actor that dies is restarted from the engine PEX, loaded with the last
full checkpoint (or the base model) plus the updates since, and its member re-run, so the run's result
does not depend on the failure: every member's evaluation is deterministic (seeded noise, greedy decoding,
exact restore). When its node died, Ray places the new actor on the remaining capacity; when there is
none within the engine start timeout, the run writes a checkpoint and stops with a message saying so.

Evaluation is the greedy reward and accuracy (the task's accuracy component; Countdown: answer reward 1)
on the held-out split, unperturbed, before training,
every `eval_every` iterations and at the end. Checkpoints (`driver.checkpointing`: compact, or full every
`full_checkpoint_every` iterations) are written every `checkpoint_every` iterations, at the end, and when
the run is stopped by SIGTERM or Ctrl-C. A stop writes a compact checkpoint of the last finished
iteration at once (it needs no engine: on a preempted VM the engines and the raylet get the signal too,
and Ray ends the driver when its raylet is gone), then finishes the current iteration when that fits in
`stop_deadline` seconds (estimated from the members done so far) and checkpoints it, else drops it.
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
import warnings
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import ray
from tqdm import tqdm

from driver.checkpointing import (
    Anchor,
    CheckpointError,
    LoadPlan,
    ResumePoint,
    es_state,
    full_due,
    load_plan,
    model_digest,
    prune,
    resume_point,
    weight_files,
)
from driver.engine_pool import EnginePool, EngineSpec, EngineStartError
from driver.manifest import session_entry
from driver.strategy import Strategy
from driver.task_data import Problems, load_problems, prompt_batch
from driver.train_config import TrainConfig, merge_for_resume
from shared.protocol import (
    REPORTED_DISTRIBUTIONS,
    REPORTED_MODULES,
    LoadRequest,
    Member,
    RolloutRequest,
    RolloutResult,
    VLLMOptions,
)
from shared.run_layout import COMPACT, FULL, RunDir, RunDirError, checkpoint_files, write_json_atomic
from shared.tasks import mean_components

# Warm-start steps of the tiny default model: measured, 55 steps leave it between not answering in the
# task's format and always doing so, where perturbed members' rewards differ (40: never, 80: always).
TINY_WARM_START_STEPS = 55
# Restarts allowed per engine before the run gives up.
MAX_RESTARTS_PER_ENGINE = 3
# Seconds between checks for a stop request while waiting on engines (a signal handler runs only once the
# wait returns).
_POLL_S = 0.1
# Rollouts queued on each engine: with one, an engine idles between members while the driver collects a
# result and sends the next (a round trip, longer across nodes than on one machine); two hide that.
_IN_FLIGHT = 2
# Seconds to wait for an engine's phase timings after an update (they are only metrics).
_SECONDS_TIMEOUT_S = 5.0
# Signals that stop a run cleanly (a second one aborts at once); exit status 128 + the signal's number.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(Exception):
    """A stop was requested (SIGTERM, Ctrl-C) and the current iteration is dropped (raised inside the
    loop only)."""


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
        ),
    )


# Called after each member result: (trainer, iteration, member index, engine index).
MemberHook = Callable[["Trainer", int, int, int], None]


def open_run(
    config: TrainConfig, given: set[str] | None = None
) -> tuple[TrainConfig, Problems, ResumePoint | None]:
    """Checks the output directory for a new or resumed run and loads the run's problems
    (`driver.task_data.load_problems`), before anything starts. A resumed run's problems come from its
    saved config (task, dataset, split), so a plain `--resume --output-dir DIR` finds them.

    Returns:
        (config, problems, resume): for --resume the saved config merged with the allowed overrides
        (`merge_for_resume`) and the newest checkpoint that verifies (`checkpointing.resume_point`; None
        if the run has none yet).

    Raises:
        RunDirError: a new run where one exists, or --resume where none exists, or another dataset, or
            checkpoints none of which verifies.
        ConfigError: --resume with options that differ from the saved run's.
        DatasetError: the dataset is missing or malformed.
    """
    run_dir = RunDir(config.output_dir)
    if not config.resume:
        if run_dir.has_run():
            raise RunDirError(
                f"--output-dir: {run_dir.root} already holds a run; pass --resume to continue it "
                "or choose another --output-dir"
            )
        return config, load_problems(config), None
    if not run_dir.has_run():
        raise RunDirError(f"--resume: {run_dir.root} holds no run (no config.json)")
    try:
        saved = run_dir.read_config()
    except RunDirError as e:
        raise RunDirError(f"--resume: {e}") from e
    config = merge_for_resume(saved, config, given or set(), str(run_dir.config))
    problems = load_problems(config)
    try:
        resume = resume_point(run_dir)
    except CheckpointError as e:
        raise RunDirError(f"--resume: {e}") from e
    if resume is None:
        return config, problems, None
    if resume.state["problems_digest"] != problems.digest():
        raise RunDirError(
            f"--resume: the dataset differs from the one {resume.path} was trained on (problems digest "
            "mismatch); resume with the same dataset file"
        )
    return config, problems, resume


class Trainer:
    """One training run: `run()` it with Ray initialised (after `open_run` validated the output dir).

    Args:
        config: the run's configuration (from `open_run`).
        spec: how to start the engines (from the engine PEX).
        problems: the dataset, from `load_problems`.
        resume: the checkpoint to go on from when resuming (from `open_run`), else None.
        argv: the command line, recorded in the manifest.
        on_member_done: optional hook after each member result (tests use it to inject faults).
    """

    def __init__(
        self,
        config: TrainConfig,
        spec: EngineSpec,
        problems: Problems,
        resume: ResumePoint | None = None,
        argv: list[str] | None = None,
        on_member_done: MemberHook | None = None,
    ) -> None:
        self.config = config
        self.run_dir = RunDir(config.output_dir)
        self.spec = spec
        self.problems = problems
        self.resume = resume
        self.argv = list(argv or [])
        self.on_member_done = on_member_done
        self.pool: EnginePool | None = None
        self.strategy = Strategy(config=config.strategy_config(), root_seed=config.seed)
        self.fingerprint: str | None = None
        self.anchor: Anchor | None = None
        self.restarts: Counter[int] = Counter()
        # {"path", "digest"} of the base model (None when the driver cannot read it: only full checkpoints).
        self.base_model: dict[str, str] | None = None
        self.saved_updates: int | None = None  # updates of the newest checkpoint written or resumed from
        self.machines: list[dict[str, Any]] = []  # each engine's LoadResult.machine
        self._stop = False
        self.stop_signal: int | None = None  # the signal that requested a stop
        self._stop_at: float | None = None  # time.monotonic() by which the run should have stopped
        self._member_s: float | None = None  # wall seconds per member in the last iteration
        self._update_s = 0.0  # wall seconds of the last update
        # False between `tell` and the engines' confirmation of the update, and while a checkpoint is being
        # written: a signal handler may checkpoint only when True.
        self._safe_to_checkpoint = True
        self._writer = None

    # ---- engines -----------------------------------------------------------------------------------

    def _load(self, index: int, anchor: Anchor) -> Any:
        """Starts loading `anchor` into engine `index`; returns the ObjectRef of its `LoadResult`."""
        request = load_request(self.config, anchor)
        return self.pool.handles[index].load_model.remote(request)

    def _replay(self, indices: list[int], updates: list[list[tuple[int, float]]]) -> list[str]:
        """Applies `updates` (one list of (seed, coefficient) pairs per ES update, oldest first) to the
        engines `indices`, all together; returns their fingerprints after the last one (none: [])."""
        fingerprints: list[str] = []
        for pairs in updates:
            fingerprints = ray.get([self.pool.handles[i].apply_update.remote(pairs) for i in indices])
        return fingerprints

    def _bring_up(self, index: int, reason: str) -> None:
        """Restarts engine `index` from the PEX and brings it to the current weights (anchor + updates
        since), resyncing from a healthy engine if its fingerprint still differs.

        Raises:
            EngineStartError: the actor could not be restarted. EngineSyncError: too many restarts.
        """
        if self._stop:
            raise Stopped
        self.restarts[index] += 1
        if self.restarts[index] > MAX_RESTARTS_PER_ENGINE:
            raise EngineSyncError(f"engine {index} failed {self.restarts[index]} times; giving up ({reason})")
        tqdm.write(f"warning: engine {index} {reason}; restarting it from {self.spec.pex}")
        self.pool.restart(index)
        loaded = ray.get(self._load(index, self.anchor))
        since = [record["update"] for record in self.strategy.history[self.anchor.updates :]]
        fingerprint = (self._replay([index], since) or [loaded.fingerprint])[0]
        if fingerprint != self.fingerprint:
            self._resync([index], f"after restart it has {fingerprint[:12]}")
        tqdm.write(f"engine {index} restarted at {self.fingerprint[:12]} (updates {self.strategy.iteration})")

    def _resync_source(self, exclude: list[int]) -> int:
        """The first engine outside `exclude` that is alive and holds the run's weights (its fingerprint
        is the run's): the only engines a resync may copy from.

        Raises:
            EngineSyncError: no engine qualifies.
        """
        for i, handle in enumerate(self.pool.handles):
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
        master = self.pool.handles[source].export_master.remote()
        got = ray.get([self.pool.handles[i].import_master.remote(master) for i in indices])
        if any(fp != self.fingerprint for fp in got):
            raise EngineSyncError(f"engines {indices} still differ after a resync: {got}")

    def _call_one(self, index: int, method: str, *args: Any, **kwargs: Any) -> Any:
        """Calls the `shared.protocol.Engine` method `method` on engine `index`; if the engine died, brings
        it up and calls once more."""
        try:
            return ray.get(getattr(self.pool.handles[index], method).remote(*args, **kwargs))
        except ray.exceptions.RayActorError as e:
            self._bring_up(index, f"died during {method} ({type(e).__name__})")
            return ray.get(getattr(self.pool.handles[index], method).remote(*args, **kwargs))

    def _apply_update(self, update: list[tuple[int, float]]) -> None:
        """Applies `update` on every engine and checks that all fingerprints agree. An engine that died
        is brought up afterwards: the update is already in the history it replays."""
        refs = [h.apply_update.remote(update) for h in self.pool.handles]
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
            self._bring_up(i, f"died during apply_update ({type(e).__name__})")

    def _take_update_seconds(self) -> dict[str, float]:
        """Seconds the engines spent in `apply_update` since the last call, summed over engines:
        {"update": s, "fingerprint": s}. An engine that does not answer within a few seconds counts 0."""
        totals = {"update": 0.0, "fingerprint": 0.0}
        refs = [h.take_update_seconds.remote() for h in self.pool.handles]
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

    def _finishing_fits(self, done: int, total: int, started: float) -> bool:
        """Whether, after a stop request, the rest of an iteration (`done` of `total` members finished
        since `started`, a time.monotonic()) and its update fit before the stop deadline: estimated from
        this iteration's members, else the last iteration's."""
        now = time.monotonic()
        # Wall seconds per member, all engines together.
        per_member = (now - started) / done if done else self._member_s
        if per_member is None:
            return False
        return now + per_member * (total - done) + self._update_s <= self._stop_at

    def _rollouts(
        self,
        tasks: list[tuple[Any, RolloutRequest]],
        bar: tqdm,
        on_done: Callable[[int, int], None],
        finish_on_stop: bool = False,
    ) -> list[RolloutResult]:
        """Runs rollout tasks (problems or their ObjectRef, request) over the engines, `_IN_FLIGHT` queued
        on each engine (so an engine starts its next member without waiting for the driver), the next task
        to the first engine with a free slot. A task whose engine died is re-run after the engine is
        brought up (once, whatever else was queued on it).

        Args:
            finish_on_stop: after a stop request, go on while the tasks still fit before the deadline
                (`_finishing_fits`); otherwise stop at once.

        Raises:
            Stopped: a stop was requested (and the tasks do not fit). Engine errors other than a dead
                actor propagate.
        """
        started = time.monotonic()
        finished = 0
        queue = deque(range(len(tasks)))
        engines = range(len(self.pool.handles))
        free = deque(engine for _ in range(_IN_FLIGHT) for engine in engines)  # slots, engines interleaved
        in_flight: dict[Any, tuple[int, int, Any]] = {}  # ref -> (task, engine, the handle it went to)
        results: list[RolloutResult | None] = [None] * len(tasks)
        while queue or in_flight:
            while queue and free:
                engine, task = free.popleft(), queue.popleft()
                problems, request = tasks[task]
                handle = self.pool.handles[engine]
                in_flight[handle.evaluate.remote(problems, request)] = (task, engine, handle)
            done, _ = ray.wait(list(in_flight), num_returns=1, timeout=_POLL_S)
            if self._stop and not (finish_on_stop and self._finishing_fits(finished, len(tasks), started)):
                raise Stopped
            for ref in done:
                task, engine, handle = in_flight.pop(ref)
                try:
                    results[task] = ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    queue.appendleft(task)
                    if self.pool.handles[engine] is handle:  # not brought up yet for another of its tasks
                        self._bring_up(engine, f"died during task {task} ({type(e).__name__})")
                else:
                    finished += 1
                    bar.update(1)
                    on_done(task, engine)
                free.append(engine)
        if finish_on_stop and tasks:
            self._member_s = (time.monotonic() - started) / len(tasks)
        return results

    # ---- outputs -----------------------------------------------------------------------------------

    def _scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self._writer.add_scalar(f"{prefix}/{name}", value, step)
        self._writer.flush()

    def _checkpoint(self, full: bool) -> Path:
        """Writes the checkpoint of the current weights: full (engine 0 writes the model directory) or
        compact (ES state only, no engine involved); compact only when the base model's identity is known.
        Then applies the retention policy (--keep-full).

        Raises:
            CheckpointError: it could not be written completely (disk full, permissions); nothing of it
                is left and the earlier checkpoints are intact.
            EngineSyncError: engine 0 saved other weights than the run's.
        """
        updates = self.strategy.iteration
        full = full or self.base_model is None
        path = self.run_dir.checkpoint_path(updates)
        safe, self._safe_to_checkpoint = self._safe_to_checkpoint, False
        try:
            with self.run_dir.new_checkpoint(updates) as tmp:
                has_master = False
                if full:
                    saved = self._call_one(0, "save_checkpoint", str(tmp))
                    if saved.fingerprint != self.fingerprint:
                        raise EngineSyncError(
                            f"engine 0 saved {saved.fingerprint[:12]}, expected {self.fingerprint[:12]}"
                        )
                    has_master = saved.master is not None
                state = es_state(
                    files=weight_files(tmp) if full else None,
                    kind=FULL if full else COMPACT,
                    updates=updates,
                    anchor=updates if full else self.anchor.updates,
                    fingerprint=self.fingerprint,
                    strategy=self.strategy.state_dict(),
                    problems_digest=self.problems.digest(),
                    has_master=has_master,
                    base_model=self.base_model,
                    device=self.config.device_type,
                )
                write_json_atomic(checkpoint_files(tmp).es_state, state, sort_keys=False)
        except (OSError, ray.exceptions.RayTaskError) as e:
            latest = self.run_dir.latest_checkpoint()
            raise CheckpointError(
                f"cannot write the checkpoint {path}: {e}. Nothing of it was kept; the earlier checkpoints "
                f"are intact (latest: {latest[1] if latest else 'none'})"
            ) from e
        finally:
            self._safe_to_checkpoint = safe
        files = checkpoint_files(path)
        if full:
            self.anchor = Anchor(updates, str(files.model), str(files.master) if has_master else None)
        self.saved_updates = updates
        for removed in prune(self.run_dir, self.config.keep_full):
            tqdm.write(f"removed checkpoint {self.run_dir.checkpoint_path(removed).name} (--keep-full)")
        return files.root

    def evaluate(self, bar_desc: str = "eval") -> dict[str, Any]:
        """Greedy, unperturbed scores on the held-out split, spread over the engines in batches.

        Returns:
            {"accuracy": mean of the task's accuracy component (Countdown: answer reward 1), "reward_mean",
            each of the task's components' mean, "tokens", "problems": int,
            "samples": first completions}.
        """
        problems = self.problems.eval
        if not problems:
            return {"problems": 0}
        size = self.config.batch_size
        chunks = [problems[i : i + size] for i in range(0, len(problems), size)]
        request = RolloutRequest(
            max_new_tokens=self.config.max_new_tokens,
            task=self.config.task,
            chat_template=self.config.chat_template,
            num_samples=1,
        )
        tasks = [(chunk, request) for chunk in chunks]
        with tqdm(total=len(tasks), desc=bar_desc, leave=False, disable=not self.config.progress) as bar:
            results = self._rollouts(tasks, bar, lambda task, engine: None)
        rewards = [x for r in results for x in r.rewards]
        return {
            "problems": len(rewards),
            "reward_mean": float(np.mean(rewards)),
            **mean_components(self.problems.task, [r.components for r in results]),
            "tokens": int(sum(r.tokens for r in results)),
            "samples": [asdict(s) for r in results for s in r.samples][: self.config.samples_per_iteration],
        }

    def _eval_and_log(self) -> dict[str, Any]:
        started = time.perf_counter()
        result = self.evaluate()
        if not result["problems"]:
            return result
        seconds = time.perf_counter() - started
        updates = self.strategy.iteration
        row = {"kind": "eval", "updates": updates, "seconds": {"eval": seconds}}
        row.update({k: v for k, v in result.items() if k != "samples"})
        self.run_dir.append_jsonl(self.run_dir.metrics, [row])
        self.run_dir.append_jsonl(
            self.run_dir.samples, [{"kind": "eval", "updates": updates, **s} for s in result["samples"]]
        )
        names = ("reward_mean", "accuracy", *self.problems.task.components)
        self._scalars("eval", {name: result[name] for name in names}, updates)
        tqdm.write(
            f"eval after {updates:4d} updates: accuracy {result['accuracy']:.3f} on {result['problems']} "
            f"held-out problems, reward {result['reward_mean']:.3f} ({seconds:.1f} s)"
        )
        return result

    def _load_weights(self, plan: LoadPlan, where: str) -> int:
        """Loads `plan`'s anchor into every engine, replays its updates and checks the weights against
        its fingerprint (`where` names the checkpoint in errors); sets the run's anchor and fingerprint.
        Returns the number of parameters.

        Raises:
            CheckpointError: the replayed weights differ from the checkpoint's. EngineSyncError: engines
                loaded different weights.
        """
        self.anchor = plan.anchor
        loaded = ray.get([self._load(i, plan.anchor) for i in range(len(self.pool.handles))])
        fingerprints = [r.fingerprint for r in loaded]
        self.machines = [r.machine for r in loaded]
        if plan.updates:
            tqdm.write(f"replaying {len(plan.updates)} updates onto {plan.anchor.model_dir}")
            fingerprints = self._replay(list(range(len(self.pool.handles))), plan.updates)
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

    def evaluate_model(self, plan: LoadPlan, where: str) -> dict[str, Any]:
        """Starts the engines, loads the weights (`_load_weights`: a model directory, or a checkpoint's
        anchor plus its updates), evaluates them on the held-out split (see `evaluate`) and stops the
        engines. Ray must be initialised.

        Raises:
            EngineStartError: engines could not start. EngineSyncError: engines loaded different weights.
            CheckpointError: replayed weights differ from the checkpoint's.
        """
        try:
            self.pool = EnginePool.start(self.spec, check=False)
            self._load_weights(plan, where)
            return {"fingerprint": self.fingerprint, **self.evaluate()}
        finally:
            self.pool.shutdown()

    # ---- the loop ----------------------------------------------------------------------------------

    def _iteration(self, bar: tqdm) -> dict[str, Any]:
        """One ES iteration; returns its metrics row."""
        config = self.config
        k = self.strategy.iteration
        members = self.strategy.ask()
        batch_ref = ray.put(prompt_batch(self.problems.train, config.seed, k, config.prompts_per_member))
        tasks = [
            (
                batch_ref,
                RolloutRequest(
                    max_new_tokens=config.max_new_tokens,
                    task=config.task,
                    chat_template=config.chat_template,
                    member=Member(seed=m.seed, sign=m.sign, sigma=config.sigma),
                    batch_size=config.batch_size,
                    num_samples=1,
                ),
            )
            for m in members
        ]
        started = time.perf_counter()

        def on_done(task: int, engine: int) -> None:
            if self.on_member_done is not None:
                self.on_member_done(self, k, task, engine)

        results = self._rollouts(tasks, bar, on_done, finish_on_stop=True)
        rollout_s = time.perf_counter() - started
        rewards = np.array([np.mean(r.rewards) for r in results])
        started = time.perf_counter()
        before = (self.strategy.state_dict(), self.fingerprint)
        self._safe_to_checkpoint = False
        update = self.strategy.tell(rewards)
        try:
            self._apply_update(update)
        except (Stopped, EngineSyncError):
            if not self._stop:
                raise
            # Stopping, and the engines did not confirm the update (a preempted VM stops them too): the
            # iteration is dropped, so the checkpoint holds only updates whose weights were checked.
            self.strategy = Strategy.from_state_dict(before[0])
            self.fingerprint = before[1]
            raise Stopped from None
        finally:
            self._safe_to_checkpoint = True
        update_s = self._update_s = time.perf_counter() - started
        engine_seconds = {
            phase: float(sum(getattr(r.seconds, phase) for r in results))
            for phase in ("perturb", "generate", "restore", "score")
        }
        engine_seconds.update(self._take_update_seconds())
        samples = [
            {
                "kind": "train",
                "iteration": k,
                "member": m.index,
                "seed": m.seed,
                "sign": m.sign,
                **asdict(r.samples[0]),
            }
            for m, r in list(zip(members, results, strict=True))[: config.samples_per_iteration]
            if r.samples
        ]
        self.run_dir.append_jsonl(self.run_dir.samples, samples)
        return {
            "kind": "train",
            "iteration": k,
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std()),
            "reward_max": float(rewards.max()),
            "reward_min": float(rewards.min()),
            **mean_components(self.problems.task, [r.components for r in results]),
            "tokens": int(sum(r.tokens for r in results)),
            "fingerprint": self.fingerprint,
            "seconds": {
                "rollout": rollout_s,
                "update": update_s,
                **{f"engine_{p}": s for p, s in engine_seconds.items()},
            },
        }

    def _base_identity(self, base: str) -> dict[str, str] | None:
        """{"path", "digest"} of the base model, which compact checkpoints replay onto; None (with a
        warning: every checkpoint is then full) when the driver cannot read it."""
        try:
            return {"path": str(Path(base).absolute()), "digest": model_digest(base)}
        except OSError as e:
            tqdm.write(
                f"warning: the base model {base} is not readable on the driver ({e}); every checkpoint "
                "will be a full one"
            )
            return None

    def _start(self) -> None:
        """Writes the config, starts the engines, loads the model (or the checkpoint), writes the manifest."""
        config, run_dir = self.config, self.run_dir
        run_dir.root.mkdir(parents=True, exist_ok=True)
        if not config.resume:
            write_json_atomic(run_dir.config, config.to_dict())
        tqdm.write(f"starting {self.spec.num_engines} engines from {self.spec.pex}")
        self.pool = EnginePool.start(self.spec, check=False, report_packages=REPORTED_DISTRIBUTIONS)
        base = config.model_dir or str(run_dir.base_model)
        if config.model is not None:
            tqdm.write(f"importing {config.model} into {base}")
            self._call_one(0, "import_model", config.model, base)
        elif config.model_dir is None:
            tqdm.write(
                f"creating the tiny default model in {base} ({TINY_WARM_START_STEPS} warm-start steps)"
            )
            self._call_one(0, "make_tiny_model", base, seed=0, warm_start_steps=TINY_WARM_START_STEPS)
        self.base_model = self._base_identity(base)
        plan = LoadPlan(Anchor(0, base), [], None)
        if self.resume is not None:
            for path, why in self.resume.skipped:
                tqdm.write(f"warning: skipped a checkpoint that does not verify: {why}")
                tqdm.write(f"  kept as {run_dir.set_aside(path)}; resuming from {self.resume.path.name}")
            self.strategy = Strategy.from_state_dict(self.resume.state["strategy"])
            self.saved_updates = self.resume.updates
            plan = load_plan(run_dir, self.saved_updates, self.resume.state, config.device_type)
        parameters = self._load_weights(plan, str(self.resume.path if self.resume else base))
        modules = ray.get([h.module_versions.remote(REPORTED_MODULES) for h in self.pool.handles])
        manifest = json.loads(run_dir.manifest.read_text()) if run_dir.manifest.exists() else {"sessions": []}
        manifest["sessions"].append(
            session_entry(self.argv, self.spec.pex, self.pool.reports, modules, self.machines)
        )
        write_json_atomic(run_dir.manifest, manifest)
        # A resumed run without a checkpoint starts over; one with a checkpoint drops what came after it.
        run_dir.truncate_to(self.saved_updates)
        from tensorboardX import SummaryWriter

        self._writer = SummaryWriter(str(run_dir.tensorboard), purge_step=self.saved_updates or None)
        tqdm.write(
            f"model {base if self.resume is None else self.anchor.model_dir}: "
            f"{parameters:,} parameters, fingerprint {self.fingerprint[:12]}; "
            f"{len(self.problems.train)} train / {len(self.problems.eval)} eval problems; "
            f"starting at update {self.strategy.iteration} of {config.iterations}"
        )

    def _logged_iteration(self, bar: tqdm) -> None:
        """Runs one iteration, checkpoints when due, and writes its metrics row, scalars and line."""
        config = self.config
        started = time.perf_counter()
        row = self._iteration(bar)
        updates = self.strategy.iteration
        full = full_due(updates, config.iterations, config.full_checkpoint_every)
        if full or self._stop or (config.checkpoint_every and updates % config.checkpoint_every == 0):
            tick = time.perf_counter()
            # Stopping: a compact checkpoint, which needs no engine and fits any deadline.
            self._checkpoint(full and not self._stop)
            row["seconds"]["checkpoint"] = time.perf_counter() - tick
        row["seconds"]["iteration"] = time.perf_counter() - started
        self.run_dir.append_jsonl(self.run_dir.metrics, [row])
        scalars = {k: v for k, v in row.items() if isinstance(v, int | float) and k != "iteration"}
        self._scalars("train", scalars, row["iteration"])
        self._scalars("seconds", row["seconds"], row["iteration"])
        tqdm.write(
            f"iteration {row['iteration']:4d}: reward mean {row['reward_mean']:.4f} "
            f"max {row['reward_max']:.4f}, "
            + "".join(f"{name} {row[name]:.3f}, " for name in self.problems.task.components)
            + f"{row['tokens']} tokens, "
            f"{row['seconds']['iteration']:.1f} s"
        )

    def _unsaved_updates(self) -> bool:
        """True when updates were made since the newest checkpoint (or, without one, since the start)."""
        return self.strategy.iteration > (self.saved_updates or 0)

    @contextlib.contextmanager
    def _stop_signals(self):
        """While active, the first SIGTERM or Ctrl-C (`STOP_SIGNALS`) requests a clean stop within
        `config.stop_deadline` seconds; a second one interrupts at once (KeyboardInterrupt)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            name = signal.Signals(signum).name
            if self._stop:
                raise KeyboardInterrupt(name)
            self._stop, self.stop_signal = True, signum
            self._stop_at = time.monotonic() + self.config.stop_deadline
            tqdm.write(
                f"{name}: stopping; the current iteration is finished if that fits in "
                f"{self.config.stop_deadline:g} s, then a checkpoint is written ({name} again aborts)"
            )
            # First a compact checkpoint of the last finished iteration, at once: on a preempted VM the
            # raylet gets the signal too, and Ray ends this process when its raylet is gone.
            if self._safe_to_checkpoint and self.anchor is not None and self._unsaved_updates():
                self._checkpoint(full=False)

        previous = {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}
        try:
            yield
        finally:
            for signum, old in previous.items():
                signal.signal(signum, old)

    def run(self) -> dict[str, Any]:
        """Runs the remaining iterations. Ray must be initialised.

        Returns:
            {"status": "completed" | "stopped", "signal": the number of the signal that stopped it or
            None, "updates": int, "fingerprint": str, "output_dir": str, "last_checkpoint": path or None,
            "final_eval": eval result or None}.

        Raises:
            EnginePreflightError / EngineStartError: engines could not start.
            EngineSyncError: engines could not be kept in sync.
            CheckpointError: a checkpoint could not be written, or the one to resume cannot be restored.
        """
        config = self.config
        status = "completed"
        final_eval = None
        try:
            with self._stop_signals():
                self._start()
                fresh = self.resume is None
                ran = False
                try:
                    if fresh:
                        self._eval_and_log()
                    with tqdm(
                        total=config.population, leave=False, disable=not config.progress, unit="member"
                    ) as bar:
                        while self.strategy.iteration < config.iterations:
                            bar.reset()
                            bar.set_description(f"iteration {self.strategy.iteration}")
                            self._logged_iteration(bar)
                            ran = True
                            if self._stop:
                                raise Stopped
                            updates = self.strategy.iteration
                            if (
                                config.eval_every
                                and updates % config.eval_every == 0
                                and updates < config.iterations
                            ):
                                self._eval_and_log()
                    if ran or fresh:
                        final_eval = self._eval_and_log()
                    else:
                        tqdm.write(f"nothing to do: the run already has {self.strategy.iteration} updates")
                        if self.anchor.updates < self.saved_updates:
                            self._checkpoint(full=True)  # the full checkpoint a stop left compact
                except Stopped:
                    status = "stopped"
                    if self._unsaved_updates():
                        self._checkpoint(full=False)
                except EngineStartError as e:
                    # A dead engine could not be restarted within the start timeout (its node died and the
                    # cluster has no capacity left): keep every finished iteration, say how to go on.
                    if self._unsaved_updates():
                        self._checkpoint(full=False)
                    saved = (
                        f"checkpointed in {self.run_dir.checkpoint_path(self.saved_updates)}"
                        if self.saved_updates is not None
                        else "before its first checkpoint"
                    )
                    raise EngineStartError(
                        f"{e}\nThe run stopped after {self.strategy.iteration} updates, {saved}. Continue it "
                        f"with --resume --output-dir {self.run_dir.root} once the cluster has room for the "
                        "engines again (or with fewer --num-engines: the result does not depend on their "
                        "number)."
                    ) from e
        finally:
            if self._writer is not None:
                self._writer.close()
            if self.pool is not None:
                self.pool.shutdown()
        latest = self.run_dir.latest_checkpoint()
        return {
            "status": status,
            "signal": self.stop_signal if status == "stopped" else None,
            "updates": self.strategy.iteration,
            "fingerprint": self.fingerprint,
            "output_dir": str(self.run_dir.root),
            "last_checkpoint": str(latest[1]) if latest else None,
            "final_eval": final_eval,
        }
