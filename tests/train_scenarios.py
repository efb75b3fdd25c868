"""Fault scenarios of a training run, shared by the transformers and vLLM end-to-end tests: each runs
`train.main` with `common` arguments and asserts that the run ends exactly as the uninterrupted
`reference` run did (metrics equal, timings aside)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

from driver import train
from shared.run_layout import read_jsonl

# Metrics that depend on the wall clock, not on the run's numbers.
TIMING_KEYS = ("seconds", "time", "tokens_per_s")


def without_timings(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


def assert_same_metrics(run: Path, reference: Path) -> None:
    expected = without_timings(read_jsonl(reference / "metrics.jsonl"))
    assert without_timings(read_jsonl(run / "metrics.jsonl")) == expected


def assert_weights_follow_the_updates(out: Path) -> None:
    """What the code guarantees of a run in `out` (one session, ended on a full checkpoint) on every CPU,
    whichever rewards that CPU's kernels produce: an iteration whose members' rewards all tie has an
    all-zero update and leaves the weights' fingerprint as it was; an iteration with a non-zero update
    coefficient changes it. The update coefficients are the final checkpoint's history, the fingerprints
    the metrics rows and the manifest's session start.

    The run must also have had some signal (an iteration whose rewards differ): with the tests' sigma
    (0.01) and populations that holds on AVX-512 and AVX2 kernels alike (CI also runs one end-to-end test
    with the kernels forced to AVX2); if it fails, the test's settings need a larger sigma, not the code
    a change."""
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"]
    (session,) = json.loads((out / "manifest.json").read_text())["sessions"]
    assert session["start"]["updates"] == 0
    final = sorted((out / "checkpoints").iterdir())[-1]
    history = json.loads((final / "es_state.json").read_text())["strategy"]["history"]
    assert [h["iteration"] for h in history] == [r["iteration"] for r in rows]
    assert any(r["reward_max"] > r["reward_min"] for r in rows), "no iteration had a learning signal"
    before = session["start"]["fingerprint"]
    for row, record in zip(rows, history, strict=True):
        coefficients = [c for _, c in record["update"]]
        if row["reward_max"] == row["reward_min"]:
            assert all(c == 0.0 for c in coefficients), (row["iteration"], coefficients)
        moved = row["fingerprint"] != before
        assert moved == any(c != 0.0 for c in coefficients), (row["iteration"], coefficients, before)
        before = row["fingerprint"]


def checkpoint_kinds(out: Path) -> dict[str, str]:
    """Checkpoint directory name -> its es_state.json "kind", for every entry under checkpoints/ (a
    leftover temporary directory would show as a name without es_state.json and fail the read)."""
    return {
        p.name: json.loads((p / "es_state.json").read_text())["kind"]
        for p in sorted((out / "checkpoints").iterdir())
    }


def train_iterations(out: Path) -> list[int]:
    return [r["iteration"] for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"]


def uninterrupted_run(common: list[str], iterations: int, out: Path) -> Path:
    """The reference run the scenarios compare with: `common` arguments, the tiny default model,
    `iterations` iterations, into `out`; returns `out`."""
    status = train.main(
        [*common, "--model-dir", "none", "--iterations", str(iterations), "--output-dir", str(out)]
    )
    assert status == train.EXIT_OK
    return out


def ctrl_c_then_resume(common: list[str], reference: Path, iterations: int, out: Path, capsys) -> None:
    """Ctrl-C in iteration 2 with --stop-deadline 0 drops that iteration and exits 130, keeping the
    checkpoint after 2 updates (compact); `--resume` replays it and finishes the run."""
    args = [*common, "--model-dir", str(reference / "base-model"), "--iterations", str(iterations)]
    args += ["--output-dir", str(out)]

    def ctrl_c_in_iteration_2(trainer, iteration, member, engine):
        if iteration == 2 and member == 0:
            os.kill(os.getpid(), signal.SIGINT)

    status = train.main([*args, "--stop-deadline", "0"], on_member_done=ctrl_c_in_iteration_2)
    assert status == train.EXIT_STOPPED
    assert "continue with: ./pants run src/driver:train -- --resume" in capsys.readouterr().out
    assert train_iterations(out) == [0, 1]
    assert checkpoint_kinds(out) == {"iter-000002": "compact"}
    assert train.main([*args, "--resume"]) == train.EXIT_OK
    assert "replaying 2 updates onto" in capsys.readouterr().out
    assert_same_metrics(out, reference)
    assert len(json.loads((out / "manifest.json").read_text())["sessions"]) == 2


def sigterm_then_resume(common: list[str], reference: Path, iterations: int, out: Path, capsys) -> None:
    """SIGTERM (a spot VM's preemption notice) in iteration 2: the iteration fits in the default stop
    deadline, so it is finished, a compact checkpoint after 3 updates is written and the exit status is
    143; `--resume` replays the 3 updates onto the base model and ends exactly as the uninterrupted run
    (every iteration's fingerprint equal)."""
    args = [*common, "--model-dir", str(reference / "base-model"), "--iterations", str(iterations)]
    args += ["--output-dir", str(out)]

    def sigterm_in_iteration_2(trainer, iteration, member, engine):
        if iteration == 2 and member == 0:
            os.kill(os.getpid(), signal.SIGTERM)

    assert train.main(args, on_member_done=sigterm_in_iteration_2) == train.EXIT_TERMINATED
    assert "SIGTERM: stopping" in capsys.readouterr().out
    assert train_iterations(out) == [0, 1, 2]
    assert checkpoint_kinds(out) == {"iter-000002": "compact", "iter-000003": "compact"}
    assert train.main([*args, "--resume"]) == train.EXIT_OK
    assert "replaying 3 updates onto" in capsys.readouterr().out
    assert_same_metrics(out, reference)


def killed_engine_restarts(common: list[str], reference: Path, iterations: int, out: Path, capsys) -> None:
    """SIGKILL to engine 1's actor process in iteration 1: it is restarted and reaches the same weights
    by itself (last checkpoint plus the updates since), not through the resync of a diverged engine."""
    killed = []

    def kill_engine_1_in_iteration_1(trainer, iteration, member, engine):
        if iteration == 1 and not killed:
            pid = trainer.pool.reports[1]["pid"]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*diverged.*")
        status = train.main(
            [*common, "--model-dir", str(reference / "base-model"), "--iterations", str(iterations)]
            + ["--output-dir", str(out)],
            on_member_done=kill_engine_1_in_iteration_1,
        )
    assert status == train.EXIT_OK
    assert killed
    assert "warning: engine 1 died" in capsys.readouterr().out
    assert_same_metrics(out, reference)


_HOLD_RUN_LOCK = """
import sys, time
from driver.run_lock import RunLock
lock = RunLock(sys.argv[1])  # kept: the lock is released when its object is collected
lock.acquire()
print("HELD", flush=True)
time.sleep(600)
"""


def hold_run_lock(root: Path) -> subprocess.Popen:
    """Another driver, as far as the run directory `root` can tell: a process (this interpreter and
    sys.path) that takes its `driver.run_lock.RunLock` and sleeps. Kill it when done."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD_RUN_LOCK, str(root)], stdout=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout.readline().strip() == "HELD"
    return proc


def held_run_refused_then_resume(
    common: list[str], reference: Path, iterations: int, out: Path, capsys
) -> None:
    """A run stopped by Ctrl-C in iteration 2; while another live driver holds its directory, `--resume`
    is refused at once (exit 2, naming the holder's pid) and changes no file; once that driver is
    SIGKILLed, `--resume` takes the lock over by itself and ends exactly as the uninterrupted run."""
    args = [*common, "--model-dir", str(reference / "base-model"), "--iterations", str(iterations)]
    args += ["--output-dir", str(out)]

    def ctrl_c_in_iteration_2(trainer, iteration, member, engine):
        if iteration == 2 and member == 0:
            os.kill(os.getpid(), signal.SIGINT)

    assert train.main([*args, "--stop-deadline", "0"], on_member_done=ctrl_c_in_iteration_2) == 130
    capsys.readouterr()
    holder = hold_run_lock(out)
    try:
        files = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
        started = time.monotonic()
        assert train.main([*args, "--resume"]) == train.EXIT_INVALID
        assert time.monotonic() - started < 60, "the second driver did not fail fast"
        assert (
            f"is in use by another driver (host {os.uname().nodename}, pid {holder.pid}"
            in capsys.readouterr().err
        )
        assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == files
    finally:
        holder.kill()
        holder.wait()
    assert train.main([*args, "--resume"]) == train.EXIT_OK
    assert_same_metrics(out, reference)
