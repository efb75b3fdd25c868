"""Handing rollouts to the engines: shaped like Ray's `ray.util.ActorPool` (`submit`, `has_next`,
`get_next_unordered`, `map`), with restarts and the stop deadline as its policy.

Each engine has `in_flight` rollouts queued (two: with one, an engine idles between members while the
driver collects a result and sends the next, a round trip that is longer across nodes than on one
machine); the next task goes to the first engine with a free slot, so an engine that finishes takes the
next member, as the reference implementation's accelerated version does. A task whose engine
died is re-run after the fleet brings the engine up (once, whatever else was queued on it). While waiting,
the scheduler checks the run's `StopRequest` every `poll_s` seconds (a signal handler runs only once a wait
returns): once a stop is requested it raises `Stopped`, at once, or for `map(..., finish_on_stop=True)`
as soon as the rest of the tasks no longer fits before the stop deadline (`StopRequest.fits`).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

import ray

from driver.engine_fleet import EngineFleet
from driver.stop_request import Stopped, StopRequest
from shared.protocol import RolloutRequest, RolloutResult

# Rollouts queued on each engine.
IN_FLIGHT = 2
# Seconds between checks for a stop request while waiting on engines.
POLL_S = 0.1

# A rollout task: (problems or their ObjectRef, request), as `shared.protocol.Engine.evaluate` takes them;
# a request with `members` goes to `Engine.evaluate_members`, and its result is a list (one per member).
Task = tuple[Any, RolloutRequest]


class RolloutScheduler:
    """Runs rollout tasks over the fleet's engines.

    Args:
        fleet: the engines (`EngineFleet`; it brings a dead engine up).
        stop: the run's stop request (None: never stops).
        in_flight: rollouts queued on each engine.
        poll_s: seconds between stop checks while waiting.
    """

    def __init__(
        self,
        fleet: EngineFleet,
        stop: StopRequest | None = None,
        in_flight: int = IN_FLIGHT,
        poll_s: float = POLL_S,
    ) -> None:
        self.fleet = fleet
        self.stop = stop
        self.in_flight = in_flight
        self.poll_s = poll_s
        self._reset(finish_on_stop=False)

    def _reset(self, finish_on_stop: bool) -> None:
        engines = range(len(self.fleet.handles)) if self.fleet.pool is not None else ()
        self._tasks: list[Task] = []
        self._queue: deque[int] = deque()
        self._free = deque(engine for _ in range(self.in_flight) for engine in engines)  # interleaved
        self._pending: dict[Any, tuple[int, int, Any]] = {}  # ref -> (task, engine, the handle it went to)
        self._done = 0
        self._finish_on_stop = finish_on_stop
        self._started = time.monotonic()

    def submit(self, problems: Any, request: RolloutRequest) -> int:
        """Queues a rollout of `problems` (a list of problem records or its ObjectRef); returns its task
        index (0, 1, ... since the last `map` began)."""
        self._tasks.append((problems, request))
        self._queue.append(len(self._tasks) - 1)
        return len(self._tasks) - 1

    def has_next(self) -> bool:
        """Whether a submitted task has not been returned yet."""
        return bool(self._queue or self._pending)

    def _dispatch(self) -> None:
        while self._queue and self._free:
            engine, task = self._free.popleft(), self._queue.popleft()
            problems, request = self._tasks[task]
            handle = self.fleet.handles[engine]
            method = handle.evaluate_members if request.members else handle.evaluate
            self._pending[method.remote(problems, request)] = (task, engine, handle)

    def _must_stop(self) -> bool:
        if self.stop is None or not self.stop.requested:
            return False
        return not (self._finish_on_stop and self.stop.fits(self._done, len(self._tasks), self._started))

    def get_next_unordered(self) -> tuple[int, int, RolloutResult | list[RolloutResult]]:
        """Waits for the next finished rollout, in any order: (task index, engine index, result).

        Raises:
            Stopped: a stop was requested (see the module docstring). StopIteration: nothing is pending.
                Engine errors other than a dead actor propagate, as do the fleet's (EngineStartError,
                EngineSyncError).
        """
        if not self.has_next():
            raise StopIteration("no rollout is pending")
        while True:
            self._dispatch()
            ready, _ = ray.wait(list(self._pending), num_returns=1, timeout=self.poll_s)
            if self._must_stop():
                raise Stopped
            for ref in ready:
                task, engine, handle = self._pending.pop(ref)
                self._free.append(engine)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    self._queue.appendleft(task)
                    if self.fleet.handles[engine] is handle:  # not brought up yet for another of its tasks
                        self.fleet.bring_up(engine, f"died during task {task} ({type(e).__name__})")
                    continue
                self._done += 1
                return task, engine, result

    def map(
        self,
        tasks: list[Task],
        on_done: Callable[[int, int], None] | None = None,
        finish_on_stop: bool = False,
    ) -> list[RolloutResult | list[RolloutResult]]:
        """Runs `tasks` and returns their results in task order.

        Args:
            on_done: called after each result with (task index, engine index): progress, test hooks.
            finish_on_stop: after a stop request, go on while the rest still fits before the deadline,
                and record the seconds per task in `stop.member_s` when all are done (members of an ES
                iteration); otherwise stop at once.

        Raises:
            as `get_next_unordered`.
        """
        self._reset(finish_on_stop)
        for problems, request in tasks:
            self.submit(problems, request)
        results: list[RolloutResult | list[RolloutResult] | None] = [None] * len(tasks)
        while self.has_next():
            task, engine, result = self.get_next_unordered()
            results[task] = result
            if on_done is not None:
                on_done(task, engine)
        if finish_on_stop and tasks and self.stop is not None:
            self.stop.member_s = (time.monotonic() - self._started) / len(tasks)
        return results
