"""The reward curve of a run as a PNG: `OUTPUT_DIR/reward.png`, drawn with matplotlib from metrics.jsonl.

Three series, all on the task's reward (the `total` ES maximises, in the task's units):
  - population mean and max per iteration (the "train" rows: the members' rewards on that iteration's
    training prompts), against the iteration's update number (iteration + 1);
  - the held-out evaluations (the "eval" rows: greedy, unperturbed, on the held-out split), against the
    number of updates they were made after;
  - held-out evaluations of checkpoints by `evaluate` (each checkpoint's eval.json), where they exist.
The title names the task and, when the held-out rows carry it, the task's accuracy component before and
after (for conciseness: the share of replies that still contain the reference answer).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from shared.run_layout import RunDir, checkpoint_files, read_jsonl, write_bytes_atomic
from shared.tasks import TaskError, load_task


def _checkpoint_evals(run: RunDir) -> list[tuple[int, float]]:
    """(updates, held-out reward_mean) of every checkpoint that `evaluate` scored (its eval.json)."""
    points = []
    for updates, path in run.list_checkpoints():
        file = checkpoint_files(path).eval
        if file.is_file():
            points.append((updates, float(json.loads(file.read_text())["reward_mean"])))
    return points


def _accuracy_name(task: str) -> str:
    """The name of the task's accuracy component ("accuracy" for a task this process cannot load)."""
    try:
        return load_task(task).accuracy
    except TaskError:
        return "accuracy"


def write_reward_plot(run_dir: str | Path) -> Path | None:
    """Draws the run's reward curve into `run_dir`/reward.png (replacing it atomically).

    Returns:
        The PNG's path, or None when the run has no metrics rows yet (nothing is written then).

    Raises:
        ValueError: metrics.jsonl is malformed (`read_jsonl`: file and line).
        OSError: the PNG cannot be written.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on cluster nodes
    from matplotlib import pyplot as plt

    run = RunDir(run_dir)
    rows = read_jsonl(run.metrics)
    train = [r for r in rows if r.get("kind") == "train"]
    evals = [r for r in rows if r.get("kind") == "eval"]
    checkpoints = _checkpoint_evals(run)
    if not (train or evals or checkpoints):
        return None
    config: dict[str, Any] = json.loads(run.config.read_text()) if run.config.is_file() else {}
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    try:
        if train:
            x = [r["iteration"] + 1 for r in train]
            ax.plot(
                x, [r["reward_mean"] for r in train], color="tab:blue", marker=".", label="population mean"
            )
            ax.plot(x, [r["reward_max"] for r in train], color="tab:blue", alpha=0.45, linestyle="--",
                    label="population max")  # fmt: skip
        if evals:
            ax.plot([r["updates"] for r in evals], [r["reward_mean"] for r in evals], color="tab:orange",
                    marker="o", label="held-out (greedy)")  # fmt: skip
        if checkpoints:
            ax.scatter(*zip(*checkpoints, strict=True), color="tab:red", marker="s", zorder=3,
                       label="held-out, evaluate")  # fmt: skip
        task = config.get("task", "countdown")
        title = f"ES on {task}"
        if evals and "accuracy" in evals[0]:
            before, after = evals[0]["accuracy"], evals[-1]["accuracy"]
            title += f": held-out {_accuracy_name(task)} {before:.2f} -> {after:.2f}"
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("updates")
        ax.set_ylabel("reward")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        png = io.BytesIO()
        fig.savefig(png, format="png")
        write_bytes_atomic(run.reward_plot, png.getvalue())
        return run.reward_plot
    finally:
        plt.close(fig)
