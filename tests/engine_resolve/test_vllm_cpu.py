"""engine.vllm_cpu's setup check on torch modules shaped like vLLM's CPU linear layers (the real CPU
backend runs in tests/test_vllm_cpu_engine.py)."""

from __future__ import annotations

import pytest
import torch

from engine.vllm_cpu import PackedWeightsError, check_linear_reads_weights


def model_with(**layers: torch.nn.Module) -> torch.nn.Module:
    model = torch.nn.Module()
    for name, layer in layers.items():
        model.add_module(name, layer)
    return model


def linear(cpu_linear=None, mode: str | None = None, removed: bool = False) -> torch.nn.Module:
    """A linear layer as vLLM's CPU dispatch leaves it: `cpu_linear` set, the weight possibly removed."""
    layer = torch.nn.Linear(3, 4)
    if removed:
        layer.weight = torch.nn.Parameter(torch.empty(0), requires_grad=False)
    layer.cpu_linear = cpu_linear if cpu_linear is not None else torch.nn.functional.linear
    if mode:
        layer._es_cpu_linear = mode
    return layer


def test_layers_that_read_their_weights_pass():
    model = model_with(q=linear(), o=linear(lambda x, w, b: x, mode="repack"), plain=torch.nn.Linear(2, 2))
    assert check_linear_reads_weights(model) == 2


def test_a_packed_copy_is_refused_by_name():
    packed = linear(lambda x, w, b: x)  # what vLLM's oneDNN path installs: the weight is not read
    with pytest.raises(PackedWeightsError, match=r"^down_proj: computes from a packed copy"):
        check_linear_reads_weights(model_with(q=linear(), down_proj=packed))


def test_a_removed_weight_is_refused_by_name():
    with pytest.raises(PackedWeightsError, match=r"^qkv_proj: its weight was removed after loading"):
        check_linear_reads_weights(model_with(qkv_proj=linear(lambda x, w, b: x, removed=True)))
