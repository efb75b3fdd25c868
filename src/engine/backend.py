"""The one interface of the rollout backends (it imports none of them).

A backend owns one model: it generates greedily and runs the ES weight operations on the same weights in
place. `engine.hf_backend.TransformersBackend` (transformers + torch, CPU or CUDA) and
`engine.vllm_backend.VLLMBackend` (vLLM on GPUs, TPUs or CPUs) implement it; `engine.actor.EngineActor`
chooses one for a `LoadRequest` (`engine.actor.open_backend`) and uses nothing else, so it never asks which
backend it holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from shared.protocol import CheckpointResult
from shared.run_layout import CheckpointFiles


@dataclass(frozen=True)
class Completion:
    """One generated completion: text after the prompt (without EOS), tokens generated (EOS included),
    and whether EOS ended it."""

    text: str
    num_tokens: int
    finished: bool


class Backend(Protocol):
    """A model with greedy generation and in-place ES weight operations.

    Attributes:
        parameters: number of ES parameters (elements; summed over tensor-parallel ranks).
    """

    parameters: int

    def generate(self, prompts: list[str], max_new_tokens: int, batch_size: int = 16) -> list[Completion]:
        """Greedy completions of `prompts`, in order, at most `max_new_tokens` tokens each."""

    def chat_prompts(self, prompts: list[str]) -> list[str]:
        """Each prompt as one user message in the model's chat template, ending with the generation
        prompt (`chat_prompt`). Raises ValueError when the tokenizer has no chat template."""

    def perturb(self, seed: int, sigma: float, sign: int = 1) -> None:
        """theta <- theta + sign * sigma * eps(seed), in place (Qiu et al. 2025, Alg. 1)."""

    def restore(self) -> None:
        """Undoes `perturb` (exactly, in the restore modes that say so)."""

    def update(self, pairs: list[tuple[int, float]]) -> None:
        """theta += sum coefficient * eps(seed) over (seed, coefficient) pairs (Qiu et al. 2025, Alg. 1)."""

    def apply_update(self, pairs: list[tuple[int, float]]) -> str:
        """`update(pairs)`, then returns `fingerprint()`."""

    def fingerprint(self) -> str:
        """SHA-256 (hex) of the weights: equal on two engines exactly when they are bit-identical."""

    def master(self) -> dict[str, Any]:
        """The fp32 master weights, name -> float32 CPU tensor."""

    def load_master(self, tensors: dict[str, Any]) -> str:
        """Replaces the weights by `master()` output of an engine of the same model; returns
        `fingerprint()`. Raises ValueError when names or shapes differ."""

    def save_checkpoint(self, files: CheckpointFiles) -> CheckpointResult:
        """Writes `files.model` (a Hugging Face directory) atomically and, where the model cannot hold the
        exact weights, `files.master`."""

    def close(self) -> None:
        """Frees the backend's processes and memory now; it is unusable afterwards."""


def chat_prompt(tokenizer: Any, prompt: str) -> str:
    """`prompt` as one user message in `tokenizer`'s chat template (transformers'
    `apply_chat_template`, with the generation prompt), as text.

    Raises:
        ValueError: the tokenizer has no chat template (e.g. the tiny test model; run with
            --no-chat-template).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the model's tokenizer has no chat template; run with --no-chat-template")
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
