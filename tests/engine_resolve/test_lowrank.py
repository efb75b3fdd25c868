"""Low-rank ES members (`--perturbation lowrank`, `engine.lowrank`) on a real (tiny) transformers model:
the noise is E = B A^T / sqrt(r) from the seed, on the attention and MLP matrices only; perturb and
restore are exact; antithetic members negate; updates are full rank and bit-identical whatever the
thread count."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.lowrank import LowRankWeights, add_lowrank, factors, is_target
from engine.tiny_model import make_tiny_model
from shared.protocol import LOWRANK_TARGETS

RANK = 2


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"), seed=0)


def weights(model_dir, rank: int = RANK, **kwargs) -> LowRankWeights:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    return LowRankWeights(model, rank=rank, **kwargs)


def noise(name: str, shape: tuple[int, int], seed: int, rank: int = RANK) -> torch.Tensor:
    """E_seed of one matrix, float32, as `add_lowrank` adds it."""
    e = torch.zeros(shape, dtype=torch.float32)
    add_lowrank(e, name, [(seed, 1.0)], rank)
    return e


def test_the_targets_are_the_attention_and_mlp_matrices(model_dir):
    w = weights(model_dir)
    assert w.targets and all(name.split(".")[-2] in LOWRANK_TARGETS for name in w.targets)
    frozen = [name for name in w.params if name not in w.targets]
    assert any("embed_tokens" in n for n in frozen) and any("norm" in n for n in frozen)
    assert not is_target("model.layers.0.self_attn.q_proj.bias", (8,))


def test_the_noise_is_b_a_transposed_over_sqrt_rank_from_the_seed(model_dir):
    name, p = next((n, p) for n, p in weights(model_dir).params.items() if n.endswith("q_proj.weight"))
    shape = tuple(p.shape)
    a, b = factors(7, name, shape, RANK)
    assert a.shape == (RANK, shape[1]) and b.shape == (RANK, shape[0])
    e = noise(name, shape, 7)
    expected = (b.double().T @ a.double()) / math.sqrt(RANK)
    assert torch.allclose(e.double(), expected, atol=1e-5)
    assert torch.linalg.matrix_rank(e.double(), rtol=1e-4).item() == RANK  # to float32 rounding
    assert torch.equal(e, noise(name, shape, 7))  # the same seed, the same bits
    assert not torch.equal(e, noise(name, shape, 8))
    other = next(n for n in weights(model_dir).targets if n.endswith("k_proj.weight"))
    assert not torch.equal(factors(7, other, shape, RANK)[0], a)  # keyed by the parameter too
    # Unit-variance entries at any rank (sigma keeps its meaning): 128 x 128 entries, std within 5%.
    assert abs(noise(name, shape, 9, rank=16).std().item() - 1.0) < 0.05


def test_perturb_restore_is_exact_and_touches_only_the_targets(model_dir):
    w = weights(model_dir)
    before = {n: p.detach().clone() for n, p in w.params.items()}
    fingerprint = w.fingerprint()
    w.perturb(11, 0.01)
    moved = [n for n, p in w.params.items() if not torch.equal(p, before[n])]
    assert sorted(moved) == sorted(w.targets)
    name = w.targets[0]
    delta = w.params[name].detach() - before[name]
    assert torch.allclose(delta, 0.01 * noise(name, tuple(delta.shape), 11), atol=1e-6)
    w.restore()
    assert w.fingerprint() == fingerprint
    w.perturb(11, 0.01, sign=-1)  # antithetic: the same factors, the opposite sign
    assert torch.allclose(w.params[name].detach() - before[name], -delta, atol=1e-6)
    w.restore()
    assert w.fingerprint() == fingerprint


def test_an_update_is_full_rank_and_bit_identical_on_any_thread_count(model_dir):
    pairs = [(1, 0.002), (2, -0.001), (3, 0.0005)]
    w = weights(model_dir)
    base = {n: m.clone() for n, m in w.master.items()}
    w.apply_update(pairs)
    name = w.targets[0]
    shape = tuple(base[name].shape)
    update = w.master[name].double() - base[name].double()
    expected = sum(c * noise(name, shape, s).double() for s, c in pairs)
    assert torch.allclose(update, expected, atol=1e-8)
    direct = torch.zeros(shape, dtype=torch.float32)
    add_lowrank(direct, name, pairs, RANK)
    assert torch.linalg.matrix_rank(direct.double(), rtol=1e-4).item() == len(pairs) * RANK  # N * r, not r
    assert all(torch.equal(w.master[n], base[n]) for n in w.master if n not in w.targets)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = weights(model_dir)
        single.apply_update(pairs)
    finally:
        torch.set_num_threads(threads)
    assert single.fingerprint() == w.fingerprint()


def test_subtract_restores_are_refused(model_dir):
    with pytest.raises(ValueError, match="restore_mode subtract"):
        weights(model_dir, restore_mode="subtract")
