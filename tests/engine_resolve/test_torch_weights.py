"""In-place ES weight operations on real (tiny) transformers models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.tiny_model import make_tiny_model
from engine.torch_weights import TorchWeights, noise_like


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"), seed=0)


def load(model_dir, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, local_files_only=True)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def bit_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].view(-1), b[k].view(-1)) for k in a)


def test_same_seed_same_noise_on_separately_loaded_models(model_dir):
    a, b = TorchWeights(load(model_dir)), TorchWeights(load(model_dir))
    a.perturb(1234, 0.01)
    b.perturb(1234, 0.01)
    assert a.fingerprint() == b.fingerprint()
    c = TorchWeights(load(model_dir))
    c.perturb(1235, 0.01)
    assert c.fingerprint() != a.fingerprint()


def test_same_shaped_parameters_get_different_noise(model_dir):
    model = load(model_dir)
    params = dict(model.named_parameters())
    first, second = "model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"
    assert params[first].shape == params[second].shape
    assert not torch.equal(noise_like(params[first], 9, first), noise_like(params[second], 9, second))
    assert torch.equal(noise_like(params[first], 9, first), noise_like(params[first], 9, first))


@pytest.mark.parametrize("restore_mode", ["master", "device"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_perturb_then_restore_is_bit_identical(model_dir, dtype, restore_mode):
    model = load(model_dir, dtype)
    weights, base = TorchWeights(model, restore_mode=restore_mode), snapshot(model)
    for seed in range(5):
        weights.perturb(seed, 0.001, sign=-1 if seed % 2 else 1)
        assert not bit_equal(snapshot(model), base)
        weights.restore()
        assert bit_equal(snapshot(model), base)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_one_pass_cpu_kernel_equals_the_noise_tensor_path(model_dir, dtype):
    # vLLM workers perturb through noise tensors (TorchWeights(noise=...)); the transformers backend
    # through the in-place kernel. Both must give bit-identical weights: perturb, subtract, update.
    def noise(name, p, seed):
        return noise_like(p, seed, name)

    fused = TorchWeights(load(model_dir, dtype), restore_mode="subtract")
    tensors = TorchWeights(load(model_dir, dtype), restore_mode="subtract", noise=noise)
    # With noise_slices, half of the parameters take the one-pass kernel again (as vLLM's do).
    slices = {n: [(n, 0, p.numel())] for n, p in sorted(fused.params.items())[::2]}
    mixed = TorchWeights(load(model_dir, dtype), restore_mode="subtract", noise=noise, noise_slices=slices)
    every = (fused, tensors, mixed)
    for weights in every:
        weights.perturb(11, 0.01)
    assert len({w.fingerprint() for w in every}) == 1
    for weights in every:
        weights.restore()
        weights.apply_update([(1, 2e-3), (2, -1e-3), (3, 5e-4)])
    assert len({w.fingerprint() for w in every}) == 1


def test_subtract_restore_drifts_in_bf16_and_the_drift_is_measured(model_dir):
    model = load(model_dir, torch.bfloat16)
    weights, base = TorchWeights(model, restore_mode="subtract"), snapshot(model)
    for seed in range(10):
        weights.perturb(seed, 0.001)
        weights.restore()
    drift = max((p.float() - base[n].float()).abs().max().item() for n, p in model.named_parameters())
    changed = sum(int((p != base[n]).sum()) for n, p in model.named_parameters())
    total = sum(p.numel() for p in model.parameters())
    print(
        f"subtract-restore drift after 10 cycles in bf16: max |delta| = {drift:.3g}, "
        f"{changed}/{total} changed"
    )
    assert drift > 0 and changed > 0


def test_apply_update_equals_the_papers_update_in_numpy(model_dir):
    model = load(model_dir)
    weights, base = TorchWeights(model), snapshot(model)
    pairs = [(11, 2.5e-4), (12, -1.0e-4), (13, 7.0e-5)]
    weights.apply_update(pairs)
    for name, p in model.named_parameters():
        expected = base[name].double().numpy().copy()
        for seed, coefficient in pairs:
            expected += coefficient * noise_like(p, seed, name).double().numpy()
        np.testing.assert_allclose(p.detach().double().numpy(), expected, rtol=0, atol=1e-6)
        np.testing.assert_allclose(weights.master[name].double().numpy(), expected, rtol=0, atol=1e-6)


def test_small_updates_accumulate_in_the_fp32_master_not_bf16(model_dir):
    model = load(model_dir, torch.bfloat16)
    weights = TorchWeights(model)
    name = "model.layers.0.mlp.up_proj.weight"
    before = weights.master[name].clone()
    for _ in range(20):
        weights.apply_update([(5, 1e-5)])
    moved = (weights.master[name] - before).abs().max().item()
    assert moved == pytest.approx(
        20 * 1e-5 * noise_like(dict(model.named_parameters())[name], 5, name).abs().max().item(), rel=1e-3
    )


def test_engines_with_the_same_updates_agree_and_a_diverged_one_is_detected(model_dir):
    a, b = TorchWeights(load(model_dir)), TorchWeights(load(model_dir))
    for step in range(3):
        pairs = [(100 + step, 1e-3), (200 + step, -5e-4)]
        a.perturb(7, 0.01)
        a.restore()
        assert a.apply_update(pairs) is None and b.apply_update(pairs) is None
    assert a.fingerprint() == b.fingerprint()
    with torch.no_grad():
        param = next(iter(b.params.values()))
        param.view(-1)[0] = torch.nextafter(param.view(-1)[0], torch.tensor(float("inf")))
    assert a.fingerprint() != b.fingerprint()


def test_device_copy_restore_follows_updates_exactly_as_the_master(model_dir):
    """restore_mode "device" keeps its copy in step with every update and master load: through perturb,
    restore and updates in bf16 it stays bit-identical to the default mode."""
    master = TorchWeights(load(model_dir, torch.bfloat16))
    device = TorchWeights(load(model_dir, torch.bfloat16), restore_mode="device")
    for step in range(3):
        for weights in (master, device):
            weights.perturb(40 + step, 0.01)
            weights.restore()
            weights.apply_update([(60 + step, 2e-3), (70 + step, -1e-3)])
        assert master.fingerprint() == device.fingerprint()
    device.load_master({name: torch.zeros_like(t) for name, t in device.master.items()})
    device.perturb(1, 0.01)
    device.restore()
    assert all(torch.count_nonzero(p) == 0 for p in device.params.values())


def test_misuse_is_refused(model_dir):
    weights = TorchWeights(load(model_dir))
    weights.perturb(1, 0.1)
    with pytest.raises(RuntimeError, match="already perturbed"):
        weights.perturb(2, 0.1)
    with pytest.raises(RuntimeError, match="restore"):
        weights.apply_update([(1, 0.1)])
    with pytest.raises(ValueError, match="restore_mode"):
        TorchWeights(load(model_dir), restore_mode="undo")
