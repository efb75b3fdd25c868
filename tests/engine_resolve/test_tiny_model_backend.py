"""The tiny-model maker writes a Hugging Face directory that transformers loads offline, and the CPU
backend generates from it greedily, identically batched or not."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.hf_backend import HFGenerator
from engine.tiny_model import TAGS, make_tiny_model
from shared.countdown import make_prompt


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"), seed=3)


def test_directory_loads_offline_with_auto_classes(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    assert model.config.model_type == "qwen2"
    assert model.config.hidden_size // model.config.num_attention_heads >= 64
    assert (model_dir / "model.safetensors").exists()
    for tag in TAGS:  # each tag is one token and survives decoding
        ids = tokenizer(tag, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tokenizer.decode(ids, skip_special_tokens=True) == tag


def test_same_seed_same_weights(tmp_path, model_dir):
    again = make_tiny_model(tmp_path / "again", seed=3)
    assert (again / "model.safetensors").read_bytes() == (model_dir / "model.safetensors").read_bytes()


def test_batched_greedy_generation_equals_one_by_one(model_dir):
    backend = HFGenerator(model_dir)
    prompts = [make_prompt([1, 2, 3], 6), make_prompt([44, 19, 35, 2], 98), "short"]
    batched = backend.generate(prompts, max_new_tokens=12, batch_size=3)
    single = [backend.generate([p], max_new_tokens=12)[0] for p in prompts]
    assert batched == single
    assert all(0 < c.num_tokens <= 12 for c in batched)
