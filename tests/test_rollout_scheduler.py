"""The rollout scheduler on a real local Ray cluster, with plain Ray actors as engines (no PEX): task order,
dynamic hand-out, a dead engine's task re-run after its restart, and the stop policy."""

from __future__ import annotations

import os
import signal
import time

import pytest
import ray

from driver.rollout_scheduler import RolloutScheduler
from driver.stop_request import Stopped, StopRequest
from shared.protocol import Member, RolloutRequest


@ray.remote(num_cpus=0)
class Engine:
    """Answers a rollout with (engine id, the problems), after `delay` seconds; `die_on` exits the actor's
    process on that problem, as a killed engine does."""

    def __init__(self, engine_id: int, delay: float = 0.0, die_on: object = None) -> None:
        self.engine_id, self.delay, self.die_on = engine_id, delay, die_on

    def evaluate(self, problems, request):
        if problems == self.die_on:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(self.delay)
        return (self.engine_id, problems)

    def evaluate_members(self, problems, request):
        return [(self.engine_id, problems, member) for member in request.members]


class Fleet:
    """What the scheduler needs of `driver.engine_fleet.EngineFleet`: the handles and `bring_up`, which
    here starts a healthy actor in the dead one's place and records why."""

    def __init__(self, engines: list) -> None:
        self.pool = object()
        self.handles = engines
        self.brought_up: list[tuple[int, str]] = []

    def bring_up(self, index: int, reason: str) -> None:
        self.brought_up.append((index, reason))
        self.handles[index] = Engine.remote(index)


REQUEST = RolloutRequest(max_new_tokens=1)


def test_results_come_back_in_task_order_from_every_engine(ray_cluster):
    fleet = Fleet([Engine.remote(0, delay=0.05), Engine.remote(1, delay=0.2)])
    done = []
    results = RolloutScheduler(fleet).map(
        [(i, REQUEST) for i in range(12)], on_done=lambda task, engine: done.append((task, engine))
    )
    assert [problems for _, problems in results] == list(range(12))
    assert sorted(task for task, _ in done) == list(range(12))
    assert dict(done) == {task: engine for task, (engine, _) in enumerate(results)}
    # The fast engine takes more tasks than the slow one: tasks go to whichever engine has a free slot.
    counts = [sum(engine == e for engine, _ in results) for e in (0, 1)]
    assert counts[0] > counts[1] > 0


def test_a_request_with_members_goes_to_evaluate_members_and_returns_their_list(ray_cluster):
    fleet = Fleet([Engine.remote(0), Engine.remote(1)])
    groups = [(Member(1), Member(2)), (Member(3),)]
    single = RolloutRequest(max_new_tokens=1, member=Member(4))
    tasks = [*((i, RolloutRequest(max_new_tokens=1, members=g)) for i, g in enumerate(groups)), (2, single)]
    results = RolloutScheduler(fleet).map(tasks)
    assert [[m for _, _, m in r] for r in results[:2]] == [list(g) for g in groups]
    assert results[2][1] == 2  # evaluate: (engine id, problems)


def test_a_task_whose_engine_died_is_rerun_after_the_engine_is_brought_up(ray_cluster):
    # Two slots per engine, interleaved: tasks 0-3 go to engines 0, 1, 0, 1, so engine 1 dies on task 3
    # (and the task queued behind it fails with it).
    fleet = Fleet([Engine.remote(0, delay=0.05), Engine.remote(1, delay=0.05, die_on=3)])
    results = RolloutScheduler(fleet).map([(i, REQUEST) for i in range(8)])
    assert [problems for _, problems in results] == list(range(8))
    assert len(fleet.brought_up) == 1  # once, though two of its tasks failed
    index, reason = fleet.brought_up[0]
    assert index == 1
    assert reason.startswith("died during task ")


def test_a_stop_request_stops_at_once_unless_the_rest_fits_before_the_deadline(ray_cluster):
    tasks = [(i, REQUEST) for i in range(6)]
    stop = StopRequest(deadline_s=0.0)
    fleet = Fleet([Engine.remote(0, delay=0.1)])
    stop.request(signal.SIGTERM)
    with pytest.raises(Stopped):
        RolloutScheduler(fleet, stop).map(tasks, finish_on_stop=True)  # 0 s left: nothing fits

    stop = StopRequest(deadline_s=60.0)
    scheduler = RolloutScheduler(fleet, stop)
    assert len(scheduler.map(tasks, finish_on_stop=True)) == 6
    assert 0.05 < stop.member_s < 1.0  # seconds per task, recorded for the next estimate
    stop.request(signal.SIGTERM)
    with pytest.raises(Stopped):
        scheduler.map(tasks)  # not an ES iteration (an evaluation): stops at once
    assert len(scheduler.map(tasks, finish_on_stop=True)) == 6  # 60 s left: the rest fits


def test_stop_request_estimates_from_this_iteration_else_the_last():
    stop = StopRequest(deadline_s=10.0)
    started = time.monotonic()
    assert not stop.fits(0, 4, started)  # requested before any estimate: nothing fits
    stop.request(signal.SIGINT)
    assert not stop.fits(0, 4, started)
    stop.member_s = 1.0
    assert stop.fits(0, 4, started)  # 4 members of 1 s each before a 10 s deadline
    stop.update_s = 7.0
    assert not stop.fits(0, 4, started)  # and a 7 s update: not
    assert stop.fits(3, 4, time.monotonic() - 0.3)  # this iteration's pace (0.1 s a member) wins
