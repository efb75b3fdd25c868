"""Seed derivation: the one place that says which random numbers every part of a run uses.

ES communicates seeds, not noise (Qiu et al. 2025, Sec. 3; Salimans et al. 2017): the driver sends each
engine a member seed, and the engine regenerates that member's noise for every parameter from it. For
that to work across processes, machines and Python versions, seeds are derived by hashing, never by a
stateful generator:

  member_seed(root, iteration, index)  = H("member", root, iteration, index)
  noise_seed(member_seed, param_name)  = H("noise", member_seed, param_name)
  lowrank_seed(member_seed, param_name, factor) = H("lowrank", member_seed, param_name, factor)
  prompt_rank(root, iteration, id)     = H("prompt", root, iteration, id)

where H(*parts) is the first 8 bytes (big-endian) of SHA-256 over the parts joined by "/", masked to 63
bits (so it fits a signed 64-bit integer, which `torch.Generator.manual_seed` accepts). Deriving the
noise seed from the parameter's *name* makes noise i.i.d. across parameters; the reference re-seeded the
generator with the same seed for every parameter, so same-shaped parameters got identical noise (their
issue #46).
"""

from __future__ import annotations

import hashlib

SEED_BITS = 63
# The version of the noise function: `noise_seed` below, then per parameter the normals of that key on the
# engine's device: on CPUs Philox4x32-10 + Box-Muller over element indices (engine.cpu_noise), on CUDA
# `torch.randn` from a seeded generator (engine.torch_weights.noise_like), on TPUs threefry normals
# (engine.jax_weights). Every run's numbers depend on it; a checkpoint and the run manifest record it, and
# replaying a checkpoint's updates (driver.checkpointing) refuses a different one. Change it with any change
# to the noise. History: 1 = torch.randn on every torch device; 2 = engine.cpu_noise on CPUs (perturb +
# restore at 98 M parameters on 2 cores ~4.5x a weight copy, against ~12x for version 1 in the same run;
# docs/measurements.md) and an update's terms added one by one, each product rounded before its sum.
NOISE_VERSION = 2


def _hash(*parts: object) -> int:
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << SEED_BITS) - 1)


def member_seed(root_seed: int, iteration: int, index: int) -> int:
    """The seed of population member `index` (0-based) at `iteration`, an int in [0, 2**63)."""
    return _hash("member", int(root_seed), int(iteration), int(index))


def noise_seed(member: int, param_name: str) -> int:
    """The seed of the noise of parameter `param_name` for a member seed, an int in [0, 2**63)."""
    return _hash("noise", int(member), param_name)


def lowrank_seed(member: int, param_name: str, factor: str) -> int:
    """The seed of factor `factor` ("a": in x rank, "b": out x rank) of a member's low-rank noise of
    parameter `param_name` (`--perturbation lowrank`, `engine.lowrank`), an int in [0, 2**63).

    Raises:
        ValueError: `factor` is not "a" or "b".
    """
    if factor not in ("a", "b"):
        raise ValueError(f"factor must be 'a' or 'b', got {factor!r}")
    return _hash("lowrank", int(member), param_name, factor)


def split_seed_u32(seed: int) -> tuple[int, int]:
    """A 63-bit seed as (high, low) 32-bit words, e.g. as raw key data for JAX's threefry PRNG."""
    return (seed >> 32) & 0xFFFFFFFF, seed & 0xFFFFFFFF


def prompt_rank(root_seed: int, iteration: int, problem_id: int | str) -> int:
    """The sort key that orders the training problems for `iteration`: each iteration's prompt batch is
    the problems with the smallest keys, the same on every machine. An int in [0, 2**63)."""
    return _hash("prompt", int(root_seed), int(iteration), f"{type(problem_id).__name__}:{problem_id}")
