"""The CPU noise kernel (engine.cpu_noise): the generator against its published known answers, the
Gaussian transform against a float64 evaluation of its definition, the distribution, and the in-place
update against the same arithmetic in torch."""

from __future__ import annotations

import math

import numba
import numpy as np
import pytest
import torch

from engine import cpu_noise

# Random123's known-answer vectors for Philox4x32-10 (kat_vectors: counter, key -> output).
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize(("counter", "key", "expected"), PHILOX_KAT)
def test_philox_matches_the_published_known_answers(counter, key, expected):
    got = cpu_noise.philox4x32(np.array(counter, dtype=np.uint32), np.array(key, dtype=np.uint32))
    assert tuple(int(w) for w in got) == expected


def reference(key: int, indices: list[int]) -> np.ndarray:
    """The module docstring's definition, evaluated in float64 with the math library."""
    out = []
    for i in indices:
        b, lane = divmod(i, 4)
        counter = np.array([b & 0xFFFFFFFF, b >> 32, 0, 0], dtype=np.uint32)
        words = cpu_noise.philox4x32(counter, np.array([key & 0xFFFFFFFF, key >> 32], dtype=np.uint32))
        w_radius, w_angle = int(words[2 * (lane // 2)]), int(words[2 * (lane // 2) + 1])
        u = float(np.float32(w_radius)) * 2.0**-32 + 2.0**-33
        r, theta = math.sqrt(-2.0 * math.log(u)), 2.0 * math.pi * w_angle / 2.0**32
        out.append(r * (math.cos(theta) if lane % 2 == 0 else math.sin(theta)))
    return np.array(out)


def test_each_element_follows_the_definition_to_float32_accuracy():
    key, n = 0x5DEECE66D12345, 4099
    noise = np.empty(n, dtype=np.float32)
    cpu_noise.fill_normal(noise, key)
    indices = list(range(0, 40)) + list(range(n - 7, n))
    expected = reference(key, indices)
    # Polynomial log, sin and cos in float32: a few float32 ulps of the float64 value.
    np.testing.assert_allclose(noise[indices], expected, rtol=2e-6, atol=2e-6)


def test_element_i_depends_only_on_the_key_and_i():
    key = 77
    long, short = np.empty(300_007, np.float32), np.empty(13, np.float32)
    cpu_noise.fill_normal(long, key)
    cpu_noise.fill_normal(short, key)
    assert np.array_equal(short, long[:13])  # a partial last block is the prefix of a longer one
    one, two = np.empty(300_007, np.float32), np.empty(300_007, np.float32)
    cpu_noise.fill_normal(one, key, threads=1)  # the serial kernel
    cpu_noise.fill_normal(two, key, threads=2)  # the parallel one (large enough)
    assert np.array_equal(one, long) and np.array_equal(two, long)
    other = np.empty(300_007, np.float32)
    cpu_noise.fill_normal(other, key + 1)
    assert abs(np.corrcoef(other, long)[0, 1]) < 0.02


def test_the_noise_is_standard_normal_and_uncorrelated_between_neighbours():
    z = np.empty(1_000_000, dtype=np.float64)
    block = np.empty(z.size, dtype=np.float32)
    cpu_noise.fill_normal(block, 2024)
    z[:] = block
    assert abs(z.mean()) < 0.005 and abs(z.std() - 1.0) < 0.005
    assert abs(((z - z.mean()) ** 3).mean()) < 0.02  # skewness
    assert abs(((z - z.mean()) ** 4).mean() / z.var() ** 2 - 3.0) < 0.03  # kurtosis
    # Every lane of a Philox block and across blocks: lags 1 to 4 and 8.
    for lag in (1, 2, 3, 4, 8):
        assert abs(np.corrcoef(z[:-lag], z[lag:])[0, 1]) < 0.005, lag
    # Bucket counts against the normal CDF (chi-square, 11 degrees of freedom; 0.1% quantile 31.3).
    edges = np.array([-np.inf, -2.5, -2, -1.5, -1, -0.5, 0, 0.5, 1, 1.5, 2, 2.5, np.inf])
    cdf = np.array(
        [0.5 * (1 + math.erf(e / math.sqrt(2))) if np.isfinite(e) else float(e > 0) for e in edges]
    )
    expected = np.diff(cdf) * z.size
    counts = np.histogram(z, bins=edges)[0]
    assert ((counts - expected) ** 2 / expected).sum() < 31.3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_place_update_rounds_exactly_as_torch(dtype):
    key, scale = 99, 1e-3
    weights = (torch.randn(10_007, generator=torch.Generator().manual_seed(0)) * 0.05).to(dtype)
    noise = torch.empty(weights.shape, dtype=torch.float32)
    cpu_noise.fill_normal(noise.numpy(), key)
    expected = weights.clone().copy_(noise.clone().mul_(scale).add_(weights))
    bits = weights.view(torch.int16).numpy().view(np.uint16) if dtype == torch.bfloat16 else weights.numpy()
    cpu_noise.add_normal(bits, key, scale)
    assert torch.equal(
        weights.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
        expected.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
    )


def test_a_sum_of_terms_in_one_pass_equals_the_terms_one_by_one():
    keys, scales = [3, 1 << 40, 12345], [1e-3, -2e-3, 5e-4]
    one_by_one = np.linspace(-1, 1, 10_003, dtype=np.float32)
    one_pass = one_by_one.copy()
    for key, scale in zip(keys, scales, strict=True):
        cpu_noise.add_normal(one_by_one, key, scale)
    cpu_noise.add_normals(one_pass, keys, scales)
    assert np.array_equal(one_pass, one_by_one)
    with pytest.raises(ValueError, match="3 noise keys but 2 scales"):
        cpu_noise.add_normals(one_pass, keys, scales[:2])


def test_kernels_run_on_numbas_own_threads_and_leave_torchs_alone():
    threads = torch.get_num_threads()
    cpu_noise.add_normal(np.zeros(1 << 18, np.float32), 5, 0.1, threads=2)  # parallel
    # Not OpenMP, whose state torch's kernels share (engines with one CPU ran matmuls on every core).
    assert numba.threading_layer() == "workqueue"
    assert torch.get_num_threads() == threads


def test_bad_arrays_and_keys_are_refused():
    with pytest.raises(ValueError, match="C-contiguous"):
        cpu_noise.fill_normal(np.empty(8, np.float64), 1)
    with pytest.raises(ValueError, match="C-contiguous"):
        cpu_noise.add_normal(np.empty((4, 4), np.float32)[:, ::2], 1, 0.1)
    with pytest.raises(ValueError, match="64-bit"):
        cpu_noise.fill_normal(np.empty(8, np.float32), -1)
    with pytest.raises(ValueError, match="64-bit"):
        cpu_noise.add_normal(np.empty(8, np.float32), 2**64, 0.1)
