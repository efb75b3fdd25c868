"""vLLM check of the ES operations inside a real vLLM engine, on GPUs (CUDA vLLM) or TPUs (tpu-inference).

    ./pants run bench:vllm_check-gpu -- [--tensor-parallel-size 2] [--json FILE]   # GPU machine
    ./pants run bench:vllm_check -- [--tensor-parallel-size 4] [--json FILE]       # TPU VM
    ./pants run bench:vllm_check -- --emulate-tpu                                  # no TPU: emulated
    PEX_MODULE=vllm_check python3.12 vllm_check.pex [...]                          # a shipped PEX

Runs inside an engine environment (the engine PEX on TPU VMs, the engine-gpu PEX on GPU machines).
Without vLLM or without an accelerator it prints `SKIP: ...` and exits 0. With `--emulate-tpu` it runs the
TPU engine's own vLLM on JAX's CPU backend with the chip stood in (`engine.tpu_emulation`), so that this
script has itself been run before it meets a TPU; its times are the CPU's, not a TPU's.

It creates a random Qwen2 model of about 0.5 B parameters (Qwen2.5-0.5B's layer shapes, as
`bench/gpu_check.py`; with `--emulate-tpu` the warm-started tiny test model; or `--model-dir`), starts
one `engine.vllm_backend.VLLMBackend` on it (bf16, greedy, prefix caching off) and checks:
  exact restore      perturb then restore gives back the same fingerprint and the same greedy completions;
  same noise         perturbing twice with one seed gives the same fingerprint; another seed differs;
  perturbs logprobs  a perturbation (sigma 0.001, the paper's; 0.01 with the tiny model) changes the
                     prompts' next-token log-probabilities (top 5, greedy), a continuous measure that any
                     perturbation reaching the forward pass moves; the largest change is reported. How
                     many greedy completions it changed is reported as information only: whether a
                     small perturbation flips a greedy token depends on the CPU's or chip's numerics
                     (on an AVX2-only CPU sigma 0.01 changed none of the tiny model's 4 completions);
  update             `apply_update` changes the fingerprint, and `master()` is the checkpoint's layout
                     (GPUs: equal, bit for bit, to the transformers backend's master after the same update
                     on the same device: vLLM's noise is the transformers backend's noise);
  no recompilation   TPU: the compiled perturbation count stays 1 over 5 perturbations (tpu-inference).
                     Emulated TPU: also nothing else compiles (tpu-inference's `ForbidCompile` around
                     perturbations, restores and generation; vLLM's engine runs in this process there).
  lora base slot,    GPUs at tensor parallelism 1: low-rank members as LoRA adapters in one batch
  lora perturbs      (`lora_batch`): requests without an adapter get the base model while adapters are
                     loaded, and the members change completions; their agreement with the same members
                     merged into the weights, and the batch's time against the loop's, are reported.
Then it times (medians over 5): perturb + restore, greedy generation of the prompts, and their ratio.
Exit status: 0 when every check passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from gpu_check import QWEN2_5_0_5B_LAYER

SIGMA = 0.001  # Qiu et al. 2025, Sec. 4
# With the tiny test model (as `train`'s default sigma for it): 0.001 moves no completion of it.
TINY_SIGMA = 0.01


def accelerator(emulate_tpu: bool = False) -> str | None:
    """ "cuda" or "tpu" when this machine has one and vLLM is importable, "tpu-emulated" with
    `emulate_tpu` (which installs `engine.tpu_emulation` first), else None.

    Raises:
        engine.tpu_emulation.EmulationError: `emulate_tpu` on a TPU, or without tpu-inference.
    """
    if emulate_tpu:
        from engine import tpu_emulation  # pants: no-infer-dep (TPU engine only: src/engine:tpu)

        tpu_emulation.install()
    try:
        from vllm.platforms import current_platform
    except ImportError:
        return None
    if current_platform.is_tpu():
        import jax

        if emulate_tpu:
            return "tpu-emulated"
        return "tpu" if jax.devices()[0].platform == "tpu" else None
    import torch

    return "cuda" if torch.cuda.is_available() else None


LOGPROBS = 5  # top-k next-token log-probabilities compared by "perturbs logprobs"


def next_token_logprobs(backend: Any, prompts: list[str]) -> list[dict[int, float]]:
    """Per prompt, the top-`LOGPROBS` log-probabilities (token id -> nats) of the greedy next token."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=LOGPROBS)
    outputs = backend.llm.generate(prompts, params, use_tqdm=False)
    return [{t: float(lp.logprob) for t, lp in o.outputs[0].logprobs[0].items()} for o in outputs]


