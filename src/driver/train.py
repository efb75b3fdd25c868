"""`./pants run src/driver:train -- [options]`: ES fine-tuning on Countdown, end to end.

With no options it trains the tiny test model on generated Countdown problems for a few minutes on a CPU:
it builds the engine PEX (when run from the source tree), starts a local Ray cluster, starts the engines
from the engine PEX, and writes metrics, samples, checkpoints and the reward curve (reward.png) under
runs/<UTC time>/. `--help` lists every option with its default and unit; `--config FILE` reads them from
TOML or YAML.

Exit status: 0 completed, 1 failed (engines, Ray, a checkpoint that cannot be written), 2 invalid
configuration or data, or an output directory another live driver holds (`driver.run_lock`), 128 + the
signal's number when stopped: 130 by Ctrl-C (SIGINT), 143 by SIGTERM (a spot VM's preemption notice). A
stop keeps the work of every finished iteration in a checkpoint; continue it with --resume --output-dir
DIR.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
from pathlib import Path

from driver.checkpointing import CheckpointError, ResumePoint
from driver.config_sources import build_parser, config_from_args
from driver.datafiles import DatasetError
from driver.engine_build import EngineBuildError, resolve_engine_pex
from driver.engine_fleet import EngineSyncError
from driver.engine_pool import EngineStartError
from driver.engine_preflight import EnginePreflightError, preflight
from driver.engine_spec import EngineSpec, default_pex_root, default_python
from driver.reward_plot import write_reward_plot
from driver.run_lock import RunLock
from driver.run_log import format_seconds
from driver.run_open import open_run
from driver.task_data import Problems
from driver.train_config import ConfigError, TrainConfig
from driver.trainer import Trainer
from shared.run_layout import RunDir, RunDirError, read_jsonl

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2
EXIT_STOPPED, EXIT_TERMINATED = 128 + signal.SIGINT, 128 + signal.SIGTERM
# Seconds allowed to extract the engine PEX into PEX_ROOT on this node before the engines start.
EXTRACT_TIMEOUT_S = 1800.0
# Extra start-up seconds for engines on other nodes of a joined cluster, which may extract cold.
REMOTE_COLD_START_S = 1200.0


def engine_spec(config: TrainConfig, pex: Path) -> EngineSpec:
    """The EngineSpec of a run's engines."""
    return EngineSpec(
        pex=pex,
        python=config.engine_python or default_python(),
        pex_root=config.pex_root or default_pex_root(),
        num_engines=config.num_engines,
        num_cpus=config.engine_cpus,
        num_gpus=config.engine_gpus,
        resources=dict(config.engine_resources),
        startup_timeout_s=config.engine_start_timeout,
        cold_start_allowance_s=REMOTE_COLD_START_S if config.address else 0.0,
    )


def prepare_engines(config: TrainConfig) -> EngineSpec:
    """Finds or builds the engine PEX, checks and extracts it on this node (`engine_preflight.preflight`), and
    returns the run's EngineSpec with the PEX's venv, from whose interpreter engine workers start.

    Raises:
        EngineBuildError, EnginePreflightError.
    """
    pex = resolve_engine_pex(config.engine_pex, config.build_engine, config.engine_target)
    spec = engine_spec(config, pex)
    print(f"checking the engine PEX {pex} (a first run extracts it into PEX_ROOT: a minute or two)")
    started = time.monotonic()
    report = preflight(spec, timeout_s=EXTRACT_TIMEOUT_S)
    print(f"engine environment ready in {time.monotonic() - started:.1f} s: {report['prefix']}")
    return dataclasses.replace(spec, venv=report["venv"])


def init_ray(address: str | None) -> bool:
    """Joins `address` or starts a local Ray cluster, unless Ray is already initialised (returns False
    then; True when this call initialised Ray)."""
    import ray

    if ray.is_initialized():
        return False
    # Ray >= 2.52 may require token authentication by default; a local cluster of one user does not.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address=address, include_dashboard=False, configure_logging=False, log_to_driver=True)
    return True


def default_output_dir() -> str:
    """runs/<UTC time>, e.g. runs/20261122-101500."""
    return str(Path("runs") / time.strftime("%Y%m%d-%H%M%S", time.gmtime()))


