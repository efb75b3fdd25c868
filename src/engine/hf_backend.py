"""The CPU rollout backend: Hugging Face transformers + torch, batched greedy generation.

Loads a model directory (safetensors) offline, generates greedily (the paper decodes greedily) with left
padding and `max_new_tokens`, and returns each completion cut at its first EOS, decoded without special
tokens (as vLLM returns text). The same torch model is what `engine.torch_weights` perturbs in place.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def use_deterministic_kernels() -> None:
    """Makes this process's torch kernels deterministic: the same inputs give bit-identical outputs.

    `torch.use_deterministic_algorithms(True)` plus `CUBLAS_WORKSPACE_CONFIG=:4096:8` (PyTorch's
    "Reproducibility" notes). Without it, greedy generation on a GPU is not reproducible even on one model
    instance: on an H100, two identical runs of 16 prompts x 64 tokens with a 0.5 B bf16 model agreed on 8
    of 16 completions; with it on 16 of 16, at 1.7x the generation time (`bench/gpu_check.py`). Exact resume
    and fault recovery of a training run depend on it. Call it before the process's first cuBLAS call (the
    variable is read when cuBLAS creates its handle); an engine actor is a fresh process, so loading the
    model is early enough.
    """
    use_deterministic_cublas()
    torch.use_deterministic_algorithms(True)


def use_deterministic_cublas() -> None:
    """Sets `CUBLAS_WORKSPACE_CONFIG=:4096:8` (unless set) in this process's environment: cuBLAS then
    reduces deterministically in this process and in the processes it starts (vLLM's workers)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


@dataclass(frozen=True)
class Completion:
    """One generated completion: text after the prompt (without EOS), tokens generated (EOS included),
    and whether EOS ended it."""

    text: str
    num_tokens: int
    finished: bool


class HFBackend:
    """Greedy batched generation with a transformers causal LM.

    Args:
        model_dir: a Hugging Face model directory (config, safetensors weights, tokenizer files).
        dtype: "float32", "bfloat16" or "float16".
        device: torch device string ("cpu", "cuda", "cuda:1", ...).

    Raises:
        ValueError: unknown dtype. OSError: the directory lacks model or tokenizer files (from transformers).
    """

    def __init__(self, model_dir: str | Path, dtype: str = "float32", device: str = "cpu") -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.model_dir = Path(model_dir)
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(
            self.model_dir, local_files_only=True, padding_side="left"
        )
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(
            self.model_dir, dtype=DTYPES[dtype], local_files_only=True
        ).to(self.device)
        self.model.eval()
        self.model.requires_grad_(False)

    @torch.no_grad()
    def generate(self, prompts: list[str], max_new_tokens: int, batch_size: int = 16) -> list[Completion]:
        """Greedy completions of `prompts` (in order), at most `max_new_tokens` tokens each.

        Raises:
            ValueError: max_new_tokens < 1 or batch_size < 1.
        """
        if max_new_tokens < 1 or batch_size < 1:
            raise ValueError("max_new_tokens and batch_size must be >= 1")
        eos = self.tokenizer.eos_token_id
        completions: list[Completion] = []
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            encoded = self.tokenizer(batch, return_tensors="pt", padding=True).to(self.device)
            output = self.model.generate(
                **encoded,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=eos,
            )
            for row in output[:, encoded["input_ids"].shape[1] :].tolist():
                finished = eos in row
                tokens = row[: row.index(eos)] if finished else row
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                completions.append(
                    Completion(text=text, num_tokens=len(tokens) + int(finished), finished=finished)
                )
        return completions
