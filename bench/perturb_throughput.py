"""Perturb + restore throughput vs a plain copy, and its share of a member's evaluation time.

    ./pants run bench:perturb_throughput -- [--device cpu] [--dtype float32] [--restore-mode master]
        [--json FILE]

For each model (the tiny default model and a ~100M-parameter Qwen2 of the same family, both random):
  copy      one pass of `p.copy_(q)` over every parameter from a same-shaped tensor on the same device
            (the baseline: what any in-place weight operation must at least do);
  perturb+restore   `TorchWeights.perturb` then `.restore` (noise regenerated from the seed, added in
            fp32, then an exact copy back from the fp32 master): on CPUs the noise of version 2
            (`engine.cpu_noise`, generated and added in one pass), on CUDA `torch.randn`;
  v1 perturb+restore  the same with noise version 1, measured in the same run as the baseline it
            replaced: per parameter a seeded `torch.Generator` and `torch.randn`, then mul_/add_/copy_;
  evaluation share  the fraction of one member evaluation (perturb, greedy generation of
            --max-new-tokens on --prompts Countdown prompts, restore) spent in perturb + restore.
Reports parameters per second and the ratios perturb+restore / copy (goal: within 3x), for both noise
versions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from engine.hf_backend import HFGenerator
from engine.tiny_model import SIZES, make_tiny_model
from engine.torch_weights import RESTORE_MODES, TorchWeights
from shared.countdown import make_prompt
from shared.seeds import noise_seed


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def param_copy_seconds(params: list[torch.Tensor], device: torch.device, repeats: int) -> float:
    """Median seconds of `p.copy_(q)` over every parameter from a same-shaped tensor on the same device:
    the floor for any in-place weight operation."""
    sources = [p.detach().clone() for p in params]

    @torch.no_grad()
    def copy() -> None:
        for p, q in zip(params, sources, strict=True):
            p.copy_(q)

    return _timed(copy, device, repeats)


def perturb_restore_seconds(
    weights: TorchWeights, sigma: float, seeds: Iterator[int], device: torch.device, repeats: int
) -> float:
    """Median seconds of `weights.perturb` (a fresh seed from `seeds` each time) then `.restore`."""

    def perturb_restore() -> None:
        weights.perturb(next(seeds), sigma)
        weights.restore()

    return _timed(perturb_restore, device, repeats)


def v1_noise(name: str, p: torch.Tensor, seed: int) -> torch.Tensor:
    """Noise version 1 (for the baseline): `torch.randn` from a generator seeded per parameter."""
    generator = torch.Generator(device=p.device)
    generator.manual_seed(noise_seed(seed, name))
    return torch.randn(p.shape, generator=generator, dtype=torch.float32, device=p.device)


def member_evaluation(
    backend: HFGenerator,
    weights: TorchWeights,
    prompts: list[str],
    max_new_tokens: int,
    seed: int,
    sigma: float,
    device: torch.device,
) -> tuple[float, float]:
    """One member's evaluation after a warm-up generation: perturb, greedy generation of `prompts`,
    restore. Returns (seconds in all, seconds of it in perturb + restore), the device synchronized
    around each phase."""
    backend.generate(prompts, max_new_tokens, batch_size=len(prompts))  # warm-up
    _sync(device)
    start = time.perf_counter()
    weights.perturb(seed, sigma)
    _sync(device)
    perturbed = time.perf_counter()
    backend.generate(prompts, max_new_tokens, batch_size=len(prompts))
    _sync(device)
    generated = time.perf_counter()
    weights.restore()
    _sync(device)
    end = time.perf_counter()
    return end - start, (perturbed - start) + (end - generated)


def bench_model(name: str, args: argparse.Namespace, workdir: Path) -> dict:
    model_dir = make_tiny_model(workdir / name, seed=0, **SIZES[name])
    backend = HFGenerator(model_dir, dtype=args.dtype, device=args.device)
    weights = TorchWeights(backend.model, restore_mode=args.restore_mode)
    device = backend.device
    params = list(weights.params.values())
    count = sum(p.numel() for p in params)
    seeds = iter(range(10**9))
    t_copy = param_copy_seconds(params, device, args.repeats)
    t_pr = perturb_restore_seconds(weights, 0.001, seeds, device, args.repeats)
    # The same weights through noise tensors of version 1 (TorchWeights' noise-tensor path).
    v1 = TorchWeights(backend.model, restore_mode=args.restore_mode, noise=v1_noise)
    t_v1 = perturb_restore_seconds(v1, 0.001, seeds, device, args.repeats)
    del v1
    prompts = [make_prompt([i + 1, i + 2, i + 3], 10 + i) for i in range(args.prompts)]
    t_eval, perturb_restore_in_eval = member_evaluation(
        backend, weights, prompts, args.max_new_tokens, next(seeds), 0.001, device
    )
    return {
        "parameters": count,
        "copy_s": t_copy,
        "perturb_restore_s": t_pr,
        "copy_params_per_s": count / t_copy,
        "perturb_restore_params_per_s": count / t_pr,
        "ratio_perturb_restore_over_copy": t_pr / t_copy,
        "v1_perturb_restore_s": t_v1,
        "v1_ratio_perturb_restore_over_copy": t_v1 / t_copy,
        "member_evaluation_s": t_eval,
        "perturb_restore_share_of_evaluation": perturb_restore_in_eval / t_eval,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--restore-mode", default="master", choices=list(RESTORE_MODES))
    parser.add_argument("--models", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    print(
        f"torch {torch.__version__}, device {args.device}, dtype {args.dtype}, threads {threads}, "
        f"restore mode {args.restore_mode}"
    )
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-perturb-") as tmp:
        for name in args.models:
            results[name] = r = bench_model(name, args, Path(tmp))
            print(
                f"{name:>5}: {r['parameters'] / 1e6:7.2f} M params | "
                f"copy {r['copy_params_per_s'] / 1e6:9.1f} M/s | "
                f"perturb+restore {r['perturb_restore_params_per_s'] / 1e6:8.1f} M/s | "
                f"ratio {r['ratio_perturb_restore_over_copy']:5.2f}x "
                f"(noise v1: {r['v1_ratio_perturb_restore_over_copy']:5.1f}x) | share of a member evaluation "
                f"({args.prompts} prompts x {args.max_new_tokens} tokens, {r['member_evaluation_s']:.2f} s) "
                f"{100 * r['perturb_restore_share_of_evaluation']:.1f}%"
            )
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
