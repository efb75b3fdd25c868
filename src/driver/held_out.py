"""Held-out evaluation: greedy, unperturbed scores on the run's held-out split, spread over the engines in
batches (during training: before the first update, every --eval-every updates and at the end; and by
`evaluate` for any checkpoint or model directory)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np
from tqdm import tqdm

from driver.checkpointing import LoadPlan
from driver.engine_fleet import EngineFleet
from driver.engine_pool import EngineSpec
from driver.rollout_scheduler import RolloutScheduler
from driver.task_data import Problems
from driver.train_config import TrainConfig
from shared.tasks import mean_components


def evaluate(scheduler: RolloutScheduler, config: TrainConfig, problems: Problems) -> dict[str, Any]:
    """Scores the engines' current (unperturbed) weights on `problems.eval`, `config.batch_size` problems
    per rollout, greedy, `config.max_new_tokens` at most.

    Returns:
        {"problems": int} when the split is empty; else also "reward_mean", "accuracy" (the mean of the
        task's accuracy component; Countdown: answer reward 1), each of the task's components' mean,
        "tokens" (int) and "samples" (the first `config.samples_per_iteration` completions, as dicts).

    Raises:
        as `RolloutScheduler.map`.
    """
    held_out = problems.eval
    if not held_out:
        return {"problems": 0}
    size = config.batch_size
    request = config.rollout_request()
    tasks = [(held_out[i : i + size], request) for i in range(0, len(held_out), size)]
    with tqdm(total=len(tasks), desc="eval", leave=False, disable=None if config.progress else True) as bar:
        results = scheduler.map(tasks, lambda task, engine: bar.update(1))
    rewards = [x for r in results for x in r.rewards]
    return {
        "problems": len(rewards),
        "reward_mean": float(np.mean(rewards)),
        **mean_components(problems.task, [r.components for r in results]),
        "tokens": int(sum(r.tokens for r in results)),
        "samples": [asdict(s) for r in results for s in r.samples][: config.samples_per_iteration],
    }


def evaluate_model(
    config: TrainConfig, spec: EngineSpec, problems: Problems, plan: LoadPlan, where: str
) -> dict[str, Any]:
    """Starts the engines, loads `plan`'s weights (a model directory, or a checkpoint's anchor plus its
    updates: `EngineFleet.load_weights`; `where` names it in errors), evaluates them (`evaluate`) and stops
    the engines. Ray must be initialised.

    Returns:
        `evaluate`'s result plus "fingerprint" (the weights' fingerprint, hex).

    Raises:
        EngineStartError: engines could not start. EngineSyncError: engines loaded different weights.
        CheckpointError: replayed weights differ from the checkpoint's.
    """
    fleet = EngineFleet(config, spec, updates_since=lambda updates: [])
    try:
        fleet.start()
        fleet.load_weights(plan, where)
        return {"fingerprint": fleet.fingerprint, **evaluate(RolloutScheduler(fleet), config, problems)}
    finally:
        fleet.shutdown()
