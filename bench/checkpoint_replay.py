"""Checkpoint sizes, full against compact, and the time to replay one update onto the weights.

    ./pants run bench:checkpoint_replay -- [--model 100M] [--dtype bfloat16] [--population 30]
        [--iterations 500] [--repeats 2] [--json FILE]

A full checkpoint is what `TransformersBackend.save_checkpoint` writes (the Hugging Face model directory,
plus the fp32 master when the weights are not fp32); a compact one is es_state.json, whose size is
dominated by the strategy's update history: N (seed, coefficient) pairs per update, measured here after
`--iterations` updates of a real `driver.strategy.Strategy` with random rewards. Replay is one
`apply_update` of N pairs (every member's noise regenerated from its seed and accumulated into the fp32
master), as restoring a compact checkpoint does per update since its anchor.

Models are random (`engine.tiny_model.make_tiny_model`): "tiny" (0.36 M parameters, the default run's)
and "100M" (~98 M, the perturbation benchmark's Qwen2 of the same family).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from driver.strategy import Strategy, StrategyConfig
from engine.hf_backend import TransformersBackend
from engine.tiny_model import SIZES, make_tiny_model
from shared.protocol import LoadRequest
from shared.run_layout import checkpoint_files


def tree_bytes(path: Path) -> int:
    """Bytes of every file under `path` (or of the file `path`)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def compact_bytes(population: int, iterations: int) -> int:
    """Bytes of es_state.json's strategy state after `iterations` updates of a population of N (the
    bulk of a compact checkpoint), from a real Strategy told random rewards."""
    strategy = Strategy(config=StrategyConfig(population=population), root_seed=0)
    rewards = np.random.default_rng(0)
    for _ in range(iterations):
        strategy.ask()
        strategy.tell(rewards.random(population))
    return len(json.dumps({"strategy": strategy.state_dict()}, indent=2).encode())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--population", type=int, default=30, help="N: (seed, coefficient) pairs per update")
    parser.add_argument("--iterations", type=int, default=500, help="updates in the compact history")
    parser.add_argument("--repeats", type=int, default=2, help="updates replayed (median reported)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, dtype {args.dtype}, N {args.population}")
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-replay-") as tmp:
        for name in args.models:
            model_dir = make_tiny_model(Path(tmp) / name, seed=0, **SIZES[name])
            backend = TransformersBackend(LoadRequest(model_dir=str(model_dir), dtype=args.dtype))
            files = checkpoint_files(Path(tmp) / f"{name}-checkpoint")
            files.root.mkdir()
            backend.save_checkpoint(files)
            full = tree_bytes(files.model) + (tree_bytes(files.master) if files.master.exists() else 0)
            compact = compact_bytes(args.population, args.iterations)
            rng = np.random.default_rng(1)
            times = []
            for _ in range(args.repeats):
                seeds = rng.integers(0, 2**62, args.population)
                coefficients = rng.normal(0, 1e-5, args.population)
                pairs = [(int(s), float(c)) for s, c in zip(seeds, coefficients, strict=True)]
                start = time.perf_counter()
                backend.apply_update(pairs)
                times.append(time.perf_counter() - start)
            results[name] = r = {
                "parameters": backend.parameters,
                "full_checkpoint_bytes": full,
                "compact_checkpoint_bytes": compact,
                "replay_s_per_update": statistics.median(times),
            }
            print(
                f"{name:>5}: {r['parameters'] / 1e6:6.2f} M params | full checkpoint {full / 1e6:9.1f} MB | "
                f"compact after {args.iterations} updates {compact / 1e6:6.2f} MB | replay "
                f"{r['replay_s_per_update']:.2f} s per update (N = {args.population})"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
