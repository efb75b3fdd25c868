"""ES weight operations on a JAX pytree of arrays (for the TPU engine): perturb, restore, update.

The same method as `engine.torch_weights` on a pytree: the noise of leaf p for member seed s is
`jax.random.normal(key, p.shape, float32)` with the threefry2x32 key whose raw data is
`shared.seeds.split_seed_u32(noise_seed(s, keystr(path of p)))`. Threefry is counter-based, so the bits
are the same on every backend; the normal transform is the same on every device of one type.

Perturbation and restore replace each leaf by a same-shape, same-dtype, same-sharding array computed by
one jitted function whose input buffers are donated, so the device holds one set of parameters and
compiled functions are reused: `compilations()` reports the jit cache size, which must not grow after
the first perturbation. The float32 master copy of the base weights and the update accumulation live in
host memory (numpy), as in the torch version.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from shared.protocol import RESTORE_MODES as PROTOCOL_RESTORE_MODES
from shared.seeds import noise_seed, split_seed_u32

# The restore modes of shared.protocol.RESTORE_MODES that JAX weights support ("device" is torch-only).
RESTORE_MODES = tuple(m for m in PROTOCOL_RESTORE_MODES if m != "device")


def leaf_names(tree: Any) -> list[str]:
    """Names of the leaves of `tree` (jax.tree_util.keystr of each path), in flattening order."""
    return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def key_data(member_seed: int, names: list[str]) -> np.ndarray:
    """Raw threefry2x32 key data, uint32 of shape (len(names), 2): one key per leaf for a member seed."""
    return np.array([split_seed_u32(noise_seed(member_seed, name)) for name in names], dtype=np.uint32)


def _noise(raw_key: jax.Array, leaf: jax.Array) -> jax.Array:
    key = jax.random.wrap_key_data(raw_key, impl="threefry2x32")
    return jax.random.normal(key, leaf.shape, dtype=jnp.float32)


@partial(jax.jit, donate_argnums=0)
def _perturb(leaves: list[jax.Array], keys: jax.Array, scale: jax.Array) -> list[jax.Array]:
    return [
        (p.astype(jnp.float32) + scale * _noise(keys[i], p)).astype(p.dtype) for i, p in enumerate(leaves)
    ]


@jax.jit
def _weighted_noise(leaves: list[jax.Array], keys: jax.Array, coefficients: jax.Array) -> list[jax.Array]:
    # keys: (K, L, 2) for K update pairs and L leaves; returns sum_k c_k * eps_k per leaf, float32.
    def one(p, i):
        per_pair = jax.vmap(lambda k: _noise(k, p))(keys[:, i])
        return jnp.tensordot(coefficients, per_pair, axes=1)

    return [one(p, i) for i, p in enumerate(leaves)]


def noise_tree(tree: Any, member_seed: int) -> Any:
    """The member's float32 noise for every leaf of `tree`, as a pytree of the same structure."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jnp.asarray(key_data(member_seed, leaf_names(tree)))
    return treedef.unflatten([_noise(keys[i], p) for i, p in enumerate(leaves)])


