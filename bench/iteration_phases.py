"""Where the time of an ES iteration goes, for the default run and for the vLLM CPU engine.

    ./pants run bench:iteration_phases -- [--iterations 3] [--configs default vllm-cpu] [--json FILE]
        [--pex-root DIR] [-- extra train options for every config]

Runs the real `train` (a local Ray cluster, engines from the engine PEX, found or built as `train` does)
once per configuration, then splits each iteration's wall-clock seconds (metrics.jsonl) into:

  perturb, generate, score, restore   inside the engines, per member (`RolloutSeconds`);
  update, fingerprint                 inside the engines, per update (`take_update_seconds`);
  checkpoint                          the driver's checkpoint of that iteration (if one was due);
  scheduling and Ray                  the rest: dispatching members, serialization, the driver's own
                                      work (strategy, metrics), and the engines' imbalance: members
                                      generate different numbers of tokens, so one engine finishes its
                                      share first and waits for the others.

Engine phases are summed over members and divided by the number of engines, which run in parallel, so each
is the wall-clock time it takes out of the iteration when the engines are evenly loaded. Shares are of the
iteration, averaged over the iterations after the first (its engine work includes one-time warm-up: kernel
compilation, caches); the first is printed too.

Configurations (each is `train`'s defaults plus):
  default    nothing: the run the README describes (tiny model, N = 30, 16 prompts x 128 tokens, 2 engines);
  vllm-cpu   `--backend vllm --model smollm2-135m-instruct` (vLLM's CPU backend, SmolLM2-135M, bf16) with
             N = 6, 8 prompts x 64 tokens, 1 engine: the paper's settings (N = 30, 200 prompts x 1024
             tokens, Qiu et al. 2025 Sec. 4) scaled to a 2-core machine.
The paper's per-member generation is 200 x 1024 tokens, 100x the default run's 16 x 128: non-generation
phases per member (perturb, restore) stay the same while generation grows, so their share at the paper's
settings is about 1/100 of what the default run shows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from driver import train
from shared.run_layout import read_jsonl

ENGINE_PHASES = ("perturb", "generate", "score", "restore", "update", "fingerprint")
PHASES = (*ENGINE_PHASES, "checkpoint", "scheduling and Ray")
CONFIGS = {
    "default": [],
    "vllm-cpu": [
        "--backend", "vllm", "--model", "smollm2-135m-instruct", "--dtype", "bfloat16",
        "--num-engines", "1", "--cpu-kv-cache-gib", "1", "--max-model-len", "1024",
        "--population", "6", "--prompts-per-member", "8", "--max-new-tokens", "64", "--batch-size", "8",
    ],
}  # fmt: skip


def phase_shares(row: dict, engines: int) -> dict[str, float]:
    """One metrics row (kind "train") -> phase -> share of the iteration's seconds (see the docstring).

    Raises:
        KeyError: the row lacks the engine phase seconds (a run from before they were recorded).
    """
    seconds = row["seconds"]
    total = seconds["iteration"]
    shares = {p: seconds[f"engine_{p}"] / engines / total for p in ENGINE_PHASES}
    shares["checkpoint"] = seconds.get("checkpoint", 0.0) / total
    shares["scheduling and Ray"] = 1.0 - sum(shares.values())
    return shares


def run_config(name: str, args: argparse.Namespace, extra: list[str], workdir: Path) -> dict:
    """Runs `train` for configuration `name`; returns its per-iteration shares and their summary."""
    out = workdir / name
    argv = [*CONFIGS[name], *extra, "--iterations", str(args.iterations), "--eval-every", "0",
            "--no-progress", "--output-dir", str(out)]  # fmt: skip
    if args.pex_root:
        argv += ["--pex-root", args.pex_root]
    print(f"{name}: train {' '.join(argv)}", flush=True)
    status = train.main(argv)
    if status != 0:
        return {"failed": f"train exited with status {status}"}
    config = json.loads((out / "config.json").read_text())
    engines = int(config["num_engines"])
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if r.get("kind") == "train"]
    per_iteration = [phase_shares(r, engines) for r in rows]
    later = per_iteration[1:] or per_iteration
    return {
        "argv": argv,
        "engines": engines,
        "iteration_s": [r["seconds"]["iteration"] for r in rows],
        "first": per_iteration[0],
        "mean_after_first": {p: statistics.mean(s[p] for s in later) for p in PHASES},
    }


def print_table(results: dict[str, dict]) -> None:
    names = [n for n, r in results.items() if "failed" not in r]
    print(f"\n{'phase':<20}" + "".join(f"{n:>14}{'(first)':>9}" for n in names))
    for phase in PHASES:
        cells = "".join(
            f"{100 * results[n]['mean_after_first'][phase]:13.2f}%{100 * results[n]['first'][phase]:8.1f}%"
            for n in names
        )
        print(f"{phase:<20}{cells}")
    not_generation = {n: 1.0 - results[n]["mean_after_first"]["generate"] for n in names}
    print(f"{'not generation':<20}" + "".join(f"{100 * v:13.2f}%{'':9}" for v in not_generation.values()))
    print(f"{'iteration seconds':<20}" + "".join(
        f"{statistics.mean(results[n]['iteration_s'][1:] or results[n]['iteration_s']):13.1f}s{'':9}"
        for n in names))  # fmt: skip
    for name, r in results.items():
        if "failed" in r:
            print(f"{name}: FAILED ({r['failed']})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--pex-root", help="PEX_ROOT for the engines (default: train's)")
    parser.add_argument("--json", help="also write the results to this file")
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-phases-") as tmp:
        for name in args.configs:
            results[name] = run_config(name, args, extra, Path(tmp))
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0 if all("failed" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
