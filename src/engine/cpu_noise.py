"""ES noise on CPUs (noise version 2): Philox4x32-10 and Box-Muller, fused into in-place weight updates.

The noise of one parameter for one member is a function of a 63-bit key `K` (`shared.seeds.noise_seed(
member seed, parameter name)`) and each element's row-major index `i`, nothing else:

    b, l = divmod(i, 4)
    (w0, w1, w2, w3) = Philox4x32-10(counter=(b mod 2**32, b >> 32, 0, 0), key=(K mod 2**32, K >> 32))
    lanes 0, 1 come from the pair (w0, w1), lanes 2, 3 from (w2, w3), by Box-Muller in float32:
        u     = float32(w_first) * 2**-32 + 2**-33            (in (0, 1]; |z| <= 6.8)
        r     = sqrt(-2 * log(u))
        theta = 2 * pi * w_second / 2**32: quadrant q and offset a in [-pi/4, pi/4) split off exactly in
                integers, then cos(a), sin(a) by polynomials and a rotation by q quarter turns
        (lane 2j, lane 2j+1) = (r * cos(theta), r * sin(theta))

Philox4x32-10 is the counter-based generator of Salmon et al. 2011 ("Parallel random numbers: as easy as
1, 2, 3", SC'11; the constants and round function of their Random123 library, checked against its
known-answer vectors in the tests); Box-Muller is Box & Muller 1958. `log`, `sin` and `cos` are Cephes'
single-precision minimax polynomials (S. Moshier, Cephes Math Library: logf.c, sinf.c, cosf.c) evaluated
with IEEE-754 float32 additions, multiplications and a square root only: every step is correctly rounded
and nothing is left to a math library or to the compiler (no fast-math, no fused multiply-add), so the
noise does not depend on the instruction set, the thread count or the numba version (measured: code
generated for AVX-512, AVX2 and SSE2, and numba 0.62 and 0.65, give the same bits).

Because every element is a pure function of (K, i), the kernels generate and apply the noise in one pass
over the weights, on every core (numba `prange`; one thread for small tensors), with no noise tensor in
memory: perturbing reads and writes each weight once. At 98 M parameters on 2 cores perturb + restore
costs ~4.5x a plain copy against ~12x for per-parameter `torch.randn` (noise version 1); generating the
normals is what remains (docs/measurements.md, `bench:perturb_throughput`).

All arrays are 1-D and C-contiguous; bfloat16 weights are passed as their uint16 bit patterns and rounded
from float32 to nearest-even, as torch rounds (NaN and infinity are not expected in weights).
"""

from __future__ import annotations

import threading

import numba
import numpy as np
from numba import prange
from numba.extending import overload

# numba's own thread pool, never its OpenMP layer: that one shares the process's OpenMP state with torch's
# kernels and left torch's matmuls on every core in engines given one (measured: two engines on 2 cores, the
# default run's iterations grew from 2 s to 15-40 s). Set before any parallel kernel runs in the process.
numba.config.THREADING_LAYER = "workqueue"

_f32 = np.float32
_u32 = np.uint32
_u64 = np.uint64

# Philox4x32 multipliers and Weyl key increments (Salmon et al. 2011, Table 2; Random123 philox.h).
_M0 = _u64(0xD2511F53)
_M1 = _u64(0xCD9E8D57)
_W0 = _u32(0x9E3779B9)
_W1 = _u32(0xBB67AE85)
_MASK32 = _u64(0xFFFFFFFF)

# Cephes logf.c: log(x) = m + m^2 (m P(m) - 1/2) + e log(2) with m in [sqrt(1/2) - 1, sqrt(2) - 1).
_SQRTHF = _f32(0.707106781186547524)
_L0, _L1, _L2 = _f32(7.0376836292e-2), _f32(-1.1514610310e-1), _f32(1.1676998740e-1)
_L3, _L4, _L5 = _f32(-1.2420140846e-1), _f32(1.4249322787e-1), _f32(-1.6668057665e-1)
_L6, _L7, _L8 = _f32(2.0000714765e-1), _f32(-2.4999993993e-1), _f32(3.3333331174e-1)
_LOG2_LO = _f32(-2.12194440e-4)
_LOG2_HI = _f32(0.693359375)
# Cephes sinf.c / cosf.c on [-pi/4, pi/4].
_S0, _S1, _S2 = _f32(-1.9515295891e-4), _f32(8.3321608736e-3), _f32(-1.6666654611e-1)
_C0, _C1, _C2 = _f32(2.443315711809948e-5), _f32(-1.388731625493765e-3), _f32(4.166664568298827e-2)
_HALF = _f32(0.5)
_ONE = _f32(1.0)
_MINUS_TWO = _f32(-2.0)
_TWO_POW_M32 = _f32(2.0**-32)
_TWO_POW_M33 = _f32(2.0**-33)
_TWO_PI_OVER_2_32 = _f32(2.0 * np.pi / 2.0**32)


