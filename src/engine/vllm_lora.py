"""Low-rank members as vLLM LoRA adapters: a population scored in one `generate` call (EGGROLL, Sarkar et
al. 2025, "Evolution Strategies at the Hyperscale", Sec. 3 and its vLLM port: every member is an adapter,
every prompt carries its member's `LoRARequest`).

Member j of a rollout is adapter id j + 1, registered once at start-up as a zero adapter (vLLM's
`add_dummy_lora`, no files) and pinned in LoRA slot j. Each rollout then writes its members' factors
straight into the slots' stacked tensors (`lora_a_stacked[slice][slot, 0, :r, :in]`,
`lora_b_stacked[slice][slot, 0, :out, :r]`; vLLM computes y += (x A^T) B^T from them), so a member's
adapter is exactly sign * sigma * E_seed = sign * sigma * B A^T / sqrt(r) of `engine.lowrank.factors`,
the same factors the merged path (`engine.lowrank.LowRankWeights`) adds into the weights: (a, b) as A^T and
B scaled by sign * sigma / sqrt(r). Nothing is loaded from a path, and nothing is written per iteration
but these tensors.

The last slot (index `slots`) never holds an adapter and is kept zero. vLLM 0.32's CPU ops give a token
without an adapter the index -1 and index the stacked weights with it, i.e. the LAST slot (fixed upstream
after 0.32). A batch of requests that all lack an adapter skips the LoRA ops, but one that mixes them with
members' requests does not: with that slot zero, a request without a `LoRARequest` (held-out
evaluation, the unperturbed model) computes the base model exactly in any batch
(`MemberAdapters.check_base_slot` checks the slot before every rollout; tests/test_vllm_cpu_engine.py
runs a mixed batch, whose requests without an adapter changed when the slot held a member).

Which slice of a fused vLLM layer is which checkpoint matrix comes from `engine.vllm_layout.HFLayout`:
the LoRA layer wrapping parameter `<module>.base_layer.weight` has one stacked slice per checkpoint tensor
loaded into it, in order of their offsets (q, k, v in qkv_proj; gate, up in gate_up_proj). Tensor
parallelism 1 only (the slices of a sharded layer are not whole checkpoint matrices).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from engine.lowrank import factors, is_target
from shared.protocol import LOWRANK_TARGETS

# vLLM's allowed `max_lora_rank` values (vllm/config/lora.py, MaxLoRARanks, in the locked 0.32).
MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class AdapterError(RuntimeError):
    """The LoRA slots are not as this module set them up (another adapter took a slot, or the base slot
    is not zero)."""


def lora_rank(rank: int) -> int:
    """The smallest `max_lora_rank` vLLM accepts that holds rank `rank` (the rest of each slot stays 0).

    Raises:
        ValueError: rank < 1 or above the largest (512).
    """
    for allowed in MAX_LORA_RANKS:
        if allowed >= rank >= 1:
            return allowed
    raise ValueError(f"rank must be in 1..{MAX_LORA_RANKS[-1]} for vLLM's LoRA slots, got {rank}")


def llm_kwargs(slots: int, rank: int) -> dict[str, Any]:
    """The `vllm.LLM` arguments of `slots` member adapters of rank `rank`: one slot more than members (the
    zero base slot), LoRA only on the `LOWRANK_TARGETS` layers.

    Raises:
        ValueError: slots < 1, or a rank vLLM cannot hold (`lora_rank`).
    """
    if slots < 1:
        raise ValueError(f"member slots must be >= 1, got {slots}")
    return {
        "enable_lora": True,
        "max_loras": slots + 1,
        "max_cpu_loras": slots + 1,
        "max_lora_rank": lora_rank(rank),
        "lora_target_modules": list(LOWRANK_TARGETS),
    }


def adapter_request(slot: int) -> Any:
    """The `vllm.lora.request.LoRARequest` of member slot `slot` (0-based): id slot + 1. Its path is a
    name only: the adapter is registered at start-up (`MemberAdapters`) and never loaded from it."""
    from vllm.lora.request import LoRARequest

    return LoRARequest(f"es-member-{slot}", slot + 1, f"es-member-{slot}")


class MemberAdapters:
    """The member slots of one vLLM worker (mixed-in worker extension state; `engine.vllm_worker`).

    Args:
        runner: the worker's model runner, built with `llm_kwargs(slots, rank)` (its `lora_manager`).
        model: the runner's model (LoRA layers wrapping the base layers).
        slices: `HFLayout.slices` (vLLM parameter -> [(checkpoint name, offset, count)]).
        shapes: `HFLayout.shapes` (checkpoint name -> shape).
        slots: member adapters.
        rank: r of each member's E = B A^T / sqrt(r).

    Raises:
        AdapterError: the adapters did not land in slots 0..slots-1 with the last slot free, or a LoRA
            layer's slices do not match the checkpoint matrices loaded into its base layer.
    """

    def __init__(
        self,
        runner: Any,
        model: torch.nn.Module,
        slices: dict[str, list[tuple[str, int, int]]],
        shapes: dict[str, tuple[int, ...]],
        slots: int,
        rank: int,
    ) -> None:
        from vllm.lora.layers import BaseLayerWithLoRA

        self.slots = slots
        self.rank = rank
        self.max_rank = lora_rank(rank)
        manager = runner.lora_manager
        for slot in range(slots):
            manager.add_dummy_lora(adapter_request(slot), rank=self.max_rank)
            manager.pin_adapter(slot + 1)
        index_to_id = list(manager._adapter_manager.lora_index_to_id)
        if index_to_id != [*range(1, slots + 1), None]:
            raise AdapterError(
                f"member adapters landed in slots {index_to_id}, expected ids 1..{slots} in slots "
                f"0..{slots - 1} and the last slot free"
            )
        # Every LoRA layer, with [(slice index, checkpoint name, (out, in))] of its targeted matrices.
        self.layers: list[tuple[Any, list[tuple[int, str, tuple[int, int]]]]] = []
        for module_name, module in model.named_modules():
            if not isinstance(module, BaseLayerWithLoRA):
                continue
            placed = sorted(slices.get(f"{module_name}.base_layer.weight", ()), key=lambda s: s[1])
            if len(placed) != len(module.lora_a_stacked):
                raise AdapterError(
                    f"{module_name}: {len(module.lora_a_stacked)} LoRA slices but {len(placed)} checkpoint "
                    "matrices placed whole in its base layer (tensor parallelism 1 is needed)"
                )
            parts = []
            for index, (source, _, _) in enumerate(placed):
                shape = tuple(shapes[source])
                lora_in = module.lora_a_stacked[index].shape[-1]
                lora_out = module.lora_b_stacked[index].shape[-2]
                if not is_target(source, shape):
                    continue
                if (lora_out, lora_in) != shape:
                    raise AdapterError(
                        f"{module_name} slice {index}: LoRA shape {(lora_out, lora_in)}, checkpoint {source} "
                        f"{shape}"
                    )
                parts.append((index, source, shape))
            self.layers.append((module, parts))
        if not any(parts for _, parts in self.layers):
            raise AdapterError("no LoRA layer holds a low-rank target matrix")

    @torch.no_grad()
    def set_members(self, members: list[tuple[int, int]], sigma: float) -> None:
        """Writes member j = (seed, sign) of `members` into slot j: A^T = a, B = b^T * sign * sigma /
        sqrt(r) of `engine.lowrank.factors(seed, name, shape, r)` for each targeted matrix; the slots past
        the members are zeroed.

        Raises:
            ValueError: more members than slots.
        """
        if len(members) > self.slots:
            raise ValueError(f"{len(members)} members, but the engine has {self.slots} member slots")
        root = math.sqrt(self.rank)
        for module, parts in self.layers:
            for index, source, shape in parts:
                a_stacked, b_stacked = module.lora_a_stacked[index], module.lora_b_stacked[index]
                for slot, (seed, sign) in enumerate(members):
                    a, b = factors(seed, source, shape, self.rank)
                    a_stacked[slot, 0, : self.rank, :].copy_(a)
                    b_stacked[slot, 0, :, : self.rank].copy_(b.mul(float(sign) * float(sigma) / root).T)
                a_stacked[len(members) : self.slots].zero_()
                b_stacked[len(members) : self.slots].zero_()
        self.check_base_slot()

    def check_base_slot(self) -> None:
        """Raises AdapterError unless the last slot of every LoRA layer (what a token without an adapter
        reads in vLLM 0.32's CPU ops) is zero."""
        for module, _ in self.layers:
            for stacked in (*module.lora_a_stacked, *module.lora_b_stacked):
                if torch.count_nonzero(stacked[self.slots]):
                    raise AdapterError(
                        "the base slot (the last LoRA slot) is not zero: requests without an adapter would "
                        "not get the base model"
                    )
