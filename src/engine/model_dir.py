"""Writing a Hugging Face model directory from tensors: a checkpoint's model/ as the vLLM backend saves it
(its fp32 master in the checkpoint's layout, cast to the run's dtype), loadable by transformers and vLLM."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

# Weight files of a Hugging Face model directory; `write_model_dir` copies everything else.
_WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.pt")


def write_model_dir(source_dir: str | Path, tensors: dict[str, Any], dtype: str, out_dir: str | Path) -> Path:
    """Writes a Hugging Face model directory: `tensors` (checkpoint name -> tensor, cast to `dtype`) as
    `model.safetensors`, and every other top-level file of `source_dir` (config, tokenizer, generation
    config) copied, with the config's `dtype` set to `dtype`. `out_dir` is created, or must be empty
    (callers write into a temporary directory and rename it).

    Raises:
        ValueError: unknown dtype. OSError: from reading or writing the files.
    """
    import torch
    from safetensors.torch import save_file

    from engine.hf_backend import torch_dtype

    weights_dtype = torch_dtype(dtype)
    source, out = Path(source_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = {p for pattern in _WEIGHT_PATTERNS for p in source.glob(pattern)}
    for path in sorted(source.iterdir()):
        if path.is_file() and path not in weights:
            shutil.copy2(path, out / path.name)
    config_path = out / "config.json"
    if config_path.exists():
        config = json.loads(config_path.read_text())
        config["dtype"] = dtype
        config.pop("torch_dtype", None)
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    state = {name: torch.as_tensor(t).to(weights_dtype).contiguous() for name, t in tensors.items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
