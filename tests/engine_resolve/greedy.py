"""Greedy token ids from transformers, the reference the vLLM engines' completions are compared with."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def transformers_greedy_ids(
    model_dir: str | Path, prompts: list[str], max_new_tokens: int
) -> list[list[int]]:
    """Each prompt's greedy completion (token ids, prompt excluded; stops at EOS) by
    `AutoModelForCausalLM.generate` in float32, one prompt at a time (no padding)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    completions = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        completions.append(out[0, ids.shape[1] :].tolist())
    return completions
