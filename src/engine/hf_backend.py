"""The transformers backend: Hugging Face transformers + torch (CPU or CUDA), batched greedy generation.

`HFGenerator` loads a model directory (safetensors) offline, generates greedily (the paper decodes greedily)
with left padding and `max_new_tokens`, and returns each completion cut at its first EOS, decoded without
special tokens (as vLLM returns text). `TransformersBackend` adds the ES weight operations of
`engine.torch_weights` on the same torch model: the `engine.backend.Backend` the engine actor uses.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.backend import Completion, chat_prompt
from engine.torch_weights import TorchWeights
from shared.protocol import CheckpointResult, LoadRequest
from shared.run_layout import CheckpointFiles, atomic_dir

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of `TORCH_DTYPES` named `name` ("float32", "bfloat16" or "float16").

    Raises:
        ValueError: an unknown name.
    """
    if name not in TORCH_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(TORCH_DTYPES)}, got {name!r}")
    return TORCH_DTYPES[name]


def use_deterministic_kernels() -> None:
    """Makes this process's torch kernels deterministic: the same inputs give bit-identical outputs.

    `torch.use_deterministic_algorithms(True)` plus `CUBLAS_WORKSPACE_CONFIG=:4096:8` (PyTorch's
    "Reproducibility" notes). Without it, greedy generation on a GPU is not reproducible even on one model
    instance (docs/measurements.md, `bench/gpu_check.py`). Exact resume and fault recovery of a training
    run depend on it. Call it before the process's first cuBLAS call (the
    variable is read when cuBLAS creates its handle); an engine actor is a fresh process, so loading the
    model is early enough.
    """
    use_deterministic_cublas()
    torch.use_deterministic_algorithms(True)


def use_deterministic_cublas() -> None:
    """Sets `CUBLAS_WORKSPACE_CONFIG=:4096:8` (unless set) in this process's environment: cuBLAS then
    reduces deterministically in this process and in the processes it starts (vLLM's workers)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


class HFGenerator:
    """Greedy batched generation with a transformers causal LM.

    Args:
        model_dir: a Hugging Face model directory (config, safetensors weights, tokenizer files).
        dtype: "float32", "bfloat16" or "float16".
        device: torch device string ("cpu", "cuda", "cuda:1", ...).

    Raises:
        ValueError: unknown dtype. OSError: the directory lacks model or tokenizer files (from transformers).
    """

    def __init__(self, model_dir: str | Path, dtype: str = "float32", device: str = "cpu") -> None:
        weights_dtype = torch_dtype(dtype)
        self.model_dir = Path(model_dir)
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(
            self.model_dir, local_files_only=True, padding_side="left"
        )
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(
            self.model_dir, dtype=weights_dtype, local_files_only=True
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


class TransformersBackend:
    """The `engine.backend.Backend` of transformers: `HFGenerator` generation and `TorchWeights` ES
    operations on one torch model.

    Args:
        request: model directory, dtype, device, restore mode, fp32 master, determinism and
            perturbation (`shared.protocol.LoadRequest`; its vLLM options are ignored).

    Raises:
        ValueError: unknown dtype, a master that does not match the model, or a low-rank perturbation
            with restore mode subtract. OSError: missing files.
    """

    def __init__(self, request: LoadRequest) -> None:
        if request.deterministic and request.device != "cpu":
            use_deterministic_kernels()
        self.generator = HFGenerator(request.model_dir, dtype=request.dtype, device=request.device)
        perturbation = request.perturbation
        if perturbation.mode == "lowrank":
            from engine.lowrank import LowRankWeights

            self.weights: TorchWeights = LowRankWeights(
                self.generator.model, restore_mode=request.restore_mode, rank=perturbation.rank
            )
        else:
            self.weights = TorchWeights(self.generator.model, restore_mode=request.restore_mode)
        if request.master_path:
            from safetensors.torch import load_file

            self.weights.load_master(load_file(request.master_path))
        self.parameters = sum(p.numel() for p in self.weights.params.values())

    def generate(self, prompts: list[str], max_new_tokens: int, batch_size: int = 16) -> list[Completion]:
        return self.generator.generate(prompts, max_new_tokens, batch_size)

    def chat_prompts(self, prompts: list[str]) -> list[str]:
        return [chat_prompt(self.generator.tokenizer, p) for p in prompts]

    def perturb(self, seed: int, sigma: float, sign: int = 1) -> None:
        self.weights.perturb(seed, sigma, sign)

    def restore(self) -> None:
        self.weights.restore()

    def update(self, pairs: list[tuple[int, float]]) -> None:
        self.weights.apply_update(pairs)

    def apply_update(self, pairs: list[tuple[int, float]]) -> str:
        self.update(pairs)
        return self.fingerprint()

    def fingerprint(self) -> str:
        return self.weights.fingerprint()

    def master(self) -> dict[str, Any]:
        return self.weights.master

    def load_master(self, tensors: dict[str, Any]) -> str:
        self.weights.load_master(tensors)
        return self.weights.fingerprint()

    def save_checkpoint(self, files: CheckpointFiles) -> CheckpointResult:
        """Saves model (safetensors) and tokenizer as `files.model`, atomically; the fp32 master goes to
        `files.master` when the weights are not float32 (so that a resume continues bit-exactly)."""
        from safetensors.torch import save_file

        with atomic_dir(files.model) as tmp:
            self.generator.model.save_pretrained(tmp, safe_serialization=True)
            self.generator.tokenizer.save_pretrained(tmp)
        master = None
        if any(p.dtype != self.weights.master[name].dtype for name, p in self.weights.params.items()):
            master = str(files.master)
            save_file(self.weights.master, master)
        return CheckpointResult(model=str(files.model), master=master, fingerprint=self.weights.fingerprint())

    def close(self) -> None:
        """Nothing to free beyond the model, which garbage collection takes."""
