"""GPU check of the ES core: in-place torch weight operations and the transformers backend on CUDA, bf16.

    ./pants run bench:gpu_check -- [--layers 32] [--json FILE]       # from the engine resolve
    PYTHONPATH=src:bench python3 bench/gpu_check.py [...]              # any Python with torch, transformers

Needs only torch, transformers, tokenizers and safetensors (no vLLM), so it runs on any GPU machine with a
PyTorch stack. Without a CUDA device it prints `SKIP: ...` and exits 0.

It creates a random Qwen2 model of about 0.5 B parameters (Qwen2.5-0.5B's layer shapes, hidden 896,
14 heads of 64, 2 KV heads, MLP 4864; 32 layers; a small local tokenizer instead of the 151 k vocabulary),
loads it twice in bf16 with `engine.hf_backend.HFGenerator`, and checks:
  identical load     the two instances' `TorchWeights.fingerprint()` are equal;
  exact restore      perturb then restore gives back bit-identical weights (restore modes master, device);
  same noise         both instances perturbed with the same seed have equal fingerprints and produce the
                     same greedy completions of Countdown prompts; a different seed differs;
  same update        `apply_update` with the same (seed, coefficient) pairs leaves them equal;
  subtract drift     the reference's subtract-to-restore: largest deviation after 10 cycles (reported).
Then it times (medians, device synchronized; the helpers of `perturb_throughput`):
  card copy          one large device-to-device copy (1 GiB), bytes read + written per second;
  param copy         `p.copy_(q)` over every parameter (the floor for any in-place weight operation);
  perturb+restore    per restore mode, as parameters per second, as effective bandwidth (bytes of the
                     weights read + written by perturb and restore) and as a ratio over the param copy;
  member evaluation  the share of one member's evaluation (perturb, greedy generation, restore).
Exit status: 0 when every check passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from perturb_throughput import _timed, member_evaluation, param_copy_seconds, perturb_restore_seconds

from engine.hf_backend import HFGenerator, use_deterministic_kernels
from engine.tiny_model import make_tiny_model
from engine.torch_weights import RESTORE_MODES, TorchWeights
from shared.countdown import make_prompt

# Qwen2.5-0.5B's layer shapes (Qwen2.5 technical report, Table 1; the model's config.json).
QWEN2_5_0_5B_LAYER = {"hidden_size": 896, "num_heads": 14, "num_kv_heads": 2, "intermediate_size": 4864}


def card_copy_bandwidth(device: torch.device, repeats: int, gib: float = 1.0) -> float:
    """Bytes read + written per second by one large device-to-device copy of `gib` GiB."""
    n = int(gib * 2**30)
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = _timed(lambda: dst.copy_(src), device, repeats)
    return 2 * n / seconds


def check_model(args: argparse.Namespace, model_dir: Path) -> tuple[dict, list[tuple[str, bool, str]]]:
    """Loads `model_dir` twice in bf16 on `args.device`, runs the checks and timings of the module
    docstring, and returns (results: figures in seconds, bytes/s and ratios; checks: (name, ok, detail))."""
    device = torch.device(args.device)
    a = HFGenerator(model_dir, dtype="bfloat16", device=args.device)
    b = HFGenerator(model_dir, dtype="bfloat16", device=args.device)
    checks: list[tuple[str, bool, str]] = []
    wa, wb = TorchWeights(a.model), TorchWeights(b.model)
    count = sum(p.numel() for p in wa.params.values())
    weight_bytes = sum(p.numel() * p.element_size() for p in wa.params.values())
    base = wa.fingerprint()
    checks.append(("identical load", base == wb.fingerprint(), base[:12]))

    for mode in ("master", "device"):
        w = TorchWeights(a.model, restore_mode=mode)
        exact = True
        for seed in range(3):
            w.perturb(seed, args.sigma, sign=-1 if seed % 2 else 1)
            exact &= w.fingerprint() != base
            w.restore()
            exact &= w.fingerprint() == base
        checks.append((f"exact restore ({mode})", exact, "3 perturb/restore cycles, bf16"))
        del w

    prompts = [make_prompt([i + 1, i + 2, i + 7], 10 + 3 * i) for i in range(args.prompts)]
    wa.perturb(1234, args.sigma)
    wb.perturb(1234, args.sigma)
    same_fp = wa.fingerprint() == wb.fingerprint()
    texts_a = [c.text for c in a.generate(prompts, args.max_new_tokens, batch_size=args.prompts)]
    texts_a2 = [c.text for c in a.generate(prompts, args.max_new_tokens, batch_size=args.prompts)]
    texts_b = [c.text for c in b.generate(prompts, args.max_new_tokens, batch_size=args.prompts)]
    repeat_equal = sum(x == y for x, y in zip(texts_a, texts_a2, strict=True))
    cross_equal = sum(x == y for x, y in zip(texts_a, texts_b, strict=True))
    wb.restore()
    wb.perturb(1235, args.sigma)
    differs = wb.fingerprint() != wa.fingerprint()
    wa.restore()
    wb.restore()
    checks.append(("same noise on two instances", same_fp and differs, "seed 1234 equal, 1235 differs"))
    for where, equal in (("one instance", repeat_equal), ("two instances", cross_equal)):
        checks.append(
            (f"same greedy completions, {where}", equal == len(prompts), f"{equal}/{len(prompts)} equal")
        )

    pairs = [(11, 2e-3), (12, -1e-3), (13, 5e-4)]
    wa.apply_update(pairs)
    wb.apply_update(pairs)
    checks.append(("same update on two instances", wa.fingerprint() == wb.fingerprint(), "3 pairs"))

    reference = {n: p.detach().clone() for n, p in b.model.named_parameters()}
    drift_weights = TorchWeights(b.model, restore_mode="subtract")
    for seed in range(10):
        drift_weights.perturb(100 + seed, args.sigma)
        drift_weights.restore()
    drift = max(
        (p.detach().float() - reference[n].float()).abs().max().item() for n, p in b.model.named_parameters()
    )
    del reference, drift_weights, b, wb
    torch.cuda.empty_cache()

    # Throughput, on instance a.
    t_copy = param_copy_seconds(list(wa.params.values()), device, args.repeats)
    seeds = iter(range(10**9))
    timings = {}
    for mode in RESTORE_MODES:
        w = TorchWeights(a.model, restore_mode=mode)
        t = perturb_restore_seconds(w, args.sigma, seeds, device, args.repeats)
        # perturb reads and writes the weights once; restore writes them (and reads the copy/master).
        timings[mode] = {
            "perturb_restore_s": t,
            "params_per_s": count / t,
            "weights_bytes_per_s": 3 * weight_bytes / t,
            "ratio_over_param_copy": t / t_copy,
        }
        del w

    t_eval, t_in_eval = member_evaluation(
        a, TorchWeights(a.model, restore_mode="device"), prompts, args.max_new_tokens, next(seeds),
        args.sigma, device,
    )  # fmt: skip
    results = {
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "parameters": count,
        "weights_bytes": weight_bytes,
        "card_copy_bytes_per_s": card_copy_bandwidth(device, args.repeats),
        "param_copy_s": t_copy,
        "param_copy_bytes_per_s": 2 * weight_bytes / t_copy,
        "perturb_restore": timings,
        "subtract_drift_max_abs_after_10": drift,
        "member_evaluation_s": t_eval,
        "perturb_restore_share_of_evaluation_device_mode": t_in_eval / t_eval,
    }
    return results, checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (32: ~0.48 B parameters)")
    parser.add_argument("--sigma", type=float, default=0.001, help="perturbation scale (the paper's)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--device", default="cuda", help="torch device (cpu: a dry run of the script itself)")
    parser.add_argument(
        "--deterministic",
        action="store_true",
        help="torch.use_deterministic_algorithms(True) with CUBLAS_WORKSPACE_CONFIG=:4096:8",
    )
    args = parser.parse_args(argv)
    if args.deterministic:
        use_deterministic_kernels()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("SKIP: no CUDA device visible to torch (torch.cuda.is_available() is False)")
        return 0
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        start = time.perf_counter()
        model_dir = make_tiny_model(Path(tmp) / "model", seed=0, num_layers=args.layers, **QWEN2_5_0_5B_LAYER)
        print(f"random Qwen2 model created in {time.perf_counter() - start:.1f} s")
        results, checks = check_model(args, model_dir)
    mode = "deterministic algorithms" if args.deterministic else "default algorithms"
    print(
        f"{results['gpu']}, torch {results['torch']}, {results['parameters'] / 1e6:.1f} M parameters "
        f"(bf16), {mode}"
    )
    for name, ok, detail in checks:
        print(f"  {'PASS' if ok else 'FAIL'}  {name:<30} {detail}")
    drift = results["subtract_drift_max_abs_after_10"]
    print(f"  subtract-to-restore drift after 10 cycles: max |delta| = {drift:.3g}")
    card = results["card_copy_bytes_per_s"]
    print(f"card device-to-device copy: {card / 1e9:8.1f} GB/s (read + written)")
    print(
        f"parameter copy p.copy_(q):  {results['param_copy_bytes_per_s'] / 1e9:8.1f} GB/s, "
        f"{results['param_copy_s'] * 1e3:.2f} ms"
    )
    for mode, t in results["perturb_restore"].items():
        print(
            f"perturb+restore ({mode:>8}): {t['perturb_restore_s'] * 1e3:8.2f} ms, "
            f"{t['params_per_s'] / 1e9:6.2f} G params/s, "
            f"{t['weights_bytes_per_s'] / card:6.1%} of the card's copy bandwidth, "
            f"{t['ratio_over_param_copy']:6.1f}x the parameter copy"
        )
    print(
        f"member evaluation ({args.prompts} prompts x {args.max_new_tokens} tokens): "
        f"{results['member_evaluation_s']:.2f} s, perturb+restore (device) "
        f"{results['perturb_restore_share_of_evaluation_device_mode']:.2%} of it"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"args": vars(args), "results": results, "checks": checks}, indent=2) + "\n"
        )
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
