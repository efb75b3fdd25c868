"""Low-rank ES noise on torch weights (`--perturbation lowrank`): EGGROLL (Sarkar et al. 2025, "Evolution
Strategies at the Hyperscale", Sec. 3; ESHyperscale/HyperscaleES `noiser/eggroll.py`).

Member seed s perturbs each targeted matrix W (out x in; `shared.protocol.LOWRANK_TARGETS`) by

    E_s = B_s A_s^T / sqrt(r),   A_s: in x r, B_s: out x r, entries standard normal,

so that E_s has unit-variance entries for any rank r (sigma keeps its meaning: W + sign * sigma * E_s).
A_s and B_s are the engine's normal noise (`engine.torch_weights.normal_like`: on CPUs `engine.cpu_noise`,
the same bits on every instruction set) under keys `shared.seeds.lowrank_seed(s, name, "a"/"b")`, drawn
as r rows of `in` and of `out` elements. An update with coefficients c_s is full rank (up to N * r):

    W += sum_s c_s * E_s = sum_s sum_k (c_s / sqrt(r)) * b_sk a_sk^T,

which EGGROLL shows approaches the full-rank ES update as r grows. Here every sum is a sequence of
elementwise float32 operations in a fixed order (each rank-1 term: b * scale rounded, times a rounded,
added to the accumulator rounded), never a matrix product, whose blocking and fused multiply-adds depend
on the CPU kind and thread count: the update is bit-identical on every engine, on every CPU and on
replay. Its cost is 2 * r * N * out * in float32 operations per matrix and update.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from engine.torch_weights import TorchWeights, normal_like
from shared.protocol import LOWRANK_TARGETS
from shared.seeds import lowrank_seed


def is_target(name: str, shape: tuple[int, ...]) -> bool:
    """True for a parameter low-rank members perturb: a 2-D `.weight` of a `LOWRANK_TARGETS` module
    (e.g. "model.layers.0.self_attn.q_proj.weight"); embeddings, the LM head, norms and biases are not."""
    parts = name.split(".")
    return len(shape) == 2 and len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in LOWRANK_TARGETS


def factors(
    seed: int, name: str, shape: tuple[int, int], rank: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """A member's factors of parameter `name` (shape (out, in)): (a, b), float32 of shapes (rank, in) and
    (rank, out) on `device`, row k being the k-th column of A and of B."""
    out_features, in_features = shape
    a = torch.empty((rank, in_features), dtype=torch.float32, device="meta")
    b = torch.empty((rank, out_features), dtype=torch.float32, device="meta")
    return (
        normal_like(a, lowrank_seed(seed, name, "a"), device),
        normal_like(b, lowrank_seed(seed, name, "b"), device),
    )


def add_lowrank(target: torch.Tensor, name: str, terms: list[tuple[int, float]], rank: int) -> None:
    """target <- target + sum over (seed, scale) of `terms` of scale * E_seed, in place, in float32.

    Args:
        target: float32 tensor shaped like parameter `name` (out, in), on any device.
        name: the parameter's name (keys its factors).
        terms: (member seed, scale) pairs, added in order.
        rank: r of E = B A^T / sqrt(r).

    Raises:
        ValueError: `target` is not a 2-D float32 tensor.
    """
    if target.dtype != torch.float32 or target.dim() != 2:
        raise ValueError(
            f"{name}: low-rank noise needs a 2-D float32 target, got {target.dtype} {target.shape}"
        )
    root = math.sqrt(rank)
    for seed, scale in terms:
        a, b = factors(seed, name, tuple(target.shape), rank, target.device)
        coefficient = float(scale) / root
        for k in range(rank):
            target.add_(torch.outer(b[k].mul(coefficient), a[k]))


class LowRankWeights(TorchWeights):
    """`TorchWeights` whose members and updates are low-rank on the targeted matrices (`is_target`), the
    rest frozen: perturb writes round(master + sign * sigma * E_seed) into each target, restore copies the
    target back (from the fp32 master or the device copy: exact), an update adds sum_s c_s E_s to the
    fp32 master. Used one member at a time by the transformers backend and by vLLM workers without LoRA
    (and as the reference of the batched vLLM path, where members are LoRA adapters instead).

    Args:
        model: the module whose targeted parameters ES changes.
        restore_mode: "master" or "device" (see `TorchWeights`).
        rank: r of E = B A^T / sqrt(r).
        noise_slices: for a vLLM worker's fused parameters, parameter name -> [(checkpoint name, offset,
            count)] (`engine.vllm_layout.HFLayout.slices`): each targeted checkpoint matrix is the
            contiguous flat range [offset, offset + count) of the parameter, and gets the noise of its
            checkpoint name and shape (so q/k/v fused into qkv_proj get the same E as the transformers
            backend's q_proj, k_proj, v_proj). None: every parameter is its own checkpoint tensor.
        shapes: with `noise_slices`, checkpoint name -> shape (`HFLayout.shapes`).

    Raises:
        ValueError: restore_mode "subtract" (low-rank restores are copies), rank < 1, or a model with no
            targeted matrix.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        restore_mode: str = "master",
        rank: int = 1,
        noise_slices: Mapping[str, list[tuple[str, int, int]]] | None = None,
        shapes: Mapping[str, tuple[int, ...]] | None = None,
    ) -> None:
        if restore_mode == "subtract":
            raise ValueError("restore_mode subtract: low-rank members restore by copy (master or device)")
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        super().__init__(model, restore_mode=restore_mode)
        self.rank = rank
        # Parameter name -> its targeted matrices [(checkpoint name, offset, count, (out, in))].
        self.parts: dict[str, list[tuple[str, int, int, tuple[int, int]]]] = {}
        if noise_slices is None:
            for name, p in self.params.items():
                if is_target(name, tuple(p.shape)):
                    self.parts[name] = [(name, 0, p.numel(), tuple(p.shape))]
        else:
            shapes = shapes or {}
            for name, placed in sorted(noise_slices.items()):
                parts = [
                    (source, offset, count, tuple(shapes[source]))
                    for source, offset, count in placed
                    if is_target(source, tuple(shapes[source]))
                ]
                if parts:
                    self.parts[name] = parts
        self.targets = list(self.parts)
        if not self.targets:
            raise ValueError(f"no parameter of the model is a low-rank target ({', '.join(LOWRANK_TARGETS)})")

    @property
    def es_names(self) -> list[str]:
        """The parameters holding targeted matrices, in name order; the rest stays frozen."""
        return self.targets

    def _perturb_one(self, name: str, p: torch.Tensor, seed: int, scale: float) -> None:
        """W <- round(master + scale * E_seed): from the fp32 master, rounded once to W's dtype."""
        value = self.master[name].to(device=p.device, copy=True)
        self._add_terms(value, name, [(seed, scale)])
        p.copy_(value)

    def _add_terms(self, target: torch.Tensor, name: str, terms: list[tuple[int, float]]) -> None:
        flat = target.view(-1)
        for source, offset, count, shape in self.parts[name]:
            add_lowrank(flat[offset : offset + count].view(shape), source, terms, self.rank)
