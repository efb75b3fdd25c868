"""One driver per run directory (`driver.run_lock.RunLock`): a live holder in another process refuses a
second driver at once, naming its host, pid and start time, and writes nothing; a holder killed with
SIGKILL leaves nothing to clean up. The end-to-end cases (a `train --resume` refused while another driver
holds the run, then resumed once it is killed) are `train_scenarios.held_run_refused_then_resume`, run by
tests/test_train.py.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from train_scenarios import hold_run_lock

from driver.run_lock import RunLock, RunLockedError
from shared.run_layout import DRIVER_HOLDER


def test_a_second_driver_is_refused_at_once_naming_the_holder(tmp_path):
    holder = hold_run_lock(tmp_path / "run")
    try:
        started = time.monotonic()
        with pytest.raises(
            RunLockedError, match=rf"in use by another driver \(host .+, pid {holder.pid}, started"
        ):
            RunLock(tmp_path / "run").acquire()
        assert time.monotonic() - started < 5
        assert RunLock(tmp_path / "run").holder()["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_of_a_killed_driver_is_taken_over(tmp_path):
    holder = hold_run_lock(tmp_path / "run")
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    with RunLock(tmp_path / "run") as lock:
        assert lock.holder()["pid"] == os.getpid()
        # Within one process too, a second acquisition is refused while the first holds it.
        with pytest.raises(RunLockedError):
            RunLock(tmp_path / "run").acquire()
    RunLock(tmp_path / "run").acquire()  # released on exit


def test_the_holder_record_is_written_atomically_next_to_the_lock(tmp_path):
    with RunLock(tmp_path / "run"):
        assert (tmp_path / "run" / DRIVER_HOLDER).exists()
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".driver.json", ".driver.lock"]
