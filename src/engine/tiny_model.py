"""Makes a tiny Qwen2-architecture causal LM and its tokenizer, saved as a Hugging Face directory.

No network: the byte-level BPE tokenizer is trained here (with the `tokenizers` library) on Countdown
text, and the model's weights are random from a seed. `AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained` load the directory offline. Head dim is 64 so vLLM can load it too.
Used by the tests and as the default model when a run names none.
"""

from __future__ import annotations

import operator
import random
from fractions import Fraction
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from shared.countdown import make_prompt

EOS = "<|endoftext|>"
# The task's tags become single tokens, but ordinary (not special) ones: decoding keeps them.
TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}


def _corpus(seed: int, size: int = 400) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for _ in range(size):
        numbers = [rng.randint(1, 99) for _ in range(rng.choice((3, 4)))]
        ops = [rng.choice("+-*/") for _ in numbers[1:]]
        expression = " ".join(f"{n} {op}" for n, op in zip(numbers, ops, strict=False)) + f" {numbers[-1]}"
        target = rng.randint(10, 100)
        texts.append(
            make_prompt(numbers, target)
            + f" Let me try ({expression}).</think>\n<answer>({expression})</answer>{EOS}"
        )
    return texts


def build_tokenizer(vocab_size: int = 512, seed: int = 0) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on generated Countdown text, with EOS = pad = "<|endoftext|>"."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=EOS, pad_token=EOS, padding_side="left"
    )
    fast.add_tokens(list(TAGS))
    return fast


# Named sizes of `make_tiny_model`'s arguments: the default (0.36 M parameters) and a ~98 M-parameter
# Qwen2 of the same family, which the benchmarks use as the larger model.
SIZES: dict[str, dict[str, int]] = {
    "tiny": {},
    "100M": {
        "hidden_size": 768,
        "num_layers": 16,
        "num_heads": 12,
        "num_kv_heads": 2,
        "intermediate_size": 2048,
    },
}


def make_tiny_model(
    out_dir: str | Path,
    seed: int = 0,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 2,
    num_kv_heads: int = 1,
    intermediate_size: int = 256,
    vocab_size: int = 512,
    warm_start_steps: int = 0,
) -> Path:
    """Creates and saves (safetensors) a random Qwen2ForCausalLM with a local tokenizer; returns out_dir.

    Shapes: head_dim = hidden_size / num_heads (64 by default). Same arguments, same files' tensors.
    `warm_start_steps` > 0 first trains it that many AdamW steps (`warm_start`) on solved Countdown
    problems, so that it answers in the task's format and ES has rewards to work with.

    Raises:
        ValueError: head_dim below 64 or hidden_size not divisible by num_heads.
    """
    if hidden_size % num_heads or hidden_size // num_heads < 64:
        raise ValueError(
            f"head_dim = hidden_size / num_heads must be an integer >= 64, got {hidden_size}/{num_heads}"
        )
    out = Path(out_dir)
    tokenizer = build_tokenizer(vocab_size=vocab_size, seed=seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    if warm_start_steps:
        warm_start(model, tokenizer, warm_start_steps, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def _solved_corpus(seed: int, size: int) -> list[tuple[str, str]]:
    """(prompt, completion) pairs of Countdown problems whose completion is a correct solution: the
    numbers in prompt order joined by random operators, kept when the value is an integer in 10..100."""
    rng = random.Random(f"warm-start/{seed}")
    pairs: list[tuple[str, str]] = []
    while len(pairs) < size:
        numbers = [rng.randint(1, 99) for _ in range(rng.choice((3, 4)))]
        expression = str(numbers[0])
        value = Fraction(numbers[0])
        for n in numbers[1:]:
            op = rng.choice("+-*/")
            expression, value = f"({expression} {op} {n})", _OPS[op](value, Fraction(n))
        if value.denominator == 1 and 10 <= value <= 100:
            completion = f" Let me try {expression}.</think>\n<answer>{expression}</answer>{EOS}"
            pairs.append((make_prompt(numbers, value.numerator), completion))
    return pairs


def warm_start(
    model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerFast, steps: int, seed: int = 0
) -> None:
    """Trains `model` in place for `steps` AdamW steps (lr 3e-3, batch 16) on solved Countdown problems,
    with the loss on completion tokens only. Deterministic for a seed on one machine (CPU, fp32)."""
    pairs = _solved_corpus(seed, 512)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        batch = [pairs[i] for i in torch.randint(len(pairs), (16,), generator=generator).tolist()]
        prompt_lengths = [len(tokenizer(p)["input_ids"]) for p, _ in batch]
        encoded = tokenizer(
            [p + c for p, c in batch], return_tensors="pt", padding=True, padding_side="right"
        )
        labels = encoded["input_ids"].clone()
        labels[encoded["attention_mask"] == 0] = -100
        for row, length in enumerate(prompt_lengths):
            labels[row, :length] = -100
        loss = model(**encoded, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
