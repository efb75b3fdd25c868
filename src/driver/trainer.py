"""The ES fine-tuning loop on the driver: members out to the engines, rewards in, one update to all.

Per iteration k (Qiu et al. 2025, Alg. 1): the strategy asks N member seeds; every member is scored on the
same batch of `prompts_per_member` training problems (chosen by `shared.seeds.prompt_rank`); the rollout
scheduler hands members to the engines as they free up (`driver.rollout_scheduler`); the member reward is
the mean task reward over the batch; the strategy turns the shaped rewards into an update, given to every
engine as (seed, coefficient) pairs; then the engines' weight fingerprints must agree
(`driver.engine_fleet`: resync of a diverged engine, restart of a dead one, so the run's result does not
depend on a failure). When a dead engine's node is gone and the cluster has no room for it within the
engine start timeout, the run writes a checkpoint and stops with a message saying how to go on.

Held-out evaluation (`driver.held_out`) runs before training, every `eval_every` iterations and at the
end. Checkpoints (`driver.checkpointer`: compact, or full every `full_checkpoint_every` iterations) are
written every `checkpoint_every` iterations, at the end, and when the run is stopped by SIGTERM or Ctrl-C
(`driver.stop_request`): a stop writes a compact checkpoint of the last finished iteration at once, then
finishes the current iteration when that fits in `stop_deadline` seconds and checkpoints it, else drops
it. Metrics, samples, TensorBoard and the console: `driver.run_log`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any

import numpy as np
import ray
from tqdm import tqdm

from driver import held_out
from driver.checkpointer import Checkpointer
from driver.checkpointing import Anchor, LoadPlan, ResumePoint, full_due
from driver.engine_fleet import EngineFleet, EngineSyncError, Update
from driver.engine_pool import EngineSpec, EngineStartError
from driver.manifest import append_session, session_entry
from driver.rollout_scheduler import RolloutScheduler
from driver.run_log import RunLog
from driver.stop_request import Stopped, StopRequest
from driver.strategy import Strategy
from driver.task_data import Problems, prompt_batch
from driver.train_config import TrainConfig
from shared.protocol import REPORTED_DISTRIBUTIONS, REPORTED_MODULES, Member
from shared.run_layout import RunDir, write_json_atomic
from shared.tasks import mean_components

# Warm-start steps of the tiny default model: measured, 55 steps leave it between not answering in the
# task's format and always doing so, where perturbed members' rewards differ (40: never, 80: always).
TINY_WARM_START_STEPS = 55

# Called after each rollout result: (trainer, iteration, task index (the member, or its batch), engine index).
MemberHook = Callable[["Trainer", int, int, int], None]


class Trainer:
    """One training run: `run()` it with Ray initialised (after `driver.run_open.open_run` validated the
    output dir).

    Args:
        config: the run's configuration (from `open_run`).
        spec: how to start the engines (from the engine PEX).
        problems: the dataset, from `load_problems`.
        resume: the checkpoint to go on from when resuming (from `open_run`), else None.
        argv: the command line, recorded in the manifest.
        on_member_done: optional hook after each rollout result, a member's or (low-rank members on vLLM)
            a batch of members' (tests use it to inject faults; the engine actors are
            `trainer.pool.handles`).
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
        self.problems = problems
        self.resume = resume
        self.argv = list(argv or [])
        self.on_member_done = on_member_done
        self.strategy = Strategy(config=config.strategy_config(), root_seed=config.seed)
        self.stop = StopRequest(config.stop_deadline)
        self.fleet = EngineFleet(config, spec, self._updates_since, self.stop)
        self.scheduler = RolloutScheduler(self.fleet, self.stop)
        self.checkpoints = Checkpointer(
            self.run_dir,
            self.fleet,
            problems.digest(),
            config.keep_full,
            config.device_type,
            config.perturbation_spec().record(),
        )
        self.log = RunLog(self.run_dir, problems.task)
        # Iterations of this session whose members all tied (zero updates; `_warn_tie`).
        self.tied_iterations = 0
        # Wall seconds of each iteration this session ran (the console's ETA, the summary's rate).
        self.iteration_seconds: list[float] = []

    @property
    def pool(self):
        """The engine actors (`driver.engine_pool.EnginePool`), None before the run starts them."""
        return self.fleet.pool

    @property
    def stop_signal(self) -> int | None:
        """The signal that requested a stop, if any."""
        return self.stop.signal

    def _updates_since(self, updates: int) -> list[Update]:
        return [record["update"] for record in self.strategy.history[updates:]]

    def _iteration(self, bar: tqdm) -> dict[str, Any]:
        """One ES iteration (ask, rollouts, tell, update on every engine); returns its metrics row."""
        config = self.config
        k = self.strategy.iteration
        members = self.strategy.ask()
        batch = ray.put(prompt_batch(self.problems.train, config.seed, k, config.prompts_per_member))
        request = config.rollout_request()
        scored = [Member(m.seed, m.sign, config.sigma) for m in members]
        slots = config.member_slots()
        if slots:
            # Low-rank members on vLLM: an engine scores `slots` members in one batch (LoRA adapters).
            groups = [tuple(scored[i : i + slots]) for i in range(0, len(scored), slots)]
            tasks = [(batch, replace(request, members=group)) for group in groups]
        else:
            tasks = [(batch, replace(request, member=member)) for member in scored]
        started = time.perf_counter()

        def on_done(task: int, engine: int) -> None:
            bar.update(len(tasks[task][1].members) or 1)
            if self.on_member_done is not None:
                self.on_member_done(self, k, task, engine)

        done = self.scheduler.map(tasks, on_done, finish_on_stop=True)
        results = [r for result in done for r in (result if isinstance(result, list) else [result])]
        rollout_s = time.perf_counter() - started
        rewards = np.array([np.mean(r.rewards) for r in results])
        if rewards.min() == rewards.max():
            self._warn_tie(k, float(rewards[0]))
        started = time.perf_counter()
        before = (self.strategy.state_dict(), self.fleet.fingerprint)
        with self.checkpoints.unsafe():
            try:
                self.fleet.apply_update(self.strategy.tell(rewards))
            except (Stopped, EngineSyncError):
                if not self.stop.requested:
                    raise
                # Stopping, and the engines did not confirm the update (a preempted VM stops them too):
                # the iteration is dropped, so the checkpoint holds only updates whose weights were checked.
                self.strategy = Strategy.from_state_dict(before[0])
                self.fleet.fingerprint = before[1]
                raise Stopped from None
        update_s = self.stop.update_s = time.perf_counter() - started
        engine_seconds = {
            phase: float(sum(getattr(r.seconds, phase) for r in results))
            for phase in ("perturb", "generate", "restore", "score")
        }
        engine_seconds.update(self.fleet.take_update_seconds())
        self.log.train_samples(
            [
                {"kind": "train", "iteration": k, "member": m.index, "seed": m.seed, "sign": m.sign}
                | asdict(r.samples[0])
                for m, r in list(zip(members, results, strict=True))[: config.samples_per_iteration]
                if r.samples
            ]
        )
        return {
            "kind": "train",
            "iteration": k,
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std()),
            "reward_max": float(rewards.max()),
            "reward_min": float(rewards.min()),
            **mean_components(self.problems.task, [r.components for r in results]),
            "tokens": int(sum(r.tokens for r in results)),
            "fingerprint": self.fleet.fingerprint,
            "seconds": {
                "rollout": rollout_s,
                "update": update_s,
                **{f"engine_{p}": s for p, s in engine_seconds.items()},
            },
        }

    def _warn_tie(self, iteration: int, reward: float) -> None:
        """Counts an iteration whose members all scored `reward` (its update is zero); warns at the first."""
        self.tied_iterations += 1
        if self.tied_iterations == 1:
            tqdm.write(
                f"warning: iteration {iteration}: all {self.config.population} members scored {reward:.4g}, "
                "so the update is zero. The task gives this model no signal to tell members apart (a "
                "larger --sigma, another --task or a model that scores above the floor can); further "
                "tied iterations are counted in the summary"
            )

    def _evaluate(self) -> dict[str, Any]:
        """Held-out evaluation of the current weights, logged when the split is not empty."""
        started = time.perf_counter()
        result = held_out.evaluate(self.scheduler, self.config, self.problems)
        if result["problems"]:
            self.log.eval(self.strategy.iteration, result, time.perf_counter() - started)
        return result

    def _base_model(self) -> str:
        """The base model's directory: --model-dir, or --model imported (GGUF) into the run directory, or
        the tiny default model made there."""
        config = self.config
        base = config.model_dir or str(self.run_dir.base_model)
        if config.model is not None:
            tqdm.write(f"importing {config.model} into {base}")
            self.fleet.call_one(0, "import_model", config.model, base)
        elif config.model_dir is None:
            tqdm.write(
                f"creating the tiny default model in {base} ({TINY_WARM_START_STEPS} warm-start steps)"
            )
            self.fleet.call_one(0, "make_tiny_model", base, seed=0, warm_start_steps=TINY_WARM_START_STEPS)
        return base

    def _start(self) -> None:
        """Writes the config, starts the engines, loads the model (or the checkpoint), writes the manifest."""
        config, run_dir, fleet = self.config, self.run_dir, self.fleet
        run_dir.root.mkdir(parents=True, exist_ok=True)
        if not config.resume:
            write_json_atomic(run_dir.config, config.to_dict())
        tqdm.write(f"starting {fleet.spec.num_engines} engines from {fleet.spec.pex}")
        fleet.start(report_packages=REPORTED_DISTRIBUTIONS)
        base = self._base_model()
        self.checkpoints.set_base(base)
        plan = LoadPlan(Anchor(0, base), [], None)
        if self.resume is not None:
            self.strategy, plan = self.checkpoints.resume_from(self.resume)
        parameters = fleet.load_weights(plan, str(self.resume.path if self.resume else base))
        modules = ray.get([h.module_versions.remote(REPORTED_MODULES) for h in fleet.handles])
        append_session(
            run_dir.manifest,
            session_entry(
                self.argv,
                fleet.spec.pex,
                fleet.pool.reports,
                modules,
                fleet.machines,
                {"updates": self.strategy.iteration, "fingerprint": fleet.fingerprint},
            ),
        )
        # A resumed run without a checkpoint starts over; one with a checkpoint drops what came after it.
        self.log.open(self.checkpoints.saved_updates)
        tqdm.write(
            f"model {base if self.resume is None else fleet.anchor.model_dir}: "
            f"{parameters:,} parameters, fingerprint {fleet.fingerprint[:12]}; "
            f"{len(self.problems.train)} train / {len(self.problems.eval)} eval problems; "
            f"starting at update {self.strategy.iteration} of {config.iterations}"
        )

    def _logged_iteration(self, bar: tqdm) -> None:
        """Runs one iteration, checkpoints when due, and logs its metrics row."""
        config = self.config
        started = time.perf_counter()
        row = self._iteration(bar)
        updates = self.strategy.iteration
        full = full_due(updates, config.iterations, config.full_checkpoint_every)
        if (
            full
            or self.stop.requested
            or (config.checkpoint_every and updates % config.checkpoint_every == 0)
        ):
            tick = time.perf_counter()
            # Stopping: a compact checkpoint, which needs no engine and fits any deadline.
            self.checkpoints.write(self.strategy, full and not self.stop.requested)
            row["seconds"]["checkpoint"] = time.perf_counter() - tick
        row["seconds"]["iteration"] = time.perf_counter() - started
        row["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        rollout_s = row["seconds"]["rollout"]
        row["tokens_per_s"] = row["tokens"] / rollout_s if rollout_s > 0 else 0.0
        self.iteration_seconds.append(row["seconds"]["iteration"])
        eta_s = (config.iterations - updates) * float(np.mean(self.iteration_seconds))
        self.log.iteration(row, eta_s)

    def _checkpoint_unsaved(self) -> None:
        """Writes a compact checkpoint if updates were made since the newest one."""
        if self.checkpoints.unsaved(self.strategy.iteration):
            self.checkpoints.write(self.strategy, full=False)

    def _on_stop_signal(self) -> None:
        # At once, a compact checkpoint of the last finished iteration: on a preempted VM the raylet gets
        # the signal too, and Ray ends this process when its raylet is gone.
        if self.checkpoints.safe and self.fleet.anchor is not None:
            self._checkpoint_unsaved()

    def _train(self) -> dict[str, Any] | None:
        """The remaining iterations with their evaluations; returns the final evaluation (None when there
        was nothing to do). Raises Stopped."""
        config, fresh, ran = self.config, self.resume is None, False
        if fresh:
            self._evaluate()
        with tqdm(
            total=config.population, leave=False, disable=None if config.progress else True, unit="member"
        ) as bar:
            while self.strategy.iteration < config.iterations:
                bar.reset()
                bar.set_description(f"iteration {self.strategy.iteration}")
                self._logged_iteration(bar)
                ran = True
                if self.stop.requested:
                    raise Stopped
                updates = self.strategy.iteration
                if config.eval_every and updates % config.eval_every == 0 and updates < config.iterations:
                    self._evaluate()
        if ran or fresh:
            return self._evaluate()
        tqdm.write(f"nothing to do: the run already has {self.strategy.iteration} updates")
        if self.fleet.anchor.updates < self.checkpoints.saved_updates:
            self.checkpoints.write(self.strategy, full=True)  # the full checkpoint a stop left compact
        return None

    def run(self) -> dict[str, Any]:
        """Runs the remaining iterations. Ray must be initialised.

        Returns:
            {"status": "completed" | "stopped", "signal": the number of the signal that stopped it or
            None, "updates": int, "fingerprint": str, "output_dir": str, "last_checkpoint": path or None,
            "tied_iterations": iterations of this session whose members all tied (zero updates),
            "iterations_run": iterations this session ran,
            "final_eval": eval result or None}.

        Raises:
            EnginePreflightError / EngineStartError: engines could not start.
            EngineSyncError: engines could not be kept in sync.
            CheckpointError: a checkpoint could not be written, or the one to resume cannot be restored.
        """
        status, final_eval = "completed", None
        try:
            with self.stop.signals(self._on_stop_signal):
                self._start()
                try:
                    final_eval = self._train()
                except Stopped:
                    status = "stopped"
                    self._checkpoint_unsaved()
                except EngineStartError as e:
                    # A dead engine could not be restarted within the start timeout (its node died and the
                    # cluster has no capacity left): keep every finished iteration, say how to go on.
                    self._checkpoint_unsaved()
                    saved = self.checkpoints.saved_updates
                    where = (
                        f"checkpointed in {self.run_dir.checkpoint_path(saved)}"
                        if saved is not None
                        else "before its first checkpoint"
                    )
                    raise EngineStartError(
                        f"{e}\nThe run stopped after {self.strategy.iteration} updates, {where}. Continue it "
                        f"with --resume --output-dir {self.run_dir.root} once the cluster has room for the "
                        "engines again (or with fewer --num-engines: the result does not depend on their "
                        "number)."
                    ) from e
        finally:
            self.log.close()
            self.fleet.shutdown()
        latest = self.run_dir.latest_checkpoint()
        return {
            "status": status,
            "signal": self.stop.signal if status == "stopped" else None,
            "updates": self.strategy.iteration,
            "fingerprint": self.fleet.fingerprint,
            "output_dir": str(self.run_dir.root),
            "last_checkpoint": str(latest[1]) if latest else None,
            "tied_iterations": self.tied_iterations,
            "iterations_run": len(self.iteration_seconds),
            "final_eval": final_eval,
        }