def held_out_change(run_dir: RunDir) -> str:
    """The summary's line on held-out evaluation: reward and accuracy at the run's first evaluation and
    at its last (from metrics.jsonl), or "" with fewer than two evaluations."""
    rows = [r for r in read_jsonl(run_dir.metrics) if r.get("kind") == "eval"]
    if len(rows) < 2:
        return ""
    first, last = rows[0], rows[-1]
    return (
        f"  held-out:    reward {first['reward_mean']:.4f} -> {last['reward_mean']:.4f}, accuracy "
        f"{first['accuracy']:.3f} -> {last['accuracy']:.3f} (after {first['updates']} and "
        f"{last['updates']} updates, {last['problems']} problems)\n"
    )


def plot_run(run_dir: Path, command: str) -> Path | None:
    """Writes the run's reward curve (`driver.reward_plot`); a plot that cannot be drawn is a warning on
    stderr naming `command`, never a failed run. Returns the PNG's path or None."""
    try:
        return write_reward_plot(run_dir)
    except (OSError, ValueError, KeyError) as e:
        print(f"{command}: warning: no reward plot for {run_dir}: {e}", file=sys.stderr)
        return None


def main(argv: list[str] | None = None, on_member_done=None) -> int:
    """Runs the command; returns the exit status (see the module docstring).

    Args:
        argv: command-line arguments (default: sys.argv[1:]).
        on_member_done: a hook after each member result, (trainer, iteration, member, engine); tests use
            it to inject faults.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    # Progress lines must reach a log file as they happen, not when a block buffer fills.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    parser = build_parser(prog="train", description=__doc__.split("\n\n")[1])
    args = parser.parse_args(argv)
    try:
        config, given = config_from_args(args)
        if config.output_dir is None:
            config = TrainConfig(**{**config.to_dict(), "output_dir": default_output_dir()})
        requested = config
        # Validated before the lock (nothing is written for a bad command line; checkpoint files by size
        # only, reading them is for the second call); once more under it, so that a driver which got there
        # first (a new run, a newer checkpoint) is seen, with every checkpoint file's sha256 checked.
        config, problems, resume = open_run(requested, given, read_bytes=False)
        lock = RunLock(config.output_dir)
        lock.acquire()
    except (ConfigError, DatasetError, RunDirError) as e:
        print(f"train: {e}", file=sys.stderr)
        return EXIT_INVALID
    try:
        config, problems, resume = open_run(requested, given)
    except (ConfigError, DatasetError, RunDirError) as e:
        lock.release()
        print(f"train: {e}", file=sys.stderr)
        return EXIT_INVALID
    try:
        return _train(config, problems, resume, argv, on_member_done)
    finally:
        lock.release()


def _train(
    config: TrainConfig, problems: Problems, resume: ResumePoint | None, argv: list[str], on_member_done
) -> int:
    """`main` after the run directory is validated and locked: engines, Ray, the run, the summary."""
    try:
        spec = prepare_engines(config)
    except (EngineBuildError, EnginePreflightError) as e:
        print(f"train: {e}", file=sys.stderr)
        return EXIT_FAILED
    trainer = Trainer(config, spec, problems, resume, argv=argv, on_member_done=on_member_done)
    import ray

    started_ray = init_ray(config.address)
    started = time.monotonic()
    try:
        summary = trainer.run()
    except (EngineStartError, EngineSyncError, EnginePreflightError, CheckpointError) as e:
        print(f"train: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(
            f"train: aborted; the last complete checkpoint is kept under {trainer.run_dir.checkpoints}",
            file=sys.stderr,
        )
        return 128 + (trainer.stop_signal or signal.SIGINT)
    finally:
        if started_ray:
            ray.shutdown()
    wall_s = time.monotonic() - started
    out = RunDir(summary["output_dir"])
    plot = plot_run(out.root, "train")
    ties = summary["tied_iterations"]
    rate = summary["iterations_run"] / (wall_s / 60) if wall_s > 0 else 0.0
    print(
        f"{summary['status']}: {summary['updates']} updates, weights {summary['fingerprint'][:16]}"
        + (f" ({ties} iterations had every member tie: zero updates)" if ties else "")
        + "\n"
        f"  wall time:   {format_seconds(wall_s)} for {summary['iterations_run']} iterations "
        f"({rate:.2f} per minute, engines' start included)\n"
        + held_out_change(out)
        + f"  outputs:     {out.root}\n"
        f"  metrics:     {out.metrics} (TensorBoard: tensorboard --logdir {out.tensorboard})\n"
        f"  samples:     {out.samples}\n"
        f"  checkpoint:  {summary['last_checkpoint']}" + (f"\n  reward plot: {plot}" if plot else "")
    )
    if summary["status"] == "stopped":
        print(f"continue with: ./pants run src/driver:train -- --resume --output-dir {out.root}")
        return 128 + summary["signal"]
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