@numba.njit(inline="always")
def _round(c0, c1, c2, c3, k0, k1):
    p0 = _M0 * _u64(c0)
    p1 = _M1 * _u64(c2)
    return _u32(p1 >> 32) ^ c1 ^ k0, _u32(p1 & _MASK32), _u32(p0 >> 32) ^ c3 ^ k1, _u32(p0 & _MASK32)


@numba.njit(inline="always")
def _philox4x32_10(c0, c1, c2, c3, k0, k1):
    # Ten rounds, written out: a loop here would be the innermost loop and keep the compiler from
    # vectorizing over counters.
    c0, c1, c2, c3 = _round(c0, c1, c2, c3, k0, k1)
    c0, c1, c2, c3 = _round(c0, c1, c2, c3, _u32(k0 + _W0), _u32(k1 + _W1))
    c0, c1, c2, c3 = _round(c0, c1, c2, c3, _u32(k0 + _u32(2) * _W0), _u32(k1 + _u32(2) * _W1))
    c0, c1, c2, c3 = _round(c0, c1, c2, c3, _u32(k0 + _u32(3) * _W0), _u32(k1 + _u32(3) * _W1))
    c0, c1, c2, c3 = _round(c0, c1, c2, c3, _u32(k0 + _u32(4) * _W0), _u32(k1 + _u32(4) * _W1))
    c0, c1, c2, c3 = _round(c0, c1, c2, c3, _u32(k0 + _u32(5) * _W0), _u32(k1 + _u32(5) * _W1))
    c0, c1, c2, c3 = _round(c0, c1, c2, c3, _u32(k0 + _u32(6) * _W0), _u32(k1 + _u32(6) * _W1))
    c0, c1, c2, c3 = _round(c0, c1, c2, c3, _u32(k0 + _u32(7) * _W0), _u32(k1 + _u32(7) * _W1))
    c0, c1, c2, c3 = _round(c0, c1, c2, c3, _u32(k0 + _u32(8) * _W0), _u32(k1 + _u32(8) * _W1))
    return _round(c0, c1, c2, c3, _u32(k0 + _u32(9) * _W0), _u32(k1 + _u32(9) * _W1))


@numba.njit(inline="always")
def _philox(b: int, k0: np.uint32, k1: np.uint32):
    return _philox4x32_10(_u32(b & 0xFFFFFFFF), _u32(b >> 32), _u32(0), _u32(0), k0, k1)


@numba.njit(inline="always")
def _minus_two_log(u: np.float32) -> np.float32:
    bits = np.float32(u).view(np.uint32)
    e = _f32(np.int32(bits >> 23) - 126)
    m = _u32((bits & _u32(0x007FFFFF)) | _u32(0x3F000000)).view(np.float32)  # frexp: m in [0.5, 1)
    small = m < _SQRTHF
    e = e - _ONE if small else e
    x = (m + m - _ONE) if small else (m - _ONE)
    z = x * x
    y = _L0
    y = y * x + _L1
    y = y * x + _L2
    y = y * x + _L3
    y = y * x + _L4
    y = y * x + _L5
    y = y * x + _L6
    y = y * x + _L7
    y = y * x + _L8
    y = y * x * z
    y = y + _LOG2_LO * e
    y = y - _HALF * z
    return _MINUS_TWO * ((x + y) + _LOG2_HI * e)


@numba.njit(inline="always")
def _box_muller(w_radius: np.uint32, w_angle: np.uint32):
    u = _f32(w_radius) * _TWO_POW_M32 + _TWO_POW_M33
    r = np.sqrt(_minus_two_log(u))
    v = _u32(w_angle + _u32(0x20000000))
    q = v >> 30
    a = _f32(np.int32(v & _u32(0x3FFFFFFF)) - np.int32(0x20000000)) * _TWO_PI_OVER_2_32
    z = a * a
    s = ((_S0 * z + _S1) * z + _S2) * z * a + a
    c = ((_C0 * z + _C1) * z + _C2) * z * z - _HALF * z + _ONE
    # Rotate (cos a, sin a) by q quarter turns.
    cos_t = c if q == 0 else (-s if q == 1 else (-c if q == 2 else s))
    sin_t = s if q == 0 else (c if q == 1 else (-s if q == 2 else -c))
    return r * cos_t, r * sin_t