def largest_logprob_change(before: list[dict[int, float]], after: list[dict[int, float]]) -> float:
    """The largest absolute change (nats) of a log-probability over the prompts and the tokens in both
    top-k sets; infinity when a prompt's top-k set itself changed."""
    largest = 0.0
    for a, b in zip(before, after, strict=True):
        if set(a) != set(b):
            return math.inf
        largest = max([largest, *(abs(a[t] - b[t]) for t in a)])
    return largest


def median_seconds(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(args: argparse.Namespace, model_dir: Path, kind: str) -> tuple[dict, list[tuple[str, bool, str]]]:
    """Starts the engine on `model_dir`, runs the checks and timings of the module docstring; returns
    (results: seconds and ratios; checks: (name, ok, detail))."""
    from engine.vllm_backend import VLLMBackend
    from shared.countdown import make_prompt

    backend = VLLMBackend(
        model_dir,
        dtype="bfloat16",
        tensor_parallel_size=args.tensor_parallel_size,
        max_model_len=512,
        gpu_memory_utilization=args.gpu_memory_utilization,
        emulate_tpu=kind == "tpu-emulated",
        cpu_kv_cache_gib=args.emulated_hbm_gib,
    )
    prompts = [make_prompt([3 + i, 7, 11 + i], 20 + i) for i in range(args.prompts)]
    checks = []

    def completions() -> list[str]:
        return [c.text for c in backend.generate(prompts, args.max_new_tokens)]

    base, texts, base_logprobs = backend.fingerprint(), completions(), next_token_logprobs(backend, prompts)
    backend.perturb(1, args.sigma)
    perturbed_texts, first = completions(), backend.fingerprint()
    perturbed_logprobs = next_token_logprobs(backend, prompts)
    backend.restore()
    checks.append(("exact restore", backend.fingerprint() == base and completions() == texts, base[:12]))
    backend.perturb(1, args.sigma)
    again = backend.fingerprint()
    backend.restore()
    backend.perturb(2, args.sigma)
    other = backend.fingerprint()
    backend.restore()
    checks.append(("same noise", again == first != other, f"{first[:12]} / seed 2: {other[:12]}"))
    change = largest_logprob_change(base_logprobs, perturbed_logprobs)
    changed = sum(a != b for a, b in zip(texts, perturbed_texts, strict=True))
    detail = f"largest next-token log-prob change {change:.3g} nats over {len(prompts)} prompts"
    checks.append(
        ("perturbs logprobs", change > 0, f"{detail}; {changed}/{len(prompts)} completions changed")
    )

    def cycle() -> None:
        backend.perturb(3, args.sigma)
        backend.restore()
        backend.fingerprint()  # waits for the device

    fingerprint_s = median_seconds(backend.fingerprint)
    perturb_restore_s = max(median_seconds(cycle) - fingerprint_s, 0.0)
    generate_s = median_seconds(completions, repeats=3)
    if kind in ("tpu", "tpu-emulated"):
        counts = []
        guard = nullcontext()
        if kind == "tpu-emulated":
            from tpu_inference.runner.utils import ForbidCompile  # pants: no-infer-dep (with vllm-tpu)

            guard = ForbidCompile()
        try:
            with guard:
                for seed in range(5):
                    backend.perturb(seed, args.sigma)
                    completions()
                    backend.restore()
                    counts.append(max(backend.llm.collective_rpc("es_compilations")))
            detail = f"compiled versions {counts}"
        except RuntimeError as error:  # ForbidCompile: something compiled again
            counts, detail = [], f"{error} (after {len(counts)} perturbations)"
        checks.append(("no recompilation", bool(counts) and set(counts) == {1}, detail))

    updated = backend.apply_update([(1, 0.5 * args.sigma), (2, -0.25 * args.sigma)])
    detail = f"{base[:12]} -> {updated[:12]}"
    ok = updated != base
    if kind == "cuda":
        import torch
        from transformers import AutoModelForCausalLM

        from engine.torch_weights import TorchWeights

        master = backend.master()
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to("cuda")
        reference = TorchWeights(model)
        reference.apply_update([(1, 0.5 * args.sigma), (2, -0.25 * args.sigma)])
        differ = [n for n in reference.master if not torch.equal(master[n], reference.master[n])]
        ok = ok and set(master) == set(reference.master) and not differ
        detail += f"; master vs transformers backend: {len(differ)} of {len(master)} tensors differ"
    checks.append(("update", ok, detail))
    results = {
        "accelerator": kind,
        "tensor_parallel_size": args.tensor_parallel_size,
        "parameters": sum(w["parameters"] for w in backend.workers),
        "perturb_restore_s": perturb_restore_s,
        "generate_s": generate_s,
        "perturb_restore_share": perturb_restore_s / (perturb_restore_s + generate_s),
        "logprob_change_max": change,
        "completions_changed": f"{changed}/{len(prompts)}",
    }
    backend.close()
    return results, checks


def lora_batch(args: argparse.Namespace, model_dir: Path) -> tuple[dict, list[tuple[str, bool, str]]]:
    """CUDA, tensor parallelism 1: low-rank members as LoRA adapters in one batch
    (`VLLMBackend.generate_members`, `engine.vllm_lora`) against the same members merged into the
    weights one at a time, on one engine (bf16, rank 1, 4 members at 10 x sigma so that they move greedy
    completions). Checks that a request without an adapter, while adapters are loaded, gives the base
    model's completions, and that the members perturb; reports how many of each member's completions
    equal its merged ones (bf16: the LoRA product and the merged weights round differently) and the
    seconds of the batch against the loop."""
    from engine.vllm_backend import VLLMBackend
    from shared.countdown import make_prompt
    from shared.protocol import Member

    members = [Member(seed, sign, 10 * args.sigma) for seed in (1, 2) for sign in (1, -1)]
    backend = VLLMBackend(
        model_dir,
        dtype="bfloat16",
        max_model_len=512,
        gpu_memory_utilization=args.gpu_memory_utilization,
        rank=1,
        member_slots=len(members),
    )
    prompts = [make_prompt([3 + i, 7, 11 + i], 20 + i) for i in range(args.prompts)]

    def texts(completions) -> list[str]:
        return [c.text for c in completions]

    base = texts(backend.generate(prompts, args.max_new_tokens))
    start = time.perf_counter()
    batch = [texts(c) for c in backend.generate_members(prompts, members, args.max_new_tokens)]
    batch_s = time.perf_counter() - start
    start, merged = time.perf_counter(), []
    for m in members:
        backend.perturb(m.seed, m.sigma, m.sign)
        merged.append(texts(backend.generate(prompts, args.max_new_tokens)))
        backend.restore()
    loop_s = time.perf_counter() - start
    after = texts(backend.generate(prompts, args.max_new_tokens))
    backend.close()
    same = sum(a == b for x, y in zip(batch, merged, strict=True) for a, b in zip(x, y, strict=True))
    moved = sum(a != b for x in batch for a, b in zip(x, base, strict=True))
    total = len(members) * len(prompts)
    checks = [
        ("lora base slot", after == base, "no-adapter completions with adapters loaded equal the base's"),
        ("lora perturbs", moved > 0, f"{moved}/{total} member completions differ from the base's"),
    ]
    results = {
        "lora_equal_to_merged": f"{same}/{total}",
        "lora_batch_s": batch_s,
        "merged_loop_s": loop_s,
        "lora_batch_speedup": loop_s / batch_s,
    }
    return results, checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", help="a Hugging Face model directory (default: a random ~0.5 B Qwen2)")
    parser.add_argument("--layers", type=int, default=32, help="layers of the random model")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.6)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--json", help="also write the results and checks to this file")
    parser.add_argument(
        "--emulate-tpu",
        action="store_true",
        help="no TPU: the TPU engine's vLLM on JAX's CPU backend, the chip stood in (engine.tpu_emulation)",
    )
    parser.add_argument(
        "--emulated-hbm-gib", type=float, default=0.25, help="with --emulate-tpu: HBM per emulated chip, GiB"
    )
    parser.add_argument(
        "--sigma", type=float, help=f"perturbation scale (default {SIGMA}; {TINY_SIGMA} with the tiny model)"
    )
    args = parser.parse_args(argv)
    kind = accelerator(args.emulate_tpu)
    if kind is None:
        print("SKIP: no vLLM with a GPU or TPU here (run it inside the engine PEX on such a machine)")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model_dir) if args.model_dir else None
        if model_dir is None:
            from engine.tiny_model import make_tiny_model

            if kind == "tpu-emulated":  # on CPUs: the tiny model, warm-started to write text
                model_dir = make_tiny_model(Path(tmp) / "model", warm_start_steps=55)
                args.sigma = args.sigma or TINY_SIGMA
            else:
                model_dir = make_tiny_model(Path(tmp) / "model", num_layers=args.layers, **QWEN2_5_0_5B_LAYER)
        args.sigma = args.sigma or SIGMA
        print(
            f"engine on {model_dir} ({kind}, tensor parallel {args.tensor_parallel_size}, sigma {args.sigma})"
        )
        results, checks = run(args, model_dir, kind)
        if kind == "cuda" and args.tensor_parallel_size == 1:
            lora_results, lora_checks = lora_batch(args, model_dir)
            results, checks = results | lora_results, checks + lora_checks
    for name, ok, detail in checks:
        print(f"{'ok  ' if ok else 'FAIL'} {name:18s} {detail}")
    for name, value in results.items():
        print(f"{name:24s} {value:.4g}" if isinstance(value, float) else f"{name:24s} {value}")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "checks": checks}, indent=2) + "\n")
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