class JaxWeights:
    """In-place (by replacement with donated buffers) ES operations on a pytree of JAX arrays.

    Args:
        params: the pytree; `self.params` always holds the current arrays (read it after each call).
        restore_mode: "master" (exact, from the fp32 host master) or "subtract" (the reference's).

    Raises:
        ValueError: unknown restore_mode.
    """

    def __init__(self, params: Any, restore_mode: str = "master") -> None:
        if restore_mode not in RESTORE_MODES:
            raise ValueError(f"restore_mode must be one of {RESTORE_MODES}, got {restore_mode!r}")
        self.restore_mode = restore_mode
        leaves, self._treedef = jax.tree_util.tree_flatten(params)
        # Commit every leaf to its sharding now: restore() produces committed arrays, and a jitted
        # function compiled for uncommitted inputs would be compiled a second time for them.
        self._leaves = [jax.device_put(p, p.sharding) for p in leaves]
        self.names = leaf_names(params)
        self.master = [np.asarray(p, dtype=np.float32).copy() for p in self._leaves]
        self._active: tuple[int, float] | None = None

    @property
    def leaves(self) -> list[Any]:
        """The current arrays, in leaf order (read-only use: the operations replace them)."""
        return list(self._leaves)

    @property
    def dtypes(self) -> list[Any]:
        """The numpy dtype of each leaf (bfloat16 as ml_dtypes'), in leaf order."""
        return [np.dtype(p.dtype) for p in self._leaves]

    @property
    def params(self) -> Any:
        """The current pytree."""
        return self._treedef.unflatten(self._leaves)

    def _from_master(self) -> None:
        self._leaves = [
            jax.device_put(m.astype(p.dtype), p.sharding)
            for m, p in zip(self.master, self._leaves, strict=True)
        ]

    def perturb(self, seed: int, sigma: float, sign: int = 1) -> None:
        """theta <- theta + sign * sigma * eps(seed). Raises RuntimeError if already perturbed."""
        if self._active is not None:
            raise RuntimeError("weights are already perturbed; call restore() first")
        scale = float(sign) * float(sigma)
        self._leaves = _perturb(self._leaves, jnp.asarray(key_data(seed, self.names)), jnp.float32(scale))
        self._active = (seed, scale)

    def restore(self) -> None:
        """Undoes `perturb` (exactly from the master, or by subtracting in mode "subtract")."""
        if self._active is None:
            return
        seed, scale = self._active
        if self.restore_mode == "master":
            self._from_master()
        else:
            self._leaves = _perturb(
                self._leaves, jnp.asarray(key_data(seed, self.names)), jnp.float32(-scale)
            )
        self._active = None

    def apply_update(self, pairs: Iterable[tuple[int, float]]) -> None:
        """theta <- theta + sum_k coeff_k * eps(seed_k), accumulated in the fp32 host master.

        Raises:
            RuntimeError: the weights are perturbed.
        """
        if self._active is not None:
            raise RuntimeError("cannot apply an update to perturbed weights; call restore() first")
        pairs = [(int(s), float(c)) for s, c in pairs]
        if pairs:
            keys = jnp.asarray(np.stack([key_data(s, self.names) for s, _ in pairs]))
            coefficients = jnp.asarray([c for _, c in pairs], dtype=jnp.float32)
            for m, u in zip(self.master, _weighted_noise(self._leaves, keys, coefficients), strict=True):
                m += np.asarray(u)
        self._from_master()

    def load_master(self, arrays: dict[str, Any]) -> None:
        """Replaces the fp32 master with `arrays` (leaf name -> array of the leaf's shape, converted to
        float32) and writes it into the leaves. Used to resume and to resync an engine.

        Raises:
            RuntimeError: the weights are perturbed.
            ValueError: the names differ from the leaves', or a shape differs (named).
        """
        if self._active is not None:
            raise RuntimeError("cannot load a master into perturbed weights; call restore() first")
        if set(arrays) != set(self.names):
            missing, extra = sorted(set(self.names) - set(arrays)), sorted(set(arrays) - set(self.names))
            raise ValueError(
                f"master does not match the weights: missing {missing[:5]}, unexpected {extra[:5]}"
            )
        for i, name in enumerate(self.names):
            value = np.asarray(arrays[name], dtype=np.float32)
            if value.shape != self.master[i].shape:
                raise ValueError(f"master {name!r}: shape {value.shape}, leaf {self.master[i].shape}")
            self.master[i][...] = value
        self._from_master()

    def fingerprint(self) -> str:
        """SHA-256 (hex) over every leaf's name, dtype, shape and bytes; equal iff bit-identical."""
        digest = hashlib.sha256()
        for name, p in zip(self.names, self._leaves, strict=True):
            data = np.asarray(p)
            digest.update(f"{name}|{data.dtype}|{data.shape}|".encode())
            digest.update(data.tobytes())
        return digest.hexdigest()

    @staticmethod
    def compilations() -> int:
        """How many versions of the perturbation function are compiled (must stay 1 per shape set)."""
        return _perturb._cache_size()