@numba.njit(inline="always")
def _f32_to_bf16(x: np.float32) -> np.uint16:
    # Round to nearest even, as torch converts float32 to bfloat16 (finite values).
    bits = np.float32(x).view(np.uint32)
    return np.uint16((bits + _u32(0x7FFF) + ((bits >> 16) & _u32(1))) >> 16)


@numba.njit(inline="always")
def _bf16_to_f32(h: np.uint16) -> np.float32:
    return _u32(_u32(h) << 16).view(np.float32)


# Philox blocks per chunk: 1024 elements, whose words and normals (8 KB) stay in the L1 cache.
_BLOCKS = 256


@numba.njit(inline="always")
def _chunk(b0, nb, k0, k1, words, normals):
    """The normals of blocks b0 .. b0 + nb - 1: normals[l, j] is element 4 (b0 + j) + l. Three simple loops
    (counters, then each Box-Muller pair) that the compiler vectorizes; one loop doing all of it is not."""
    for j in range(nb):
        w0, w1, w2, w3 = _philox(b0 + j, k0, k1)
        words[0, j] = w0
        words[1, j] = w1
        words[2, j] = w2
        words[3, j] = w3
    for j in range(nb):
        z0, z1 = _box_muller(words[0, j], words[1, j])
        normals[0, j] = z0
        normals[1, j] = z1
    for j in range(nb):
        z2, z3 = _box_muller(words[2, j], words[3, j])
        normals[2, j] = z2
        normals[3, j] = z3


def _add_scaled(x, i, z, scale):
    """x[i] <- x[i] + z * scale (the product rounded first), in float32 or in bfloat16 bits."""


@overload(_add_scaled, inline="always")
def _add_scaled_impl(x, i, z, scale):
    if x.dtype == numba.types.float32:

        def impl(x, i, z, scale):
            x[i] = z * scale + x[i]

    else:

        def impl(x, i, z, scale):
            x[i] = _f32_to_bf16(z * scale + _bf16_to_f32(x[i]))

    return impl


