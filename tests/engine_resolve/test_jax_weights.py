"""The JAX ES operations agree with their own definition on JAX's CPU backend."""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from engine.jax_weights import JaxWeights, key_data, leaf_names, noise_tree  # noqa: E402


def make_params(dtype=jnp.float32):
    rng = np.random.default_rng(0)
    return {
        "embed": jnp.asarray(rng.normal(size=(32, 16)), dtype=dtype),
        "layers": [
            {"w": jnp.asarray(rng.normal(size=(16, 16)), dtype=dtype), "b": jnp.zeros(16, dtype=dtype)}
            for _ in range(2)
        ],
    }


def host(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def test_noise_is_deterministic_and_differs_across_same_shaped_leaves():
    params = make_params()
    a, b = noise_tree(params, 42), noise_tree(params, 42)
    assert all(np.array_equal(x, y) for x, y in zip(host(a), host(b), strict=True))
    w0, w1 = a["layers"][0]["w"], a["layers"][1]["w"]
    assert not np.array_equal(np.asarray(w0), np.asarray(w1))
    assert not np.array_equal(np.asarray(noise_tree(params, 43)["embed"]), np.asarray(a["embed"]))
    assert key_data(42, leaf_names(params)).shape == (len(jax.tree_util.tree_leaves(params)), 2)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_perturb_matches_definition_and_restore_is_exact(dtype):
    params = make_params(dtype)
    base = host(params)
    weights = JaxWeights(params)
    weights.perturb(7, 0.01, sign=-1)
    noise = host(noise_tree(params, 7))
    for got, b, eps in zip(host(weights.params), base, noise, strict=True):
        want = (b.astype(np.float32) - 0.01 * eps).astype(b.dtype)
        # XLA may fuse the multiply-add (one rounding instead of two): allow that in fp32.
        tolerance = 1e-6 if dtype == jnp.float32 else 0
        np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=0, atol=tolerance)
    weights.restore()
    assert all(np.array_equal(x, y) for x, y in zip(host(weights.params), base, strict=True))


def test_perturbation_is_compiled_once_and_reused():
    weights = JaxWeights(make_params())
    weights.perturb(1, 0.01)
    weights.restore()
    compiled = weights.compilations()
    for seed in range(2, 6):
        weights.perturb(seed, 0.02)
        weights.restore()
    assert weights.compilations() == compiled


def test_apply_update_matches_definition_and_engines_agree():
    params = make_params()
    base = host(params)
    a, b = JaxWeights(params), JaxWeights(make_params())
    pairs = [(3, 1e-3), (4, -2e-4)]
    a.apply_update(pairs)
    b.apply_update(pairs)
    n3, n4 = host(noise_tree(params, 3)), host(noise_tree(params, 4))
    for got, x, e3, e4 in zip(host(a.params), base, n3, n4, strict=True):
        np.testing.assert_allclose(got, x + 1e-3 * e3 - 2e-4 * e4, rtol=0, atol=1e-6)
    assert a.fingerprint() == b.fingerprint()
    b.apply_update([(5, 1e-6)])
    assert a.fingerprint() != b.fingerprint()


def test_subtract_mode_restores_approximately_in_bf16():
    params = make_params(jnp.bfloat16)
    base = host(params)
    weights = JaxWeights(params, restore_mode="subtract")
    for seed in range(5):
        weights.perturb(seed, 0.001)
        weights.restore()
    drift = max(
        np.abs(g.astype(np.float32) - b.astype(np.float32)).max()
        for g, b in zip(host(weights.params), base, strict=True)
    )
    print(f"JAX subtract-restore drift after 5 cycles in bf16: {drift:.3g}")
    assert 0 < drift < 0.05
