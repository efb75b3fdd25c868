"""What a run reports as it goes: metrics.jsonl and samples.jsonl rows, TensorBoard scalars (tensorboardX)
and one console line per iteration and evaluation (file names: `shared.run_layout`)."""

from __future__ import annotations

from typing import Any

from tqdm import tqdm

from shared.run_layout import RunDir
from shared.tasks import Task


def format_seconds(seconds: float) -> str:
    """A duration for people: "42 s", "3 min 05 s", "2 h 07 min"."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class RunLog:
    """The run log of one session.

    Args:
        run_dir: the run directory.
        task: the run's task (its reward components are logged by name).
    """

    def __init__(self, run_dir: RunDir, task: Task) -> None:
        self.run_dir = run_dir
        self.task = task
        self._writer = None

    def open(self, saved_updates: int | None) -> None:
        """Drops the rows and scalars recorded after `saved_updates` updates (None: all of them), the work
        an interrupted session lost, and opens the TensorBoard writer."""
        self.run_dir.truncate_to(saved_updates)
        from tensorboardX import SummaryWriter

        self._writer = SummaryWriter(str(self.run_dir.tensorboard), purge_step=saved_updates or None)

    def close(self) -> None:
        """Flushes and closes the TensorBoard writer, if open."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self._writer.add_scalar(f"{prefix}/{name}", value, step)
        self._writer.flush()

    def eval(self, updates: int, result: dict[str, Any], seconds: float) -> None:
        """Logs a held-out evaluation after `updates` updates (`driver.held_out.evaluate`'s result; its
        "samples" go to samples.jsonl) that took `seconds`."""
        row = {"kind": "eval", "updates": updates, "seconds": {"eval": seconds}}
        row.update({k: v for k, v in result.items() if k != "samples"})
        self.run_dir.append_jsonl(self.run_dir.metrics, [row])
        self.run_dir.append_jsonl(
            self.run_dir.samples, [{"kind": "eval", "updates": updates, **s} for s in result["samples"]]
        )
        names = ("reward_mean", "accuracy", *self.task.components)
        self._scalars("eval", {name: result[name] for name in names}, updates)
        tqdm.write(
            f"eval after {updates:4d} updates: accuracy {result['accuracy']:.3f} on {result['problems']} "
            f"held-out problems, reward {result['reward_mean']:.3f} ({seconds:.1f} s)"
        )

    def train_samples(self, samples: list[dict[str, Any]]) -> None:
        """Appends an iteration's sample completions to samples.jsonl."""
        self.run_dir.append_jsonl(self.run_dir.samples, samples)

    def iteration(self, row: dict[str, Any], eta_s: float | None = None) -> None:
        """Logs an iteration's metrics row ({"kind": "train", "iteration", rewards, components, "tokens",
        "tokens_per_s" (generated tokens per second of the rollouts), "time" (UTC, ISO 8601), "seconds":
        {phase: s}}): metrics.jsonl, TensorBoard (train/*, seconds/*) and the console, with `eta_s`, the
        estimated seconds the rest of the run takes."""
        self.run_dir.append_jsonl(self.run_dir.metrics, [row])
        scalars = {k: v for k, v in row.items() if isinstance(v, int | float) and k != "iteration"}
        self._scalars("train", scalars, row["iteration"])
        self._scalars("seconds", row["seconds"], row["iteration"])
        tqdm.write(
            f"iteration {row['iteration']:4d}: reward mean {row['reward_mean']:.4f} "
            f"max {row['reward_max']:.4f}, "
            + "".join(f"{name} {row[name]:.3f}, " for name in self.task.components)
            + f"{row['tokens']} tokens ({row['tokens_per_s']:.0f}/s), "
            f"{row['seconds']['iteration']:.1f} s"
            + ("" if eta_s is None else f", ETA {format_seconds(eta_s)}")
        )