@numba.njit(inline="always")
def _add_task(x, keys, scales, task, ntasks):
    """x <- x + scales[k] * noise(keys[k]) for k = 0, 1, ... in turn, on the chunks of task `task` of
    `ntasks`: a chunk of x stays in the L1 cache through every term, so x is read and written once."""
    n = x.size
    nblocks = (n + 3) // 4
    nchunks = (nblocks + _BLOCKS - 1) // _BLOCKS
    words = np.empty((4, _BLOCKS), np.uint32)
    normals = np.empty((4, _BLOCKS), np.float32)
    for c in range(task * nchunks // ntasks, (task + 1) * nchunks // ntasks):
        b0 = c * _BLOCKS
        nb = min(_BLOCKS, nblocks - b0)
        base = 4 * b0
        for k in range(keys.shape[0]):
            scale = scales[k]
            _chunk(b0, nb, keys[k, 0], keys[k, 1], words, normals)
            if base + 4 * nb <= n:
                for j in range(nb):
                    i = base + 4 * j
                    _add_scaled(x, i, normals[0, j], scale)
                    _add_scaled(x, i + 1, normals[1, j], scale)
                    _add_scaled(x, i + 2, normals[2, j], scale)
                    _add_scaled(x, i + 3, normals[3, j], scale)
            else:  # the last block is partial
                for o in range(n - base):
                    _add_scaled(x, base + o, normals[o % 4, o // 4], scale)


@numba.njit(parallel=True, nogil=True, cache=True)
def _add_parallel(x, keys, scales, ntasks):
    for task in prange(ntasks):
        _add_task(x, keys, scales, task, ntasks)


@numba.njit(nogil=True, cache=True)
def _add_serial(x, keys, scales):
    _add_task(x, keys, scales, 0, 1)


# Elements x terms below which one thread does the work: starting numba's threads costs ~75 us, as much
# as ~80 k elements of noise on one core (a small model's parameters are mostly smaller).
_PARALLEL_MIN = 1 << 17


@numba.njit(nogil=True, cache=True)
def philox4x32(counter, key):
    """Philox4x32-10 of one 128-bit counter: `counter` 4 uint32 words, `key` 2 uint32 words (numpy
    arrays) -> 4 uint32 words (Salmon et al. 2011; for known-answer tests)."""
    c0, c1, c2, c3 = _philox4x32_10(counter[0], counter[1], counter[2], counter[3], key[0], key[1])
    return np.array([c0, c1, c2, c3], dtype=np.uint32)


# The workqueue layer aborts the process when two threads launch parallel kernels at once; engines call
# these from one thread today, and this keeps it so (the serial kernel needs no lock).
_LOCK = threading.Lock()


def _run(flat: np.ndarray, keys: list[int], scales: list[float], threads: int | None) -> None:
    # Per call (perturbing a small model is hundreds of calls), so no more Python than needed.
    if len(keys) != len(scales):
        raise ValueError(f"{len(keys)} noise keys but {len(scales)} scales")
    try:
        key_array = np.array(keys, dtype=np.uint64)
    except OverflowError:
        raise ValueError(f"noise keys must be unsigned 64-bit ints, got {keys}") from None
    # (low, high) 32-bit words of each key: a little-endian uint64 viewed as two uint32.
    key_words = key_array.astype("<u8", copy=False).view("<u4").reshape(len(keys), 2)
    scale_array = np.array(scales, dtype=np.float32)
    if threads == 1 or flat.size * len(keys) < _PARALLEL_MIN:
        _add_serial(flat, key_words, scale_array)
        return
    with _LOCK:
        if threads is not None and threads != numba.get_num_threads():
            numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
        # A few tasks per thread, for balance.
        _add_parallel(
            flat, key_words, scale_array, min(max(1, flat.size // 1024), 4 * numba.get_num_threads())
        )


def _flat(array: np.ndarray, dtypes: tuple[type, ...]) -> np.ndarray:
    if array.dtype not in dtypes or not array.flags.c_contiguous:
        raise ValueError(f"expected a C-contiguous array of {dtypes}, got {array.dtype}, {array.flags}")
    return array.reshape(-1)


def warm_up() -> None:
    """Compiles the kernels for float32 and bfloat16 now (a few seconds each the first time on a machine,
    then loaded from numba's cache), so that the first perturbation is not the one that pays for it."""
    for dtype in (np.float32, np.uint16):
        _run(np.zeros(5, dtype), [0], [0.0], 1)  # serial
        _run(np.zeros(_PARALLEL_MIN, dtype), [0], [0.0], None)  # parallel


def fill_normal(out: np.ndarray, key: int, threads: int | None = None) -> None:
    """Writes the noise of `key` into `out` (float32, C-contiguous, any shape; element i of its row-major
    order gets noise element i), on `threads` threads (default: numba's).

    Raises:
        ValueError: `out` is not a C-contiguous float32 array, or `key` is not in [0, 2**64).
    """
    flat = _flat(out, (np.float32,))
    flat.fill(-0.0)  # z * 1 + (-0.0) == z for every z, signed zeros included
    _run(flat, [key], [1.0], threads)


def add_normal(x: np.ndarray, key: int, scale: float, threads: int | None = None) -> None:
    """x <- round(x + scale * noise(key)) in place, element by element in float32: for float32 `x` one
    rounding of the sum; for bfloat16 weights (`x` their uint16 bits) the sum then rounded to bfloat16.
    `scale` is rounded to float32 first, and the product is rounded before the sum, exactly as
    `x.copy_(noise.mul_(scale).add_(x))` does in torch. Runs on `threads` threads (default: numba's).

    Raises:
        ValueError: `x` is not a C-contiguous float32 or uint16 array, or `key` is not in [0, 2**64).
    """
    add_normals(x, [key], [scale], threads)


def add_normals(x: np.ndarray, keys: list[int], scales: list[float], threads: int | None = None) -> None:
    """`add_normal(x, keys[k], scales[k])` for k = 0, 1, ... in turn (the same roundings, the same result),
    in one pass over `x`: an ES update, sum_k c_k * eps_k, costs one read and write of `x` whatever N.

    Raises:
        ValueError: as `add_normal`, or `keys` and `scales` differ in length.
    """
    _run(_flat(x, (np.float32, np.uint16)), keys, scales, threads)
