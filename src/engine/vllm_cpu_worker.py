"""The worker extension on vLLM's CPU platform: `CpuTorchWorkerExtension`, whose module makes linear layers
compute from the parameters ES perturbs.

vLLM's CPU backend computes linear layers from a prepacked copy of their weights (`engine.vllm_cpu`), so an
in-place perturbation must be made visible before the model loads. The only code of ours that vLLM runs
in its worker process before `load_model` is the import of the `worker_extension_cls`: importing this
module installs `engine.vllm_cpu.use_weight_reading_linear` with the mode in `CPU_LINEAR_ENV` (set by
`VLLMBackend`). Only `engine.vllm_backend.worker_extension` imports it, on the CPU platform, after that
variable is set: the actor process then has the layers too (which an in-process engine needs).
"""

from __future__ import annotations

import os

from engine.vllm_cpu import CPU_LINEAR_ENV, use_weight_reading_linear
from engine.vllm_worker import TorchWorkerExtension


class CpuTorchWorkerExtension(TorchWorkerExtension):
    """`TorchWorkerExtension` on vLLM's CPU platform (the difference is the import of this module)."""


use_weight_reading_linear(os.environ.get(CPU_LINEAR_ENV, "read"))
