"""What an engine computes on, as far as it decides the bits of the results: the CPU (model and
instruction-set flags), torch's choice of CPU kernels, thread counts, and the accelerator.

Two engines give bit-identical noise, generations and updates only when these agree: torch picks its
vectorized CPU kernels by `torch.backends.cpu.get_cpu_capability()` (e.g. AVX2 vs AVX512), reductions
split work by thread count, and a GPU's kernels depend on its model and driver. The run manifest
records this report for every engine (docs/training.md, "What is reproducible").
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

# Environment variables that cap the instruction set of the CPU kernels: torch's ATen, oneDNN (torch's and
# vLLM's CPU matmuls) and XLA's CPU backend (JAX). Forcing them to AVX2 on an AVX-512 machine reproduces an
# AVX2-only machine's numerics (docs/training.md, "What is reproducible").
KERNEL_ISA_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "XLA_FLAGS")

# Instruction-set flag prefixes that select different CPU kernels (from /proc/cpuinfo "flags").
_ISA_PREFIXES = ("sse", "ssse", "avx", "fma", "f16c", "amx", "bmi", "vnni")


def cpu_info() -> dict[str, Any]:
    """{"model": CPU model name, "isa": sorted instruction-set flags (`_ISA_PREFIXES`)} from /proc/cpuinfo
    (Linux), else the platform's processor string and no flags."""
    model, flags = platform.processor() or platform.machine(), []
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"model": model, "isa": flags}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            model = value.strip()
        elif key.strip() == "flags":
            flags = sorted(f for f in value.split() if f.startswith(_ISA_PREFIXES))
            break
    return {"model": model, "isa": flags}


def machine_report(device: str) -> dict[str, Any]:
    """This process's compute environment for an engine on `device` ("cpu", "cuda", "cuda:1", ...):
    {"cpu": `cpu_info()`, "cpu_count": logical CPUs usable, "torch": {"version", "cpu_capability",
    "threads", "interop_threads"}, "kernel_env": the `KERNEL_ISA_ENV` variables that are set, "device":
    `device`, "gpus": the names of the CUDA devices visible}."""
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "cpu": cpu_info(),
        "cpu_count": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": {
            "version": str(torch.__version__),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(),
        },
        "kernel_env": {name: os.environ[name] for name in KERNEL_ISA_ENV if name in os.environ},
        "device": device,
        "gpus": gpus,
    }
